"""Decode speed of tunelab's inference engine vs plain `model.generate`, and time + peak RAM of `tunelab export`'s
streaming merge, on a random-init Qwen2.5-7B-architecture model. Prints a table (and --json writes the figures).

    PYTHONPATH=src python tools/bench_infer.py --workdir /tmp/bench7b                # everything (GPU, ~10 min)
    PYTHONPATH=src python tools/bench_infer.py --phases decode16,decode4             # decode only
    PYTHONPATH=src python tools/bench_infer.py --phases merge                         # merge only (CPU is enough)
    PYTHONPATH=src python tools/bench_infer.py --small --device cpu                   # a 2-layer smoke test

What is measured (the setting of docs/chat_export.md):
- model: hidden 3584, intermediate 18944, 28 layers, 28 heads, 4 KV heads, vocab 152064, untied (Qwen2.5-7B), random
  init, saved as bf16 safetensors shards of 5 GB (like the hub checkpoint);
- decode: 128-token prompts (random ids), exactly 256 new tokens (stop tokens off, min_new_tokens = 256), greedy,
  batch 1 and 8; bf16 and 4-bit NF4 (double quantization, bf16 compute, loaded through tunelab's loader); tunelab's
  Engine.generate_ids and plain model.generate on the same model object in the same run, one warm-up call each;
  tokens/s = batch x 256 / wall time (prefill included);
- merge: a random rank-16 LoRA adapter on all linear layers merged into the bf16 base by tunelab.export.merge (what
  `tunelab export` runs before its verification), on the CPU, in a child process; peak RSS of that process via
  resource.getrusage (psutil not needed), compared with the model's 16-bit size.

Needs only torch, transformers, peft, bitsandbytes, safetensors and tunelab (src/) on PYTHONPATH.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SEVEN_B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064)
SMALL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=152064)
PROMPT_LEN, NEW_TOKENS, BATCHES = 128, 256, (1, 8)
LORA_RANK = 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def qwen_config(dims: dict):
    from transformers import Qwen2Config

    return Qwen2Config(**dims, max_position_embeddings=32768, tie_word_embeddings=False, rope_theta=1000000.0,
                       rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)


def build_base(workdir: str, dims: dict, device: str) -> str:
    """The random-init model saved as bf16 shards (reused when already there)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = os.path.join(workdir, "base")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    t = time.time()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(qwen_config(dims), dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="5GB")
    del model
    _free()
    print(f"[bench] built and saved the random-init model in {time.time() - t:.0f} s -> {path}", file=sys.stderr)
    return path


