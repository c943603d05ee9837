"""The Train tab: every key `tunelab train` reads (from the one schema, grouped by section, with default and help),
the YAML that will run and the equivalent command, the memory estimate when tunelab.estimate exists, and
Start / Stop / Resume of an ordinary `tunelab train` process (tunelab.webui.runs) with live progress and loss
curves read from its trainer_log.jsonl. A page reload or a second browser reattaches to a run still training."""
from __future__ import annotations

import os
import shlex
from typing import Any

from tunelab.webui import runs
from tunelab.webui.locale import t
from tunelab.webui.ui import Page, collect, sentence, shown_value

TRAIN_SECTIONS = ("model", "quantization", "adapter", "data", "train")
MAIN_KEYS = ("output_dir", "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
             "gradient_accumulation_steps", "lora_rank", "logging_steps", "save_steps", "eval_strategy", "eval_steps",
             "overwrite_output_dir")
FIXED = {"stage": "sft", "do_train": True}  # what a web UI run is: supervised fine-tuning, training on


def train_keys(page: Page) -> list[str]:
    """The page's widgets for the keys of `tunelab train`'s sections, in page order."""
    from tunelab.config.parse import FIELDS

    return [k for k in page.fields if FIELDS[k][0] in TRAIN_SECTIONS and k not in FIXED]


def build(page: Page, defaults: dict[str, Any]) -> dict[str, Any]:
    import gradio as gr

    from tunelab.config.parse import FIELDS

    c: dict[str, Any] = {}
    with page.keep(gr.Accordion(page.text("main_settings", page.lang), open=True), label="main_settings"):
        with gr.Row():
            for key in MAIN_KEYS[:6]:
                page.field(key, defaults.get(key))
        with gr.Row():
            for key in MAIN_KEYS[6:]:
                page.field(key, defaults.get(key))
    for section in TRAIN_SECTIONS:
        rest = [k for k, (s, _, _) in FIELDS.items() if s == section and k not in page.fields and k not in FIXED]
        if not rest:
            continue
        with page.keep(gr.Accordion(page.text(f"section_{section}", page.lang), open=False), label=f"section_{section}"):
            for i in range(0, len(rest), 4):
                with gr.Row():
                    for key in rest[i:i + 4]:
                        page.field(key, defaults.get(key))
    c["estimate"] = gr.Markdown("", elem_id="train-estimate", visible=estimate_available())
    with gr.Row():
        c["preview_btn"] = page.add(gr.Button, {"value": "yaml_preview"}, elem_id="yaml-btn")
        c["start"] = page.add(gr.Button, {"value": "start"}, variant="primary", elem_id="start-btn")
        c["stop"] = page.add(gr.Button, {"value": "stop"}, variant="stop", elem_id="stop-btn")
        c["resume"] = page.add(gr.Button, {"value": "resume"}, elem_id="resume-btn")
    c["status"] = gr.Markdown("", elem_id="train-status")
    c["progress"] = gr.Markdown("", elem_id="train-progress")
    c["plot"] = page.add(gr.LinePlot, {"label": "loss_plot"}, x="step", y="value", color="series", height=260,
                         elem_id="loss-plot")
    with gr.Row():
        c["yaml"] = page.add(gr.Code, {"label": "yaml_label"}, language="yaml", elem_id="train-yaml")
        with gr.Column():
            c["command"] = page.add(gr.Textbox, {"label": "command_label"}, lines=3, elem_id="train-command")
            c["download"] = page.add(gr.File, {"label": "yaml_download"}, elem_id="yaml-download")
    c["output"] = page.add(gr.Textbox, {"label": "train_log"}, lines=8, max_lines=8, elem_id="train-output")
    c["timer"] = gr.Timer(1.0, active=False)
    return c


def train_config(keys: list[str], values: list[Any], panel_values: dict[str, Any]) -> dict[str, Any]:
    """The run's config: the panel's model settings and every widget that differs from its default, validated
    by the one parser (a bad value is its ConfigError sentence), in schema order."""
    from tunelab.config.parse import FIELDS, build_config

    given = {**panel_values, **collect(keys, values), **FIXED}
    if "output_dir" not in given:
        given["output_dir"] = FIELDS["output_dir"][1].default
    cfg = build_config(given, source="the web UI")
    return {k: cfg.given[k] for k in FIELDS if k in cfg.given}


def command_text(config: dict[str, Any]) -> str:
    yaml_path = os.path.join(config["output_dir"], runs.CONFIG_FILE)
    flat = " ".join(shlex.quote(f"{k}={v}") for k, v in config.items())
    return f"tunelab train {shlex.quote(yaml_path)}\n# or, without the file:\ntunelab train {flat}"


def estimate_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("tunelab.estimate") is not None
    except (ImportError, ValueError):
        return False


def estimate_text(config: dict[str, Any]) -> str:
    """tunelab.estimate's table for this config and, on a GPU, the free memory it must fit in; '' without it."""
    try:
        from tunelab.estimate import estimate
        from tunelab.estimate.from_config import setup_from_config
        from tunelab.estimate.report import table
    except ImportError:
        return ""
    try:
        from tunelab.config.parse import build_config

        shape, setup, notes = setup_from_config(build_config(config, source="the web UI"))
        text = table(estimate(shape, setup))
        if runs.current_device().startswith("cuda"):
            from tunelab.estimate.runtime import free_gpu_bytes

            text += f"\nfree on this GPU now: {free_gpu_bytes() / 2**30:.2f} GiB"
        return "```\n" + "\n".join([text, *notes]) + "\n```"
    except Exception as exc:  # noqa: BLE001 - the estimate is a hint; its failure is a sentence, not a stop
        return sentence(exc, "en")


