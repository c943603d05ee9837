"""tunelab: LoRA / QLoRA fine-tuning of Qwen-family (and other Hugging Face causal) language models.

Notebook entry point:

    import tunelab
    tunelab.run({"model_name_or_path": "...", "do_train": True, "dataset": "alpaca_gpt4_zh", "output_dir": "saves/x"})

Nothing heavy is imported here, so `tunelab --help` stays fast.
"""
from __future__ import annotations

from typing import Any, Mapping

__version__ = "0.1.0"


def run(config: Mapping[str, Any], command: str = "train") -> Any:
    """Run a tunelab command from a dict of LLaMA-Factory-style keys (the same keys as a YAML file)."""
    if command != "train":
        raise ValueError(f"tunelab.run supports command='train' only, got {command!r}")
    from tunelab.config import load_config
    from tunelab.train.workflow import run_train

    return run_train(load_config(dict(config)))