def build_adapter(workdir: str, dims: dict, name: str = "adapter", seed: int = 0) -> str:
    """A random rank-16 LoRA adapter on every linear layer, in PEFT's file format (B non-zero, so it changes W)."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    path = os.path.join(workdir, name)
    if os.path.isfile(os.path.join(path, "adapter_model.safetensors")):
        return path
    os.makedirs(path, exist_ok=True)
    h, inter, kv = dims["hidden_size"], dims["intermediate_size"], dims["num_key_value_heads"] * dims["hidden_size"] // dims["num_attention_heads"]
    shapes = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h), "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(dims["num_hidden_layers"]):
        for name, (out_f, in_f) in shapes.items():
            part = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{name}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(LORA_RANK, in_f, generator=g) / in_f**0.5).to(torch.bfloat16)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(out_f, LORA_RANK, generator=g) * 1e-3).to(torch.bfloat16)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=list(TARGETS), task_type="CAUSAL_LM").save_pretrained(path)
    return path


def _free() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _Ids:
    """What the engine needs of a tokenizer when it is given token ids (the benchmark has no text)."""

    pad_token_id = 151643
    eos_token_id = 151645


def decode_rows(model, label: str, new_tokens: int) -> list[dict]:
    """tunelab engine vs plain generate on the same model, batch 1 and 8."""
    import torch

    from tunelab.infer import Engine, GenerationSettings

    engine = Engine(model, _Ids(), None, settings=GenerationSettings(do_sample=False, max_new_tokens=new_tokens), max_batch_size=max(BATCHES))
    device = engine.device
    g = torch.Generator().manual_seed(1)
    rows = []
    for batch in BATCHES:
        prompts = torch.randint(0, 150000, (batch, PROMPT_LEN), generator=g)
        mask = torch.ones_like(prompts)

        def plain(n: int):
            return model.generate(input_ids=prompts.to(device), attention_mask=mask.to(device), do_sample=False, max_new_tokens=n,
                                  min_new_tokens=n, pad_token_id=151643, repetition_penalty=1.0)

        def tunelab(n: int):
            return engine.generate_ids(prompts.tolist(), max_new_tokens=n, min_new_tokens=n, stop_token_ids=())

        for name, fn in (("plain generate", plain), ("tunelab engine", tunelab)):
            fn(new_tokens)  # warm-up at full length: after an 8-token one the first full call still ran slow (docs/chat_export.md)
            _sync()
            t = time.perf_counter()
            out = fn(new_tokens)
            _sync()
            seconds = time.perf_counter() - t
            produced = len(out[0]) if isinstance(out, list) else out.shape[1] - PROMPT_LEN
            assert produced == new_tokens, f"{name} produced {produced} tokens"
            rows.append({"weights": label, "batch": batch, "path": name, "seconds": round(seconds, 2),
                         "tokens_per_s": round(batch * new_tokens / seconds, 1), "ms_per_step": round(1000 * seconds / new_tokens, 2)})
            print(f"[bench] {label} batch {batch} {name}: {rows[-1]['tokens_per_s']} tokens/s", file=sys.stderr)
    return rows


def phase_decode16(base: str, device: str, new_tokens: int) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map={"": 0} if device == "cuda" else None).eval()
    try:
        return decode_rows(model, "bf16", new_tokens)
    finally:
        del model
        _free()


def phase_decode4(base: str, device: str, new_tokens: int) -> list[dict]:
    from tunelab.config import load_config
    from tunelab.config.resolve import resolve
    from tunelab.model.loader import load_base_model

    cfg = load_config({"model_name_or_path": base, "quantization_bit": 4, "quantization_type": "nf4", "double_quantization": True})
    resolved = resolve(cfg)
    model = load_base_model(cfg, resolved, dtype="bfloat16", device=device).eval()
    try:
        return decode_rows(model, "4-bit NF4", new_tokens)
    finally:
        del model
        _free()


def phase_merge(base: str, adapter: str, workdir: str) -> dict:
    out = os.path.join(workdir, "merged")
    code = (
        "import json, resource, sys, time, os\n"
        "from tunelab.export.lora import LoraAdapter\n"
        "from tunelab.export.merge import BaseCheckpoint, merge_weights\n"
        f"base, adapter, out = {base!r}, {adapter!r}, {out!r}\n"
        "os.makedirs(out, exist_ok=True)\n"
        "t = time.time()\n"
        "stats = merge_weights(BaseCheckpoint(base), [LoraAdapter.load(adapter)], out, dtype='bfloat16', shard_gb=5, device='cpu')\n"
        "print(json.dumps({'seconds': time.time() - t, 'peak_rss_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,\n"
        "                  'merged': stats.merged, 'bytes': stats.total_bytes, 'files': len(stats.files)}))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"), os.environ.get("PYTHONPATH", "")])}
    t = time.time()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"merge child failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["wall_s"] = round(time.time() - t, 1)
    row["size_gib"] = row.pop("bytes") / 2**30
    row["peak_over_size"] = row["peak_rss_gib"] / row["size_gib"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/tunelab_bench_infer")
    ap.add_argument("--phases", default="decode16,decode4,merge")
    ap.add_argument("--small", action="store_true", help="a 2-layer model (smoke test)")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dims = SMALL if args.small else SEVEN_B
    os.makedirs(args.workdir, exist_ok=True)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    base = build_base(args.workdir, dims, device)
    results: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "dims": dims, "decode": [], "merge": None}
    if "decode16" in phases:
        results["decode"] += phase_decode16(base, device, args.new_tokens)
    if "decode4" in phases:
        results["decode"] += phase_decode4(base, device, args.new_tokens)
    if "merge" in phases:
        results["merge"] = phase_merge(base, build_adapter(args.workdir, dims), args.workdir)
    print(f"\ndevice: {results['device']}; model: {'7B-architecture' if not args.small else 'small'} random init; "
          f"prompt {PROMPT_LEN} tokens, {args.new_tokens} new tokens, greedy")
    if results["decode"]:
        print("\n| weights | batch | path | tokens/s | ms/step | seconds |\n|---|---|---|---|---|---|")
        for r in results["decode"]:
            print(f"| {r['weights']} | {r['batch']} | {r['path']} | {r['tokens_per_s']} | {r['ms_per_step']} | {r['seconds']} |")
    if results["merge"]:
        m = results["merge"]
        print(f"\nmerge (bf16, CPU, rank-{LORA_RANK} LoRA on all linear layers): {m['seconds']:.1f} s "
              f"({m['wall_s']} s with process start), peak RSS {m['peak_rss_gib']:.2f} GiB = {m['peak_over_size']:.2f} x the "
              f"16-bit size ({m['size_gib']:.2f} GiB), {m['files']} shard(s), {m['merged']} tensors merged")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
