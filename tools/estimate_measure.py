"""Measure the peak GPU memory of the cases `tunelab estimate` predicts, beside its predictions (docs/estimate.md).

    python tools/estimate_measure.py --out /tmp/measure.json            # on a CUDA machine, about 5 minutes

Cases: Qwen2.5-1.5B and Qwen2.5-7B architectures (random init from the published config, saved as safetensors and
loaded with from_pretrained), 16-bit LoRA and 4-bit NF4 QLoRA (double quantization, bf16 compute), r=8 alpha 16
dropout 0 on all seven projections, gradient checkpointing, fused AdamW, full-length random rows with labels =
inputs, at 1 x 512, 1 x 1024, 4 x 1024 and 2 x 4096, for two stacks:

  plain    transformers + PEFT + bitsandbytes, model(**batch).loss under bf16 autocast, clip 1.0, fused AdamW
           (a hand loop that, like the Hugging Face Trainer, keeps no outputs between steps)
  tunelab  tunelab's loader (tunelab.model.loader: kernels, fast path) and TunelabTrainer, as `tunelab train` runs
           (today on one GPU: compiled decoder layers with Liger left out, checkpoint offload, host embedding; each
           record keeps what the loader applied in "fast_path" and the prediction follows it; the saved 2026-12-01
           run predates all three: eager + Liger)

Each (architecture, method, stack) runs in its own process (Liger patches transformers' classes process-wide), the
model loaded once, the shapes in turn: 3 optimizer steps each after reset_peak_memory_stats; recorded: peak
allocated and reserved, and the process's memory as nvidia-smi lists it. Several processes share the GPU at once
(memory statistics are per process; speed is not measured here).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import gc
import json
import os
import subprocess
import sys
import time

SHAPES = ((1, 512), (1, 1024), (4, 1024), (2, 4096))
ARCHS = {"qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct", "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct"}
STEPS = 3


def build(arch: str, out_dir: str) -> None:
    """A random-init bf16 model of the built-in shape, saved as safetensors (skipped when present)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tunelab.estimate import model_shape

    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return
    s = model_shape(ARCHS[arch])
    cfg = Qwen2Config(hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
                      num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, vocab_size=s.vocab,
                      tie_word_embeddings=s.tied, max_position_embeddings=s.max_positions, rope_theta=1e6, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out_dir, max_shard_size="5GB")


