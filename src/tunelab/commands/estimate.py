"""`tunelab estimate MODEL | cfg.yaml [options]`: GPU memory of a training run, from the model's config alone.

    tunelab estimate Qwen/Qwen2.5-7B-Instruct --method qlora --batch 4 --cutoff-len 1024 --gpu 24GiB
    tunelab estimate examples/qwen2.5-7b-instruct_qlora_alpaca_zh.yaml --gpu 3090
    tunelab estimate path/to/config.json --method lora --plain --json

MODEL is a hub id (its config.json from the Hugging Face cache when present, else the built-in table), a local
folder or a config.json; no weights are read. A training config (.yaml, or a .json with model_name_or_path)
is estimated with every key that changes memory; key=value overrides follow it as for `tunelab train`.

The estimate is for one CUDA GPU, with the training fast path decided as `tunelab train` decides it there:
compiled decoder layers, checkpoints offloaded to host memory and the input embedding on the host by default;
TUNELAB_FAST_COMPILE=0 (eager layers, Liger when installed), TUNELAB_OFFLOAD_CHECKPOINTS=0 and
TUNELAB_HOST_EMBEDDING=0/1 are read from the environment, as the trainer reads them.
"""
from __future__ import annotations

import argparse
import json
import os

from tunelab.errors import ConfigError

OPTIMS = ("adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw_bnb_8bit", "adafactor", "sgd")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunelab estimate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="hub id, model folder, config.json, or a training config (.yaml)")
    p.add_argument("overrides", nargs="*", default=[], help="key=value overrides of a training config")
    p.add_argument("--method", choices=("full", "freeze", "lora", "qlora"), default=None, help="default qlora")
    p.add_argument("--bits", type=int, choices=(4, 8), default=None, help="base weights of qlora (default 4)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default 8)")
    p.add_argument("--target", default=None, help="LoRA targets: all (default) or a comma list (q_proj,v_proj)")
    p.add_argument("--batch", type=int, default=None, help="per-device batch size (default 4)")
    p.add_argument("--cutoff-len", type=int, default=None, help="tokens per sample (default 1024)")
    p.add_argument("--grad-ckpt", dest="grad_ckpt", action="store_true", default=None, help="gradient checkpointing (default)")
    p.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false")
    p.add_argument("--optim", choices=OPTIMS, default=None, help="default adamw_torch")
    p.add_argument("--attn", choices=("sdpa", "fa2", "eager"), default=None, help="attention implementation (default sdpa)")
    p.add_argument("--packing", action="store_true", default=None, help="packed rows (an explicit attention mask)")
    p.add_argument("--liger", dest="liger", action="store_true", default=None,
                   help="enable_liger_kernel: true (eager layers with Liger; default null: compiled layers, or Liger if installed when eager)")
    p.add_argument("--no-liger", dest="liger", action="store_false", help="enable_liger_kernel: false")
    p.add_argument("--plain", action="store_true", help="predict the plain transformers + PEFT + bitsandbytes stack")
    p.add_argument("--gpu", default=None, help="a card (t4, 3090, 4090, a100-40g, a100-80g, h100, h200) or a size (24GiB): what fits")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def _is_training_config(path: str) -> bool:
    if path.endswith((".yaml", ".yml")):
        return True
    if path.endswith(".json") and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as fh:
                doc = json.load(fh)
        except (OSError, ValueError):
            return False
        return isinstance(doc, dict) and "model_name_or_path" in doc and "hidden_size" not in doc
    return False


def build(args) -> tuple:
    """(shape, setup, notes, batch auto?, gradient accumulation, fast path plan) from the arguments: a training
    config with flags on top, or a model with flags. The fast path is decided last, on the final settings."""
    from dataclasses import replace

    from tunelab.estimate import Setup, model_shape
    from tunelab.estimate.from_config import apply_plan, parse_targets, setup_from_config

    cfg = None
    if _is_training_config(args.model):
        from tunelab.config import load_config

        cfg = load_config([args.model, *args.overrides])
        shape, setup, notes = setup_from_config(cfg)
        auto, accum = cfg.per_device_train_batch_size == "auto", cfg.gradient_accumulation_steps
    else:
        if args.overrides:
            raise ConfigError(f"'{args.overrides[0]}': key=value overrides apply to a training config (.yaml), not to a model.")
        shape, setup, notes, auto, accum = model_shape(args.model), Setup(bits=None, batch=4, seq=1024), [], False, 1
        setup = replace(setup, method=args.method or "qlora")
    changes = {k: v for k, v in dict(method=args.method, rank=args.rank, batch=args.batch, seq=args.cutoff_len,
                                     grad_ckpt=args.grad_ckpt, optim=args.optim, attn=args.attn).items() if v is not None}
    if args.target:
        changes["targets"] = parse_targets(args.target)
    if args.packing:
        changes["mask"] = True
    if args.bits:
        changes["bits"] = args.bits
        if (args.method or setup.method) == "lora":
            changes["method"] = "qlora"
    setup = replace(setup, plain=args.plain, **changes)
    if setup.method == "qlora" and not setup.bits:
        setup = replace(setup, bits=4)
    if setup.method in ("lora", "full", "freeze") and setup.bits and not args.bits:
        setup = replace(setup, bits=None)
    if "batch" in changes and not args.packing:
        setup = replace(setup, mask=setup.mask and setup.batch > 1)
    setup, plan = apply_plan(shape, setup, cfg, liger=args.liger)
    return shape, setup, notes, auto, accum, plan


def main(argv: list[str]) -> int:
    args = _parser().parse_intermixed_args(argv)
    from tunelab.estimate import estimate
    from tunelab.estimate.fit import fit, parse_gpu
    from tunelab.estimate.report import fit_json, fit_table, table

    shape, setup, notes, auto, accum, plan = build(args)
    gpu = parse_gpu(args.gpu) if args.gpu else None
    if auto and gpu is None:
        notes.append("per_device_train_batch_size: auto is chosen on the GPU at train time; estimated here at batch 1 (add --gpu to see the choice).")
    est = estimate(shape, setup, plan)
    plan = fit(shape, setup, gpu, accumulation=accum) if gpu else None
    if args.json:
        out = est.to_json()
        out["notes"] = notes
        if plan:
            out["fit"] = fit_json(plan)
        print(json.dumps(out, indent=2))
        return 0
    print(table(est))
    for n in notes:
        print(f"note: {n}")
    if plan:
        print(fit_table(plan))
    return 0
