"""`tunelab bench`: training speed and memory of tunelab's path beside the plain stack, in one process, on one GPU.

    tunelab bench --arch qwen2.5-7b --model-dir /tmp/q7b --shapes 4x1024,1x1024 --variants plain,tunelab

Method (the same as the peers' figures in the README): a random-init model of the published architecture is
saved as safetensors and loaded with from_pretrained (4-bit NF4 + double quantization, bf16 compute); LoRA r=8,
alpha=16, dropout 0 on every linear layer; gradient checkpointing (non-reentrant); fused AdamW; full-length
random token sequences with labels = inputs; 13 optimizer steps, the median of the last 10; peak =
torch.cuda.max_memory_allocated over the steps. Speed and memory do not depend on the weights' values.

Variants:
  plain    transformers + PEFT + bitsandbytes, model(**batch).loss, a hand-written loop (what the peers measured)
  tunelab  tunelab's loader (tunelab.model.loader) and TunelabTrainer (the code `tunelab train` runs)
  tunelab+liger  the same with enable_liger_kernel (Liger's RMSNorm/RoPE/SwiGLU)
  alpaca   appended to a variant name (plain:alpaca, tunelab:alpaca): the alpaca-like length profile (batch padded
           to its longest sample, prompt tokens masked); reports real (non-pad) tokens per second.
Results are printed as a table and written as JSON (--out).
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import time
from typing import Any

ARCHS: dict[str, dict[str, Any]] = {
    # published configs (speed and memory depend on the shapes only)
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, max_position_embeddings=32768,
                       rope_theta=1000000.0, rms_norm_eps=1e-6),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
                         rope_theta=1000000.0, rms_norm_eps=1e-6),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=151936, tie_word_embeddings=False),
}


def build_random_model(arch: str, out_dir: str) -> str:
    """Save a random-init Qwen2 model of the architecture (bf16 safetensors); reuse it if already there."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    config = Qwen2Config(**ARCHS[arch], torch_dtype="bfloat16")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out_dir, max_shard_size="5GB")
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out_dir


def alpaca_like_lengths(n: int, cutoff_len: int, seed: int = 0):
    """Prompt/response token lengths of an Alpaca-GPT4-shaped set (lognormal medians 40 and 180, +20 template tokens)."""
    import numpy as np

    rng = np.random.Generator(np.random.PCG64(seed))
    prompt = np.clip(np.rint(rng.lognormal(np.log(40), 0.7, n)), 8, 512).astype(int) + 20
    response = np.clip(np.rint(rng.lognormal(np.log(180), 0.8, n)), 4, 2048).astype(int)
    response = np.minimum(response, np.maximum(cutoff_len - prompt, 1))
    return prompt.tolist(), response.tolist()


def synthetic_samples(kind: str, batch: int, seq: int, steps: int, vocab: int, seed: int = 0) -> list[dict]:
    import numpy as np

    rng = np.random.Generator(np.random.PCG64(seed + 1))
    n = batch * steps
    if kind == "full":
        out = []
        for _ in range(n):
            ids = rng.integers(1000, min(vocab, 150000), seq).tolist()
            out.append({"input_ids": ids, "labels": list(ids)})
        return out
    prompt, response = alpaca_like_lengths(n, seq, seed)
    out = []
    for p, r in zip(prompt, response):
        ids = rng.integers(1000, min(vocab, 150000), p + r).tolist()
        out.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return out


def _bench_config(model_dir: str, variant: str):
    from tunelab.config import load_config

    return load_config({
        "model_name_or_path": model_dir, "quantization_bit": 4, "quantization_type": "nf4", "double_quantization": True,
        "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0, "lora_target": "all", "bf16": True,
        "optim": "adamw_torch_fused", "learning_rate": 1e-4, "enable_liger_kernel": False if "noliger" in variant else (True if "+liger" in variant else None),
        "output_dir": "/tmp/tunelab-bench-out", "report_to": "none", "save_strategy": "no", "logging_steps": 1000,
    })


