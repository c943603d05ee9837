"""Per-step CPU-side work of the LoRA paths: backend operations one training step dispatches (tiny model, CPU).

    python tools/fast_overhead.py [--compare other_lora.py]

The 7B step on the H200 is bound by the CPU that issues its launches (docs/fastpath.md). The number of backend
operations a step dispatches, counted below autograd with a TorchDispatchMode (views left out), is a
deterministic proxy for that work: on a GPU each is about one kernel launch (a bitsandbytes op may launch a
few). Wall-clock timings of a tiny model on a shared 2-core machine move by more than the differences. The model
is the tests' 2-layer hidden-64 Qwen2 with LoRA on all seven projections (bf16 base, and NF4 through
bitsandbytes' CPU backend), gradient checkpointing, bf16 autocast, forward + backward of 16 tokens.
`--compare FILE`: also count with FILE's `lora_linear` (an earlier version of model/fast/lora.py).
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_step(model, ids) -> collections.Counter:
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()

    step()  # warm-up (bitsandbytes' CPU backend quantizes on first use)
    with CountOps() as mode:
        step()
    return mode.counts


def main() -> None:
    sys.path.insert(0, "tests")
    from test_fast_lora import _tiny_peft  # the tests' tiny PEFT model

    import tunelab.model.fast.lora as lora
    from tunelab.model.fast import patch_lora_layers

    p = argparse.ArgumentParser()
    p.add_argument("--compare", default=None)
    args = p.parse_args()
    variants = [("fused", lora.lora_linear)]
    if args.compare:
        spec = importlib.util.spec_from_file_location("lora_other", args.compare)
        other = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(other)
        variants.insert(0, (f"fused ({args.compare})", other.lora_linear))
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    print(f"{'base':<6}{'path':<40}{'ops/step':>9}")
    for quantized in (False, True):
        model = _tiny_peft("cpu", quantized=quantized)
        base = model.base_model.model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
        model.train()
        kind = "nf4" if quantized else "bf16"
        print(f"{kind:<6}{'PEFT':<40}{sum(count_step(model, ids).values()):>9}")
        patch_lora_layers(model)
        for name, fn in variants:
            lora.lora_linear = fn  # the patched layers look it up at each call
            print(f"{kind:<6}{name:<40}{sum(count_step(model, ids).values()):>9}")
        lora.lora_linear = variants[-1][1]


if __name__ == "__main__":
    main()
