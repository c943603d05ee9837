"""Logging set-up for the CLI: plain `tunelab: message` lines on stderr, one logger per module elsewhere."""
from __future__ import annotations

import logging
import os
import sys
import warnings


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the moment of each record (not the object seen at set-up), so a
    notebook, a test harness or a caller that swaps stderr never gets a write to a closed stream."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger("tunelab")
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[tunelab] %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    # Library chatter that users cannot act on goes quiet; real warnings from transformers stay.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt: inputs will be cast.*")
    # deprecation notices addressed to library developers, not to users of a finished command
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|accelerate)\..*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