def plain_model(model_dir: str):
    """The plain stack's model: from_pretrained(4-bit NF4, double quant, bf16) + PEFT LoRA r=8 on all linear layers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, dtype=torch.bfloat16, device_map={"": 0},
                                                 attn_implementation="sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))


def hand_loop(model, samples: list[dict], batch: int, loss_fn, autocast: bool) -> list[float]:
    """Forward, backward, clip, fused AdamW step; each step timed between CUDA synchronisations."""
    import torch

    from tunelab.data.collator import Collator

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    collate = Collator(pad_token_id=0)
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(0, len(samples), batch):
        b = {k: v.cuda() if hasattr(v, "cuda") else v for k, v in collate(samples[i : i + batch]).items()}
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(model, b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    del opt
    return times


def run_plain(model_dir: str, samples: list[dict], batch: int, autocast: bool = False) -> list[float]:
    """The plain stack in a hand-written loop: model(**batch).loss."""
    model = plain_model(model_dir)
    def loss_fn(m, b):
        return m(**{k: v for k, v in b.items() if k not in ("loss_rows", "num_tokens")}).loss

    times = hand_loop(model, samples, batch, loss_fn, autocast)
    del model
    return times


def run_tunelab_loop(model_dir: str, samples: list[dict], batch: int, variant: str) -> list[float]:
    """tunelab's loader and loss in the same hand-written loop as the plain stack (isolates the Trainer's cost)."""
    from tunelab.config.resolve import resolve
    from tunelab.model.kernels import forward_hidden, fused_linear_cross_entropy
    from tunelab.model.loader import load_model

    cfg = _bench_config(model_dir, variant)
    model = load_model(cfg, resolve(cfg), for_training=True)

    def loss_fn(m, b):
        hidden, weight = forward_hidden(m, b)
        return fused_linear_cross_entropy(hidden, weight, b["labels"], loss_rows=b.get("loss_rows"))

    times = hand_loop(model, samples, batch, loss_fn, autocast=True)
    del model
    return times


def run_tunelab(model_dir: str, samples: list[dict], batch: int, variant: str, pack_to: int | None = None) -> list[float]:
    """tunelab's path: its loader and TunelabTrainer (the code `tunelab train` runs), timed per optimizer step."""
    import torch
    from transformers import TrainerCallback

    from tunelab.config.resolve import resolve
    from tunelab.data.collator import Collator
    from tunelab.data.processing import EncodedSet
    from tunelab.model.kernels import select_loss
    from tunelab.model.loader import load_model
    from tunelab.train.trainer import TunelabTrainer
    from tunelab.train.workflow import training_arguments

    from tunelab.data.collator import PackedSet

    data = EncodedSet([s["input_ids"] for s in samples], [s["labels"] for s in samples])
    train_set = PackedSet(data, pack_to) if pack_to else data
    collator = Collator(0, 8)
    cfg = _bench_config(model_dir, variant).replace(max_steps=len(train_set) // batch, per_device_train_batch_size=batch)
    resolved = resolve(cfg)
    stock = variant.startswith("plain-trainer")  # the plain stack's model in the stock transformers Trainer
    model = plain_model(model_dir) if stock else load_model(cfg, resolved, for_training=True)
    times: list[float] = []

    profile_dir = os.environ.get("TUNELAB_BENCH_PROFILE")  # a folder: profile step 6 into <variant>.txt there

    class Timer(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kw):
            torch.cuda.synchronize()
            if profile_dir and state.global_step == 5:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
                self.prof.__enter__()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)
            if self.prof is not None:
                self.prof.__exit__(None, None, None)
                table = self.prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
                with open(os.path.join(profile_dir, variant.replace(":", "_").replace("+", "_") + ".txt"), "w") as fh:
                    fh.write(table)
                self.prof = None

        def on_train_begin(self, args, state, control, **kw):
            torch.cuda.reset_peak_memory_stats()

    args = training_arguments(cfg, resolved, has_eval=False)
    args.train_sampling_strategy = "sequential"
    if stock:
        from transformers import Trainer

        trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=collator, callbacks=[Timer()])
    else:
        loss_impl = "plain" if "plainloss" in variant else select_loss(model)
        trainer = TunelabTrainer(model=model, args=args, train_dataset=train_set, data_collator=collator,
                                 callbacks=[Timer()], loss_impl=loss_impl)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    print(json.dumps({"variant": variant, "checkpointing": getattr(base, "is_gradient_checkpointing", None),
                      "liger_rmsnorm": type(base.model.norm).__name__, "loss": getattr(trainer, "loss_impl", "model"),
                      "args_checkpointing": getattr(args, "gradient_checkpointing", None)}), flush=True)
    trainer.train()
    if hasattr(trainer, "check_pending_losses"):
        trainer.check_pending_losses()
    del trainer, model
    return times


