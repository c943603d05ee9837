"""Finding and marking checkpoints so that a run killed at any moment resumes from a complete one.

The Trainer writes `checkpoint-N/` file by file; a kill in the middle leaves a folder that looks like a
checkpoint but is not one. tunelab writes a marker file (`COMPLETE_MARKER`) as the very last step of a save, and
only checkpoints holding it count as resumable. (A kill between the last file and the marker costs one
checkpoint interval, never a broken resume.)
"""
from __future__ import annotations

import os
import re

COMPLETE_MARKER = "tunelab_checkpoint_complete"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str, *, complete_only: bool = True) -> list[tuple[int, str]]:
    """(step, path) of the checkpoints in output_dir, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _CKPT.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isdir(path) and (not complete_only or os.path.isfile(os.path.join(path, COMPLETE_MARKER))):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


def incomplete_checkpoints(output_dir: str) -> list[str]:
    complete = {p for _, p in list_checkpoints(output_dir)}
    return [p for _, p in list_checkpoints(output_dir, complete_only=False) if p not in complete]


def mark_complete(checkpoint_dir: str) -> None:
    path = os.path.join(checkpoint_dir, COMPLETE_MARKER)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("ok\n")
        fh.flush()
        os.fsync(fh.fileno())
