"""`tunelab eval compare A B [--out DIR] [--samples N]`: the before/after report of two evaluations.

    tunelab eval compare saves/eval-base saves/eval-lora --out saves/compare

A and B are eval output folders (holding predict_results.json, perplexity_results.json and/or results.json), or
config files of evaluations to run first (their output_dir / save_dir is then read). Writes into DIR:
- compare.md: a Markdown table of every metric both have (A, B, B - A, relative change), and, when both folders
  have generated_predictions.jsonl, the answers of A and B side by side for the first N prompts they share (in A's
  order, so the list is the same every time for the same data).
- compare.png: a bar chart of the quality metrics both have (one panel each: their scales differ).
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from typing import Any

from tunelab.errors import TunelabError

logger = logging.getLogger(__name__)

USAGE = "usage: tunelab eval compare A B [--out DIR] [--samples N]   (A, B: eval output folders or eval configs)"
RESULT_FILES = ("predict_results.json", "perplexity_results.json", "results.json")
LOWER_IS_BETTER = ("nll", "perplexity")
QUALITY_PREDICT = ("predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_exact_match")


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise TunelabError(f"cannot read {path}: {exc}.") from None
    if not isinstance(data, dict):
        raise TunelabError(f"{path} does not hold a JSON object of results.")
    return data


def folder_metrics(folder: str) -> dict[str, tuple[float, bool]]:
    """metric name -> (value, is a quality metric) from the result files of one eval output folder."""
    if not os.path.isdir(folder):
        raise TunelabError(f"'{folder}' is not a folder: give an eval output folder (or an eval config file).")
    found: dict[str, tuple[float, bool]] = {}
    path = os.path.join(folder, "predict_results.json")
    if os.path.isfile(path):
        for key, value in _read_json(path).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                found[key] = (float(value), key in QUALITY_PREDICT)
    path = os.path.join(folder, "perplexity_results.json")
    if os.path.isfile(path):
        data = _read_json(path)
        for key in ("nll", "perplexity", "tokens"):
            if isinstance(data.get(key), (int, float)):
                found[key] = (float(data[key]), key != "tokens")
    path = os.path.join(folder, "results.json")
    if os.path.isfile(path):
        data = _read_json(path)
        task = data.get("task", "choice")
        if isinstance(data.get("accuracy"), (int, float)):
            found[f"{task} accuracy"] = (float(data["accuracy"]), True)
        for name, info in (data.get("categories") or {}).items():
            if isinstance(info, dict) and isinstance(info.get("accuracy"), (int, float)):
                found[f"{task} {name}"] = (float(info["accuracy"]), True)
    if not found:
        raise TunelabError(f"'{folder}' holds no evaluation results (looked for {', '.join(RESULT_FILES)}); run "
                           "`tunelab eval` with output_dir (or save_dir) set to it first.")
    return found


def _fmt(value: float) -> str:
    """Large values with thousands separators, others with up to 4 decimals and no trailing zeros."""
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 1e5:
        return f"{value:,.0f}"
    return f"{value:.4f}".rstrip("0").rstrip(".")


def metrics_table(a: dict[str, tuple[float, bool]], b: dict[str, tuple[float, bool]], names: tuple[str, str]) -> tuple[list[list[str]], list[str]]:
    """Rows (metric, A, B, B - A, relative change) for the metrics both have, and the names of those only one has."""
    rows = []
    for key in [k for k in a if k in b]:
        va, vb = a[key][0], b[key][0]
        delta = vb - va
        rel = f"{100 * delta / abs(va):+.2f}%" if va != 0 and math.isfinite(va) and math.isfinite(vb) else "n/a"
        label = f"{key} (lower is better)" if key in LOWER_IS_BETTER else key
        rows.append([label, _fmt(va), _fmt(vb), ("+" if delta >= 0 else "") + _fmt(delta), rel])
    only = sorted(set(a) ^ set(b))
    return rows, only


def _read_predictions(folder: str) -> list[dict[str, Any]] | None:
    path = os.path.join(folder, "generated_predictions.jsonl")
    if not os.path.isfile(path):
        return None
    out = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    raise TunelabError(f"{path}:{line_no} is not valid JSON.") from None
    return out


def side_by_side(a_dir: str, b_dir: str, samples: int) -> list[dict[str, str]]:
    """The first `samples` prompts (in A's order) that both prediction files have, with both answers."""
    a, b = _read_predictions(a_dir), _read_predictions(b_dir)
    if not a or not b:
        return []
    b_by_prompt = {row.get("prompt"): row for row in b}
    out = []
    for row in a:
        other = b_by_prompt.get(row.get("prompt"))
        if other is not None:
            out.append({"prompt": row.get("prompt", ""), "label": row.get("label", ""),
                        "a": row.get("predict", ""), "b": other.get("predict", "")})
        if len(out) >= samples:
            break
    return out


def _block(text: str, limit: int = 800) -> str:
    text = str(text)
    if len(text) > limit:
        text = "…" + text[-limit:]  # the end of a prompt is the question being answered
    return "```text\n" + text.replace("```", "`\u200b``") + "\n```"


def render_markdown(names: tuple[str, str], dirs: tuple[str, str], rows: list[list[str]], only: list[str],
                    pairs: list[dict[str, str]], chart: str | None) -> str:
    lines = [f"# {names[0]} vs {names[1]}", "", f"- A: `{dirs[0]}`", f"- B: `{dirs[1]}`", ""]
    header = ["metric", f"A: {names[0]}", f"B: {names[1]}", "B - A", "relative"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * 1 + "---:|" * 4]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if only:
        lines += ["", f"Only in one of them (not compared): {', '.join(only)}."]
    if chart:
        lines += ["", f"![metrics]({os.path.basename(chart)})"]
    if pairs:
        lines += ["", f"## Answers side by side ({len(pairs)} prompts)"]
        for k, p in enumerate(pairs, 1):
            lines += ["", f"### {k}", "", "Prompt:", "", _block(p["prompt"]), "", "Reference:", "", _block(p["label"]),
                      "", f"A ({names[0]}):", "", _block(p["a"]), "", f"B ({names[1]}):", "", _block(p["b"])]
    return "\n".join(lines) + "\n"


def plot_metrics(a: dict[str, tuple[float, bool]], b: dict[str, tuple[float, bool]], names: tuple[str, str], path: str) -> str | None:
    """A PNG with one small bar panel (A, B) per quality metric both have; None when there is none."""
    keys = [k for k in a if k in b and a[k][1] and math.isfinite(a[k][0]) and math.isfinite(b[k][0])]
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        values = [a[key][0], b[key][0]]
        bars = ax.bar([names[0], names[1]], values, color=["#8c8c8c", "#1f77b4"])
        ax.bar_label(bars, labels=[_fmt(v) for v in values], fontsize=8)
        ax.set_title(key + (" (lower is better)" if key in LOWER_IS_BETTER else ""), fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        ax.margins(y=0.15)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _names(a_dir: str, b_dir: str) -> tuple[str, str]:
    na, nb = (os.path.basename(os.path.normpath(d)) for d in (a_dir, b_dir))
    return (na, nb) if na != nb else ("A", "B")


def compare(a_dir: str, b_dir: str, out_dir: str, samples: int = 5) -> dict[str, Any]:
    """Write compare.md and compare.png into out_dir; return the table rows and paths."""
    from tunelab.utils.io import atomic_write_text

    a, b = folder_metrics(a_dir), folder_metrics(b_dir)
    names = _names(a_dir, b_dir)
    rows, only = metrics_table(a, b, names)
    if not rows:
        raise TunelabError(f"'{a_dir}' and '{b_dir}' have no metric in common ({', '.join(a)} vs {', '.join(b)}): "
                           "run the same eval task on both.")
    os.makedirs(out_dir, exist_ok=True)
    chart = plot_metrics(a, b, names, os.path.join(out_dir, "compare.png"))
    pairs = side_by_side(a_dir, b_dir, samples)
    markdown = render_markdown(names, (a_dir, b_dir), rows, only, pairs, chart)
    report = os.path.join(out_dir, "compare.md")
    atomic_write_text(report, markdown)
    return {"rows": rows, "only": only, "report": report, "chart": chart, "side_by_side": len(pairs)}


def _as_folder(arg: str) -> str:
    """An eval output folder as is; an eval config file is run first and its output folder returned."""
    if os.path.isfile(arg) and arg.endswith((".yaml", ".yml", ".json")):
        from tunelab.config import load_config
        from tunelab.eval import for_training_config, output_dir_of, run_eval

        cfg = for_training_config(load_config(arg))  # a training config: its adapter, into <output_dir>/eval_<task>
        logger.info("running the evaluation of %s first", arg)
        run_eval(cfg)
        return output_dir_of(cfg)
    return arg


def main(argv: list[str]) -> int:
    args, out, samples = [], "eval_compare", 5
    i = 0
    while i < len(argv):
        if argv[i] in ("--out", "--samples") and i + 1 < len(argv):
            if argv[i] == "--out":
                out = argv[i + 1]
            else:
                try:
                    samples = int(argv[i + 1])
                except ValueError:
                    raise TunelabError(f"--samples needs a whole number, got {argv[i + 1]!r}.") from None
            i += 2
            continue
        if argv[i].startswith("--"):
            raise TunelabError(f"unknown option {argv[i]}. {USAGE}")
        args.append(argv[i])
        i += 1
    if len(args) != 2:
        raise TunelabError(f"compare needs two eval output folders (or configs), got {len(args)}. {USAGE}")
    result = compare(_as_folder(args[0]), _as_folder(args[1]), out, samples)
    print(open(result["report"], encoding="utf-8").read().split("\n## ")[0])
    print(f"report: {result['report']}" + (f"\nchart: {result['chart']}" if result["chart"] else ""))
    return 0