def run_variant(variant: str, model_dir: str, batch: int, seq: int, steps: int = 13) -> dict[str, Any]:
    """One measurement. `profile` after a colon: alpaca (padded batches) or alpaca-packed (samples packed into rows)."""
    import torch

    name, _, profile = variant.partition(":")
    kind = "alpaca" if profile.startswith("alpaca") else "full"
    packed = profile == "alpaca-packed"
    # packing puts ~3.4 alpaca-like samples in a 1024-token row: draw enough samples for `steps` full batches
    n_steps = steps * max(1, int(seq / 250)) if packed else steps
    samples = synthetic_samples(kind, batch, seq, n_steps, vocab=150000)
    if name.startswith("plain-trainer"):
        times = run_tunelab(model_dir, samples, batch, name)
    elif name.startswith("plain"):
        times = run_plain(model_dir, samples, batch, autocast="autocast" in name)
    elif name.startswith("tunelab-loop"):
        times = run_tunelab_loop(model_dir, samples, batch, name)
    else:
        times = run_tunelab(model_dir, samples, batch, name, pack_to=seq if packed else None)
    peak = torch.cuda.max_memory_allocated() / 2**30
    gc.collect()
    torch.cuda.empty_cache()
    tail = times[3:] if len(times) > 3 else times
    step = statistics.median(tail)
    if kind == "full":
        tokens_per_s = round(batch * seq / step, 1)
    else:  # real (non-pad) tokens of the timed steps after warm-up, over their time
        if packed:
            from tunelab.data.collator import PackedSet
            from tunelab.data.processing import EncodedSet

            rows = PackedSet(EncodedSet([s["input_ids"] for s in samples], [s["labels"] for s in samples]), seq)
            lengths = [len(rows[i]["input_ids"]) for i in range(len(rows))]
        else:
            lengths = [len(s["input_ids"]) for s in samples]
        real_tokens = [sum(lengths[i : i + batch]) for i in range(0, len(lengths), batch)][: len(times)]
        tokens_per_s = round(sum(real_tokens[3:]) / sum(tail), 1)
    return {"variant": variant, "batch": batch, "seq": seq, "steps": len(times), "median_step_s": round(step, 4),
            "tokens_per_s": tokens_per_s, "peak_gib": round(peak, 2), "profile": profile or "full",
            "step_times": [round(t, 4) for t in times]}


def _run_isolated(variant: str, model_dir: str, batch: int, seq: int, steps: int) -> dict[str, Any]:
    """Each measurement in its own process: a fresh CUDA context and allocator, and no monkey-patching (Liger
    patches transformers' classes process-wide) leaking from one variant into the next."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "tunelab.bench", "--single", variant, "--model-dir", model_dir,
           "--shapes", f"{batch}x{seq}", "--steps", str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(out.stdout.splitlines()):
        if line.startswith('{"variant"') and '"tokens_per_s"' in line:
            return json.loads(line)
    raise RuntimeError(f"bench of {variant} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="tunelab bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="qwen2.5-7b", choices=sorted(ARCHS))
    p.add_argument("--model-dir", default=None, help="where the random-init model is saved (default /tmp/tunelab-bench-<arch>)")
    p.add_argument("--shapes", default="4x1024", help="comma list of BATCHxSEQ")
    p.add_argument("--variants", default="plain-autocast,tunelab")
    p.add_argument("--steps", type=int, default=13)
    p.add_argument("--repeat", type=int, default=1, help="measure the variant list this many times, alternating")
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)  # internal: one measurement in this process
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    import torch

    from tunelab.errors import TunelabError

    if not torch.cuda.is_available():
        raise TunelabError("tunelab bench measures GPU training speed and needs a CUDA GPU; none is visible here.")
    model_dir = args.model_dir or f"/tmp/tunelab-bench-{args.arch}"
    if args.single:
        batch, seq = (int(x) for x in args.shapes.lower().split("x"))
        print(json.dumps(run_variant(args.single, model_dir, batch, seq, args.steps)), flush=True)
        return 0
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        import subprocess
        import sys

        subprocess.run([sys.executable, "-c", f"from tunelab.bench import build_random_model; build_random_model({args.arch!r}, {model_dir!r})"], check=True)
    results = []
    for shape in args.shapes.split(","):
        batch, seq = (int(x) for x in shape.lower().split("x"))
        for _ in range(args.repeat):
            for variant in args.variants.split(","):
                r = _run_isolated(variant.strip(), model_dir, batch, seq, args.steps)
                results.append(r)
                print(json.dumps(r), flush=True)
    print(f"\n{'variant':<24}{'shape':>10}{'tokens/s':>12}{'peak GiB':>10}{'step s':>9}")
    for r in results:
        print(f"{r['variant']:<24}{str(r['batch']) + 'x' + str(r['seq']):>10}{r['tokens_per_s']:>12,.0f}{r['peak_gib']:>10.2f}{r['median_step_s']:>9.3f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(__import__("sys").argv[1:]))
