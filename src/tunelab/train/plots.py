"""Loss curves from trainer_log.jsonl: training_loss.png (raw + smoothed) and training_eval_loss.png."""
from __future__ import annotations

import math
import os

from tunelab.utils.io import honour_umask, read_jsonl as read_log


def adaptive_weight(n: int) -> float:
    """LLaMA-Factory's smoothing weight for a curve of n points: 1.8 * (sigmoid(0.05 n) - 0.5), from 0 for a few
    points towards 0.9 for hundreds, so a short run's smoothed curve does not lag far behind its raw loss."""
    return 1.8 * (1.0 / (1.0 + math.exp(-0.05 * n)) - 0.5)


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """Exponential moving average starting at the first value, as LLaMA-Factory's plot: weight None = adaptive."""
    if not values:
        return []
    w = adaptive_weight(len(values)) if weight is None else weight
    out, last = [], values[0]
    for v in values:
        last = last * w + (1 - w) * v
        out.append(last)
    return out


def plot_loss(output_dir: str, keys: tuple[str, ...] = ("loss", "eval_loss"), smoothing: float | None = None) -> list[str]:
    """Write one PNG per key present in the log; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(os.path.join(output_dir, "trainer_log.jsonl"))
    written = []
    for key in keys:
        points = [(r["current_steps"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if not points:
            continue
        steps, values = zip(*points)
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
        ax.plot(steps, values, color="#1f77b4", alpha=0.35 if key == "loss" else 1.0, label="original", marker=None if key == "loss" else "o")
        if key == "loss" and len(values) > 1:
            ax.plot(steps, smooth(list(values), smoothing), color="#1f77b4", label="smoothed")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(f"{key} of {os.path.basename(os.path.abspath(output_dir))}")
        ax.legend()
        ax.grid(alpha=0.3)
        name = "training_loss.png" if key == "loss" else f"training_{key}.png"
        path = os.path.join(output_dir, name)
        fig.tight_layout()
        fig.savefig(path + ".tmp.png")
        plt.close(fig)
        os.replace(path + ".tmp.png", path)
        honour_umask(path)
        written.append(path)
    return written
