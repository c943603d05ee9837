"""Per-step CPU-side work of the LoRA paths: aten ops dispatched per training step of a tiny model (CPU).

    python tools/fast_overhead.py

The 7B step on the H200 is bound by the CPU that issues its launches (docs/fastpath.md). On the CPU, the number
of aten operations one step dispatches is a deterministic proxy for that work (wall-clock timings of a tiny model
on a shared 2-core machine move by more than the difference). The model is the tests' 2-layer hidden-64 Qwen2
with LoRA on all seven projections (bf16 base, and NF4 through bitsandbytes' CPU backend), gradient
checkpointing, bf16 autocast, forward + backward of 16 tokens. "leaf" ops are those that call no other aten op
(on a GPU, roughly the kernel launches plus views).
"""
from __future__ import annotations

import sys

import torch


def count_ops(model, ids) -> tuple[int, int]:
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()

    step()  # warm-up (bitsandbytes' CPU backend quantizes on first use)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    aten = [e for e in prof.events() if e.name.startswith("aten::")]
    leaf = [e for e in aten if not any(c.name.startswith("aten::") for c in e.cpu_children)]
    return len(leaf), len(aten)


def main() -> None:
    sys.path.insert(0, "tests")
    from test_fast_lora import _tiny_peft  # the tests' tiny PEFT model

    from tunelab.model.fast import patch_lora_layers

    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    print(f"{'base':<6}{'path':<6}{'leaf ops':>10}{'all ops':>9}")
    for quantized in (False, True):
        model = _tiny_peft("cpu", quantized=quantized)
        base = model.base_model.model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
        model.train()
        for path in ("plain", "fast"):
            if path == "fast":
                patch_lora_layers(model)
            leaf, total = count_ops(model, ids)
            print(f"{'nf4' if quantized else 'bf16':<6}{path:<6}{leaf:>10}{total:>9}")


if __name__ == "__main__":
    main()