def smi_used_mib() -> int | None:
    """This process's GPU memory as nvidia-smi lists it (None when the pid is not visible, e.g. another namespace)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(os.getpid()):
            return int(parts[1])
    return None


def context() -> dict:
    """The CUDA context + cuBLAS of a process alone on the GPU: used (total - free) minus what torch reserved."""
    import torch

    x = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    (x @ x).sum().item()
    free, total = torch.cuda.mem_get_info()
    return {"context_gib": round((total - free - torch.cuda.memory_reserved()) / 2**30, 3), "smi_mib": smi_used_mib(),
            "reserved_gib": round(torch.cuda.memory_reserved() / 2**30, 3), "device": torch.cuda.get_device_name(0),
            "torch": torch.__version__}


def samples(batch: int, seq: int, vocab: int) -> list[dict]:
    import numpy as np

    rng = np.random.Generator(np.random.PCG64(seq + batch))
    out = []
    for _ in range(batch * STEPS):
        ids = rng.integers(1000, min(vocab, 150000), seq).tolist()
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def plain_model(model_dir: str, method: str, ckpt: bool = True):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = {}
    if method == "qlora":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                                       bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map={"": 0}, attn_implementation="sdpa", **kw)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    return model


def measure_plain(model, batch: int, seq: int, vocab: int, opt) -> None:
    import torch

    from tunelab.data.collator import Collator

    collate = Collator(pad_token_id=0)
    data = samples(batch, seq, vocab)
    params = [p for p in model.parameters() if p.requires_grad]
    for i in range(0, len(data), batch):
        b = collate(data[i: i + batch])
        b = {k: b[k].cuda() for k in ("input_ids", "attention_mask", "labels")}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()


def tunelab_config(model_dir: str, method: str, batch: int = 1, ckpt: bool = True):
    from tunelab.config import load_config

    quant = {"quantization_bit": 4, "quantization_type": "nf4", "double_quantization": True} if method == "qlora" else {}
    return load_config({"model_name_or_path": model_dir, **quant, "do_train": True, "lora_rank": 8, "lora_alpha": 16,
                        "lora_dropout": 0.0, "lora_target": "all", "bf16": True, "optim": "adamw_torch_fused",
                        "learning_rate": 1e-4, "output_dir": "/tmp/tunelab-estimate-out", "report_to": "none",
                        "save_strategy": "no", "logging_steps": 1000, "max_steps": STEPS, "per_device_train_batch_size": batch,
                        "disable_gradient_checkpointing": not ckpt})


def measure_tunelab(model, model_dir: str, method: str, batch: int, seq: int, vocab: int, ckpt: bool = True) -> None:
    import torch
    from transformers import TrainerCallback

    from tunelab.config.resolve import resolve
    from tunelab.data.collator import Collator
    from tunelab.data.processing import EncodedSet
    from tunelab.model.kernels import select_loss
    from tunelab.train.trainer import TunelabTrainer
    from tunelab.train.workflow import training_arguments

    cfg = tunelab_config(model_dir, method, batch, ckpt)
    data = samples(batch, seq, vocab)
    train_set = EncodedSet([s["input_ids"] for s in data], [s["labels"] for s in data])

    class Reset(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            torch.cuda.reset_peak_memory_stats()

    args = training_arguments(cfg, resolve(cfg), has_eval=False)
    trainer = TunelabTrainer(model=model, args=args, train_dataset=train_set, data_collator=Collator(0, 8),
                             callbacks=[Reset()], loss_impl=select_loss(model))
    trainer.train()
    if hasattr(trainer, "check_pending_losses"):
        trainer.check_pending_losses()
    torch.cuda.synchronize()
    del trainer


def job(arch: str, method: str, stack: str, model_dir: str, shapes, ckpt: bool = True) -> None:
    """One process: load once, every shape in turn; one JSON line per shape."""
    import torch

    t0 = time.time()
    if stack == "plain":
        model = plain_model(model_dir, method, ckpt)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
        kernels, fast = "plain", []
    else:
        from tunelab.config.resolve import resolve
        from tunelab.model.loader import load_model

        cfg = tunelab_config(model_dir, method, ckpt=ckpt)
        model = load_model(cfg, resolve(cfg), for_training=True)
        base = model.get_base_model()
        # Liger patches the instances' forward (the class keeps its name): read the bound method's owner
        kernels = "Liger" if "Liger" in getattr(base.model.norm.forward, "__qualname__", "") else "plain"
        fast = list(getattr(model, "tunelab_fast_path", None) or [])  # e.g. ["fast-lora(196 projections)", "compile(28 layers)"]
    vocab = model.config.vocab_size
    print(json.dumps({"loaded": f"{arch} {method} {stack}", "s": round(time.time() - t0, 1), "kernels": kernels,
                      "allocated_after_load_gib": round(torch.cuda.memory_allocated() / 2**30, 3)}), flush=True)
    for batch, seq in shapes:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        rec = {"arch": arch, "method": method, "stack": stack, "batch": batch, "seq": seq, "kernels": kernels, "ckpt": ckpt,
               "fast_path": fast}
        try:
            if stack == "plain":
                measure_plain(model, batch, seq, vocab, opt)
            else:
                measure_tunelab(model, model_dir, method, batch, seq, vocab, ckpt)
            rec.update(peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3),
                       peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 3), smi_mib=smi_used_mib())
        except torch.OutOfMemoryError:
            rec["oom"] = True
        print(json.dumps(rec), flush=True)


def repredict(path: str, liger_tunelab: bool) -> None:
    """Recompute the predictions of a saved result (the measurements unchanged), e.g. after a model change or when a
    run recorded the kernels wrongly (the 2026-12-01 run read the norm's class name, which Liger's instance patch keeps)."""
    doc = json.load(open(path))
    for r in doc["records"]:
        if "peak_allocated_gib" in r:
            r.update(predict(r, liger=liger_tunelab and r["stack"] == "tunelab"))
            r["error_pct"] = round(100 * (r["predicted_allocated_gib"] / r["peak_allocated_gib"] - 1), 1)
            if r.get("smi_mib"):
                r["smi_error_pct"] = round(100 * (r["predicted_smi_gib"] / (r["smi_mib"] / 1024) - 1), 1)
    json.dump(doc, open(path, "w"), indent=1)


def predict(rec: dict, liger: bool) -> dict:
    from tunelab.estimate import Setup, estimate, model_shape
    from tunelab.estimate.terms import GiB

    fast = rec.get("fast_path") or []  # what the loader applied (absent in the 2026-12-01 run: the eager path)
    u = Setup(method=rec["method"], bits=4 if rec["method"] == "qlora" else None, batch=rec["batch"], seq=rec["seq"],
              plain=rec["stack"] == "plain", liger=liger and rec["stack"] == "tunelab", optim="adamw_torch_fused",
              grad_ckpt=rec.get("ckpt", True), compiled=any(str(a).startswith("compile(") for a in fast),
              offload=any(str(a).startswith("offload(") for a in fast), host_embedding="host-embedding" in fast)
    est = estimate(model_shape(ARCHS[rec["arch"]]), u)
    return {"predicted_allocated_gib": round(est.peak_allocated / GiB, 3), "predicted_reserved_gib": round(est.peak_reserved / GiB, 3),
            "predicted_smi_gib": round(est.nvidia_smi / GiB, 3), "predicted_phase": est.phase}


def _run(cmd: list[str]) -> list[dict]:
    out = subprocess.run(cmd, capture_output=True, text=True)
    recs = [json.loads(l) for l in out.stdout.splitlines() if l.startswith('{"')]  # not the Trainer's printed dicts
    if out.returncode:
        recs.append({"error": " ".join(cmd[-6:]), "stderr": out.stderr[-2500:]})
    return recs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--root", default="/tmp/tunelab-estimate-models")
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--jobs", default=None, help="comma-free list of arch:method:stack[:nockpt] (default: every combination)")
    p.add_argument("--shapes", default=None, help="comma list of BxT (default 1x512,1x1024,4x1024,2x4096)")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)
    p.add_argument("--build", default=None, help=argparse.SUPPRESS)
    p.add_argument("--context", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--repredict", default=None, help="recompute the predictions of this saved result (liger for tunelab: --liger)")
    p.add_argument("--liger", action="store_true", help="with --repredict: the tunelab stack ran Liger's kernels")
    args = p.parse_args()
    if args.repredict:
        repredict(args.repredict, args.liger)
        return 0
    if args.build:
        build(args.build, os.path.join(args.root, args.build))
        return 0
    if args.context:
        print(json.dumps(context()), flush=True)
        return 0
    if args.job:
        arch, method, stack, *flags = args.job.split(",")
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
        job(arch, method, stack, os.path.join(args.root, arch), shapes, ckpt="nockpt" not in flags)
        return 0
    me = [sys.executable, os.path.abspath(__file__), "--root", args.root]
    t0 = time.time()
    ctx = _run(me + ["--out", args.out, "--context"])
    archs = args.archs.split(",")
    with cf.ThreadPoolExecutor(len(archs)) as pool:
        list(pool.map(lambda a: _run(me + ["--out", args.out, "--build", a]), archs))
    print(json.dumps({"context": ctx, "built_s": round(time.time() - t0, 1)}), flush=True)
    jobs = [(a, m, s) for a in reversed(archs) for m in ("lora", "qlora") for s in ("plain", "tunelab")]
    if args.jobs:
        jobs = [tuple(j.split(":")) for j in args.jobs.split()]
    extra = ["--shapes", args.shapes] if args.shapes else []
    records: list[dict] = []
    with cf.ThreadPoolExecutor(args.workers) as pool:
        futures = [pool.submit(_run, me + ["--out", args.out, "--job", ",".join(j)] + extra) for j in jobs]
        for fut in cf.as_completed(futures):  # printed as each job ends: a run cut short keeps what finished
            recs = fut.result()
            for r in recs:
                print(json.dumps(r), flush=True)
            records += recs
    import importlib.util

    liger = importlib.util.find_spec("liger_kernel") is not None
    for r in records:
        if "peak_allocated_gib" in r:
            r.update(predict(r, liger=liger and r.get("kernels", "").startswith("Liger")))
            if r.get("smi_mib"):
                r["smi_error_pct"] = round(100 * (r["predicted_smi_gib"] / (r["smi_mib"] / 1024) - 1), 1)
            r["error_pct"] = round(100 * (r["predicted_allocated_gib"] / r["peak_allocated_gib"] - 1), 1)
    with open(args.out, "w") as fh:
        json.dump({"context": ctx, "records": records, "wall_s": round(time.time() - t0, 1)}, fh, indent=1)
    for r in records:
        if "error_pct" in r:
            print(f"{r['arch']:<14}{r['method']:<7}{r['stack']:<9}{r['batch']}x{r['seq']:<6}measured {r['peak_allocated_gib']:6.2f}"
                  f"  predicted {r['predicted_allocated_gib']:6.2f} ({r['error_pct']:+.1f}%)  reserved {r['peak_reserved_gib']:6.2f}"
                  f" / {r['predicted_reserved_gib']:6.2f}  smi {r.get('smi_mib')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
