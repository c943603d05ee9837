"""The Export tab: pick a run's checkpoint (the best by eval loss marked), merge it into the base model with
`tunelab export`'s own function (tunelab.export.run_export: streaming merge, verification, written to a temporary
folder renamed at the end), its progress lines shown as it goes and its refusals shown as sentences."""
from __future__ import annotations

import os
from typing import Any

from tunelab.webui.locale import t
from tunelab.webui.model_panel import run_choices
from tunelab.webui.ui import Page, collect, run_logged, sentence

EXPORT_KEYS = ("export_dir", "export_dtype", "export_base", "export_size", "export_ollama", "overwrite", "export_verify")


def build(page: Page, defaults: dict[str, Any], saves_dir: str) -> dict[str, Any]:
    import gradio as gr

    c: dict[str, Any] = {}
    with gr.Row():
        c["adapter"] = page.add(gr.Dropdown, {"label": "run_picker", "info": "run_picker_help"},
                                choices=run_choices(saves_dir, page.lang), value="", allow_custom_value=True,
                                elem_id="export-adapter", scale=3)
        c["refresh"] = page.add(gr.Button, {"value": "refresh"}, size="sm", scale=0, elem_id="export-refresh")
    for i in range(0, len(EXPORT_KEYS), 4):
        with gr.Row():
            for key in EXPORT_KEYS[i:i + 4]:
                value = defaults.get(key)
                if key == "export_dir" and value is None:
                    value = os.path.join("saves", "merged")
                c[key] = page.field(key, value)
    c["run"] = page.add(gr.Button, {"value": "export_run"}, variant="primary", elem_id="export-run")
    c["status"] = gr.Markdown("", elem_id="export-status")
    c["log"] = gr.Textbox("", lines=6, max_lines=8, show_label=False, elem_id="export-log")
    return c


def wire(c: dict[str, Any], panel, lang: Any) -> None:
    import gradio as gr

    def refresh(saves_dir, current, language):
        return gr.update(choices=run_choices(saves_dir, language), value=current)

    c["refresh"].click(refresh, [panel.saves_dir, c["adapter"], lang], [c["adapter"]])
    panel.picker.change(lambda v: v, [panel.picker], [c["adapter"]])
    n_panel = len(panel.inputs)

    def run(language, adapter, *values):
        from tunelab.webui.model_panel import panel_values

        try:
            from tunelab.config.parse import build_config
            from tunelab.errors import ConfigError

            given = {k: v for k, v in panel_values(list(values[:n_panel])).items() if k != "finetuning_type"}
            given.update(collect(list(EXPORT_KEYS), list(values[n_panel:])))
            if not adapter:
                raise ConfigError("no checkpoint / adapter chosen: pick the run (or checkpoint) to merge.")
            given["adapter_name_or_path"] = adapter
            given.setdefault("export_dir", os.path.join("saves", "merged"))
            cfg = build_config(given, source="the web UI")
        except Exception as exc:  # noqa: BLE001
            yield sentence(exc, language), ""
            return
        from tunelab.export import run_export

        for log, result, error in run_logged(lambda: run_export(cfg)):
            if error is not None:
                yield sentence(error, language), log
            elif result is not None:
                files = ", ".join(sorted(os.listdir(result.export_dir)))
                line = f"\n\n{result.parity.line()}" if result.parity is not None else ""
                yield t("export_done", language, out=result.export_dir, files=files) + line, log
            else:
                yield "...", log

    c["run"].click(run, [lang, c["adapter"], *panel.inputs, *[c[k] for k in EXPORT_KEYS]], [c["status"], c["log"]])
