"""`tunelab train config.yaml [key=value ...] [--key value ...]`: supervised fine-tuning (LoRA / QLoRA / freeze / full)."""
from __future__ import annotations

USAGE = "usage: tunelab train [config.yaml] [key=value ...] [--key value ...]"
SECTIONS = ("model", "quantization", "adapter", "data", "train")


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        from tunelab.config.help import format_help

        print(format_help("train", USAGE, SECTIONS))
        return 0
    from tunelab.config import load_config
    from tunelab.utils.logging import setup_logging

    cfg = load_config(argv)  # validated before anything heavy is imported
    setup_logging()
    from tunelab.train.workflow import run_train

    run_train(cfg)
    return 0
