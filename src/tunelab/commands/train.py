"""`tunelab train config.yaml [key=value ...] [--key value ...]`: supervised fine-tuning (LoRA / QLoRA / freeze / full)."""
from __future__ import annotations

USAGE = "usage: tunelab train [config.yaml] [key=value ...] [--key value ...]"
SECTIONS = ("model", "quantization", "adapter", "data", "train", "generation")  # generation: for do_predict


def main(argv: list[str]) -> int:
    from tunelab.commands import command_config

    cfg = command_config(argv, "train", USAGE, SECTIONS)
    if cfg is None:
        return 0
    from tunelab.train.distributed import relaunch

    code = relaunch(argv, sharded=bool(cfg.fsdp or cfg.deepspeed))  # several GPUs: one process each, under torchrun
    if code is not None:
        return code
    from tunelab.train.workflow import run_train

    run_train(cfg)
    return 0
