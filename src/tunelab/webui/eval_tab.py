"""The Evaluate tab: `tunelab eval`'s tasks (predict with BLEU / ROUGE, perplexity on an evaluation set,
mmlu / cmmlu / ceval from task_dir) on the model panel's model, and the compare report (table + chart) of two
result folders, all through tunelab.eval's own functions. The evaluation set is the Data tab's eval_dataset; predict
generates with the Chat tab's generation keys (do_sample, max_new_tokens, ...), as the Data tab's keys are shared."""
from __future__ import annotations

import json
import os
from typing import Any

from tunelab.webui.chat_tab import GEN_KEYS
from tunelab.webui.locale import t
from tunelab.webui.ui import Page, collect, run_logged, sentence

TASKS = ["perplexity", "predict", "mmlu", "cmmlu", "ceval"]
EVAL_KEYS = ("task_dir", "n_shot", "lang", "batch_size", "eval_split", "save_dir")
SHARED_DATA_KEYS = ("dataset_dir", "eval_dataset", "cutoff_len", "max_samples")
# The Chat tab's generation fields (its system prompt aside: predict's prompts are the dataset's conversations).
SHARED_GEN_KEYS = tuple(k for k in GEN_KEYS if k != "system")


def build(page: Page, defaults: dict[str, Any]) -> dict[str, Any]:
    import gradio as gr

    c: dict[str, Any] = {}
    with gr.Row():
        c["task"] = page.add(gr.Dropdown, {"info": ("help", "task")}, label="task", choices=TASKS,
                             value=defaults.get("task") or "perplexity", allow_custom_value=True, elem_id="field-task")
        page.fields["task"] = c["task"]
        for key in EVAL_KEYS:
            value = defaults.get(key)
            if key == "save_dir" and value is None:
                value = os.path.join("saves", "eval")
            c[key] = page.field(key, value)
    c["run"] = page.add(gr.Button, {"value": "eval_run"}, variant="primary", elem_id="eval-run")
    c["status"] = gr.Markdown("", elem_id="eval-status")
    c["log"] = gr.Textbox("", lines=4, max_lines=6, show_label=False, elem_id="eval-log")
    c["metrics"] = gr.JSON(None, elem_id="eval-metrics")
    with page.keep(gr.Accordion(page.text("compare_run", page.lang), open=False), label="compare_run"):
        with gr.Row():
            c["a"] = page.add(gr.Textbox, {"label": "compare_a"}, elem_id="compare-a")
            c["b"] = page.add(gr.Textbox, {"label": "compare_b"}, elem_id="compare-b")
            c["out"] = page.add(gr.Textbox, {"label": "compare_out"}, value=os.path.join("saves", "compare"), elem_id="compare-out")
        c["compare"] = page.add(gr.Button, {"value": "compare_run"}, elem_id="compare-btn")
        c["report"] = gr.Markdown("", elem_id="compare-report")
        c["chart"] = gr.Image(None, type="filepath", show_label=False, visible=False, elem_id="compare-chart")
    return c


def wire(page: Page, c: dict[str, Any], panel, lang: Any) -> None:
    import gradio as gr

    shared = [k for k in (*SHARED_DATA_KEYS, *SHARED_GEN_KEYS) if k in page.fields]
    data = [page.fields[k] for k in shared]
    keys = ["task", *EVAL_KEYS, *shared]
    n_panel = len(panel.inputs)

    def run(language, *values):
        from tunelab.webui.model_panel import panel_values

        try:
            from tunelab.config.parse import build_config

            given = {k: v for k, v in panel_values(list(values[:n_panel])).items() if k != "finetuning_type"}
            given.update(collect(keys, list(values[n_panel:])))
            given["task"] = (values[n_panel] or "").strip()
            cfg = build_config(given, source="the web UI")
        except Exception as exc:  # noqa: BLE001
            yield sentence(exc, language), "", None
            return
        from tunelab.eval import output_dir_of, run_eval

        for log, result, error in run_logged(lambda: run_eval(cfg)):
            if error is not None:
                yield sentence(error, language), log, None
            elif result is not None:
                yield t("eval_done", language, out=output_dir_of(cfg)), log, json.loads(json.dumps(result, default=str))
            else:
                yield "...", log, None

    def compare(language, a, b, out):
        from tunelab.eval.compare import compare as compare_folders

        try:
            result = compare_folders((a or "").strip(), (b or "").strip(), (out or "").strip() or "compare")
            with open(result["report"], encoding="utf-8") as fh:
                report = fh.read()
            chart = result.get("chart")
            return report, gr.update(value=chart, visible=bool(chart))
        except Exception as exc:  # noqa: BLE001
            return sentence(exc, language), gr.update(value=None, visible=False)

    c["run"].click(run, [lang, *panel.inputs, c["task"], *[c[k] for k in EVAL_KEYS], *data],
                   [c["status"], c["log"], c["metrics"]])
    c["compare"].click(compare, [lang, c["a"], c["b"], c["out"]], [c["report"], c["chart"]])
