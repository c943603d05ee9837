"""Finding the adapter a user means, and the settings it was trained with.

    pick_checkpoint("saves/run", "best")      # -> "saves/run/checkpoint-40" (lowest eval_loss in trainer_log.jsonl)
    adapter_dir("saves/run", checkpoint=None) # -> "saves/run" (the final adapter), or a checkpoint when given
    training_settings("saves/run/checkpoint-40")  # -> the run's tunelab_config.yaml as a dict, or None

Chat, eval, the server and export all read adapters through here, so `checkpoint: best` means the same everywhere.
A checkpoint counts when it holds an adapter (adapter_config.json plus weights); tunelab's completion marker is
not required, so LLaMA-Factory run folders work too.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any

from tunelab.errors import ConfigError, ModelError

_CKPT = re.compile(r"^checkpoint-(\d+)$")
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def is_adapter_dir(path: str) -> bool:
    """Whether `path` holds a PEFT adapter (config and weights)."""
    return os.path.isfile(os.path.join(path, "adapter_config.json")) and any(
        os.path.isfile(os.path.join(path, name)) for name in ADAPTER_WEIGHT_FILES
    )


def adapter_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the checkpoint-N folders of a run that hold an adapter, oldest first."""
    from tunelab.utils.checkpoints import list_checkpoints

    return [(step, path) for step, path in list_checkpoints(run_dir, complete_only=False) if is_adapter_dir(path)]


def run_dir_of(path: str) -> str:
    """The run folder of a path that is a run folder or one of its checkpoint-N folders."""
    if _CKPT.match(os.path.basename(os.path.normpath(path))):
        return os.path.dirname(os.path.normpath(path))
    return path


def best_step(log_path: str, metric: str = "eval_loss") -> tuple[int, float]:
    """(step, value) of the lowest `metric` in a trainer_log.jsonl (ties: the earliest step)."""
    from tunelab.utils.io import read_jsonl as read_log

    if not os.path.isfile(log_path):
        raise ConfigError(
            f"checkpoint: best needs the run's trainer_log.jsonl, but '{log_path}' does not exist. "
            "Give the run folder (the output_dir of training) as adapter_name_or_path, or name a checkpoint."
        )
    points = [
        (int(r["current_steps"]), float(r[metric]))
        for r in read_log(log_path)
        if isinstance(r.get(metric), (int, float)) and "current_steps" in r and math.isfinite(r[metric])
    ]
    if not points:
        raise ConfigError(
            f"checkpoint: best looks for the lowest {metric} in '{log_path}', which has no {metric} record: the run "
            "did not evaluate. Train with eval_strategy: steps and val_size or eval_dataset, or use checkpoint: last."
        )
    return min(points, key=lambda p: (p[1], p[0]))


def pick_checkpoint(run_dir: str, which: str) -> str:
    """The adapter folder for `checkpoint`: best (lowest eval_loss), last (highest step), checkpoint-N or N."""
    run_dir = run_dir_of(run_dir)
    if not os.path.isdir(run_dir):
        raise ModelError(f"adapter folder '{run_dir}' does not exist; check adapter_name_or_path.")
    ckpts = adapter_checkpoints(run_dir)
    have = ", ".join(os.path.basename(p) for _, p in ckpts) or "none"
    key = which.strip().lower()
    if key == "last":
        if not ckpts:
            raise ModelError(f"checkpoint: last, but run folder '{run_dir}' holds no checkpoint-N folder with an adapter.")
        return ckpts[-1][1]
    if key == "best":
        step, value = best_step(os.path.join(run_dir, "trainer_log.jsonl"))
        for s, path in ckpts:
            if s == step:
                return path
        raise ModelError(
            f"checkpoint: best is step {step} (eval_loss {value:.4f}), but run folder '{run_dir}' has no "
            f"checkpoint-{step} with an adapter (found: {have}). Save checkpoints at evaluation steps "
            "(save_steps a multiple of eval_steps) or name a checkpoint."
        )
    m = re.fullmatch(r"(?:checkpoint-)?(\d+)", key)
    if not m:
        raise ConfigError(f"checkpoint={which!r} is not valid: expected best, last, or a checkpoint name like checkpoint-500.")
    for s, path in ckpts:
        if s == int(m.group(1)):
            return path
    raise ModelError(f"checkpoint-{m.group(1)} with an adapter is not in run folder '{run_dir}' (found: {have}).")


def adapter_dir(path: str, checkpoint: str | None = None) -> str:
    """The adapter folder a user means: a checkpoint of a run when `checkpoint` is set, else the folder itself
    (a run folder means its final adapter). Raises ModelError naming what was expected and found."""
    if checkpoint:
        return pick_checkpoint(path, checkpoint)
    if is_adapter_dir(path):
        return path
    if not os.path.exists(path):
        raise ModelError(
            f"adapter folder '{path}' does not exist: expected a folder with adapter_config.json and "
            "adapter_model.safetensors (a training output_dir or one of its checkpoint-N folders)."
        )
    if not os.path.isdir(path):
        raise ModelError(f"adapter '{path}' is a file: expected a folder with adapter_config.json and adapter_model.safetensors.")
    ckpts = adapter_checkpoints(path)
    if ckpts:  # a run that was stopped before its final save
        return ckpts[-1][1]
    found = sorted(os.listdir(path))
    shown = ", ".join(found[:8]) + (", ..." if len(found) > 8 else "") if found else "an empty folder"
    raise ModelError(
        f"adapter folder '{path}' holds no adapter: expected adapter_config.json and adapter_model.safetensors "
        f"(or checkpoint-N folders holding them), found {shown}."
    )


def training_settings(adapter_path: str) -> dict[str, Any] | None:
    """The `config` and `resolved` sections of the tunelab_config.yaml saved by the run that made this adapter
    (in the adapter folder or, for a checkpoint, its run folder); None when there is none (e.g. another tool)."""
    import yaml

    for folder in (adapter_path, run_dir_of(adapter_path)):
        path = os.path.join(folder, "tunelab_config.yaml")
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as fh:
                    doc = yaml.safe_load(fh) or {}
            except (OSError, yaml.YAMLError):
                return None
            if isinstance(doc, dict):
                return {"config": doc.get("config") or {}, "given": doc.get("given") or {}, "resolved": doc.get("resolved") or {}}
    return None