def wire(page: Page, c: dict[str, Any], panel, lang: Any) -> None:
    import gradio as gr

    keys = train_keys(page)
    fields = [page.fields[k] for k in keys]
    out_dir = page.fields["output_dir"]
    n_panel = len(panel.inputs)

    def split(values):
        from tunelab.webui.model_panel import panel_values

        return panel_values(list(values[:n_panel])), list(values[n_panel:])

    def show(language, *values):
        try:
            pv, fv = split(values)
            config = train_config(keys, fv, pv)
            import yaml

            text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
            path = os.path.join(_scratch(), runs.CONFIG_FILE)
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
            estimate = estimate_text(config) if estimate_available() else ""
            if estimate:
                estimate = f"**{t('estimate', language)}**\n\n{estimate}"
            return "", text, command_text(config), path, estimate
        except Exception as exc:  # noqa: BLE001
            return sentence(exc, language), "", "", None, ""

    def start(language, saves_dir, *values, resume=False):
        try:
            pv, fv = split(values)
            config = train_config(keys, fv, pv)
            if resume:
                config.pop("overwrite_output_dir", None)
                config["resume_from_checkpoint"] = True
            info = runs.start_run(config, saves_dir or "saves", busy_message=lambda r: t(
                "run_busy", language, device=r.get("device"), out=r["output_dir"], pid=r.get("pid")))
            return t("run_started", language, pid=info["pid"], out=config["output_dir"]), gr.Timer(active=True)
        except Exception as exc:  # noqa: BLE001
            return sentence(exc, language), gr.Timer(active=False)

    def resume(language, saves_dir, *values):
        return start(language, saves_dir, *values, resume=True)

    def stop(language, output_dir):
        if runs.stop_run(output_dir or ""):
            return t("stop_sent", language), gr.Timer(active=True)
        return t("nothing_running", language, out=output_dir), gr.Timer(active=False)

    inputs = [lang, *panel.inputs, *fields]
    c["preview_btn"].click(show, inputs, [c["status"], c["yaml"], c["command"], c["download"], c["estimate"]])
    run_inputs = [lang, panel.saves_dir, *panel.inputs, *fields]
    c["start"].click(start, run_inputs, [c["status"], c["timer"]])
    c["resume"].click(resume, run_inputs, [c["status"], c["timer"]])
    c["stop"].click(stop, [lang, out_dir], [c["status"], c["timer"]])
    c["timer"].tick(tick, [lang, out_dir], [c["progress"], c["plot"], c["output"], c["timer"]], show_progress="hidden")


def _scratch() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="tunelab-webui-")


def tick(lang: str, output_dir: str):
    """Progress of the run in output_dir, its loss curves and output; the timer stops once the run has ended."""
    import gradio as gr

    state = runs.run_state(output_dir or "")
    return progress_text(state, lang), loss_frame(state), state.output_tail[-3000:], gr.Timer(active=state.running)


def progress_text(state: runs.RunState, lang: str) -> str:
    last = state.last
    lines = []
    if last:
        parts = [t("step_line", lang, step=last.get("current_steps", 0), total=last.get("total_steps", 0),
                   pct=float(last.get("percentage", 0.0)))]
        for key, fmt in (("loss", "loss {:.4f}"), ("lr", "lr {:.2e}"), ("tokens_per_second", "{:.0f} tok/s"),
                         ("gpu_memory_gib", "GPU {:.2f} GiB")):
            if isinstance(last.get(key), (int, float)):
                parts.append(fmt.format(last[key]))
        evals = [r["eval_loss"] for r in state.records if isinstance(r.get("eval_loss"), (int, float))]
        if evals:
            parts.append(f"eval_loss {evals[-1]:.4f}")
        parts.append(t("eta", lang, elapsed=last.get("elapsed_time", "?"), remaining=last.get("remaining_time", "?")))
        lines.append(" | ".join(parts))
    if state.running:
        lines.append(t("run_running", lang, pid=state.pid) if last else t("run_waiting", lang))
    elif state.end == "done":
        lines.append(t("run_done", lang, out=state.output_dir))
    elif state.end == "stopped":
        ckpt = os.path.join(state.output_dir, f"checkpoint-{state.stopped_step}")
        lines.append(t("run_stopped", lang, step=state.stopped_step, ckpt=ckpt))
    elif state.end == "failed":
        lines.append(t("run_failed", lang, error=state.message))
    return "\n\n".join(lines)


def loss_frame(state: runs.RunState):
    import pandas as pd

    rows = [{"step": int(r["current_steps"]), "value": float(r[k]), "series": k}
            for r in state.records for k in ("loss", "eval_loss") if isinstance(r.get(k), (int, float))]
    return pd.DataFrame(rows, columns=["step", "value", "series"])


def reattach(page: Page, lang: str, saves_dir: str, output_dir: str) -> tuple[str | None, dict[str, Any]]:
    """(output_dir of the newest live run under saves_dir or in output_dir, its YAML values), or (None, {})."""
    import yaml

    live = runs.find_live_runs(saves_dir or "saves", extra=(output_dir,) if output_dir else ())
    if not live:
        return None, {}
    run = live[0]
    try:
        with open(os.path.join(run["output_dir"], runs.CONFIG_FILE), encoding="utf-8") as fh:
            config = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError):
        config = {}
    values = {k: shown_value(k, v) for k, v in config.items() if k in page.fields}
    for key in ("dataset", "eval_dataset"):  # multi-selects: the comma list as a list
        if key in values:
            values[key] = [v.strip() for v in values[key].split(",") if v.strip()]
    return run["output_dir"], values
