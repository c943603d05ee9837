"""The model panel, shared by every tab: base model, template (with the mismatch check), finetuning type,
quantization bits (chosen before any load), and the checkpoint / adapter picker over the run folders of a saves
directory (each with its step and eval loss, the best one marked)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from tunelab.webui.locale import t
from tunelab.webui.ui import Page, sentence

PANEL_KEYS = ("model_name_or_path", "template", "finetuning_type", "quantization_bit")


@dataclass
class ModelPanel:
    fields: dict[str, Any]  # config key -> component
    saves_dir: Any
    picker: Any
    refresh: Any
    template_note: Any

    @property
    def inputs(self) -> list[Any]:
        """Components whose values `values()` reads, in order."""
        return [self.fields[k] for k in PANEL_KEYS] + [self.picker]


def panel_values(values: list[Any]) -> dict[str, Any]:
    """{config key: value} of the panel (empty = unset): the base model, template, type, bits and adapter."""
    from tunelab.webui.ui import collect

    out = collect(list(PANEL_KEYS), values[: len(PANEL_KEYS)])
    adapter = values[len(PANEL_KEYS)]
    if adapter:
        out["adapter_name_or_path"] = adapter
    return out


def build(page: Page, defaults: dict[str, Any], saves_dir: str) -> ModelPanel:
    import gradio as gr

    with page.keep(gr.Accordion(page.text("model_panel", page.lang), open=True), label="model_panel"):
        with gr.Row():
            fields = {"model_name_or_path": page.field("model_name_or_path", defaults.get("model_name_or_path"), scale=3)}
            fields["template"] = page.field("template", defaults.get("template"))
            fields["finetuning_type"] = page.field("finetuning_type", defaults.get("finetuning_type"))
            fields["quantization_bit"] = page.field("quantization_bit", defaults.get("quantization_bit"))
        with gr.Row():
            saves = page.add(gr.Textbox, {"label": "saves_dir", "info": "saves_dir_help"}, value=saves_dir,
                             elem_id="saves-dir", scale=2)
            picker = page.add(gr.Dropdown, {"label": "run_picker", "info": "run_picker_help"},
                              choices=run_choices(saves_dir, page.lang), value=defaults.get("adapter_name_or_path") or "",
                              allow_custom_value=True, elem_id="run-picker", scale=3)
            refresh = page.add(gr.Button, {"value": "refresh"}, size="sm", scale=0, elem_id="refresh-runs")
        note = page.add(gr.Markdown, {"value": "quant_note"}, elem_id="template-note")
    panel = ModelPanel(fields, saves, picker, refresh, note)
    return panel


def wire(panel: ModelPanel, lang: Any) -> None:
    """Events: refresh the run list; check the template against the tokenizer's own when model/template change."""
    import gradio as gr

    def refresh(saves_dir: str, current: str, language: str):
        return gr.update(choices=run_choices(saves_dir, language), value=current)

    panel.refresh.click(refresh, [panel.saves_dir, panel.picker, lang], [panel.picker])
    panel.saves_dir.submit(refresh, [panel.saves_dir, panel.picker, lang], [panel.picker])
    check_inputs = [panel.fields["model_name_or_path"], panel.fields["template"], lang]
    panel.fields["model_name_or_path"].blur(template_check, check_inputs, [panel.template_note])
    panel.fields["template"].blur(template_check, check_inputs, [panel.template_note])


def template_check(model: str, template: str, lang: str) -> str:
    """The template the page will use, checked against the tokenizer's own chat template (tunelab's warning)."""
    if not (model or "").strip():
        return t("quant_note", lang)
    try:
        from tunelab.data.template import get_template, template_mismatch_warning
        from tunelab.model.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(model.strip())
        tpl = get_template((template or "auto").strip() or "auto", tokenizer)
        note = template_mismatch_warning(tpl, tokenizer) or t("template_ok", lang)
        return t("template_detected", lang, note=f"{tpl.name}: {note}") + "\n\n" + t("quant_note", lang)
    except Exception as exc:  # noqa: BLE001 - shown as a sentence
        return sentence(exc, lang)


def run_choices(saves_dir: str, lang: str) -> list[tuple[str, str]]:
    """(label, path) of every adapter under saves_dir: each run's final adapter and its checkpoints, with the step,
    the eval loss at that step and the best checkpoint (lowest eval_loss) marked."""
    from tunelab.model.adapters import adapter_checkpoints, is_adapter_dir
    from tunelab.utils.io import read_jsonl

    out: list[tuple[str, str]] = [(t("no_adapter", lang), "")]
    if not saves_dir or not os.path.isdir(saves_dir):
        return out
    for name in sorted(os.listdir(saves_dir)):
        run = os.path.join(saves_dir, name)
        if not os.path.isdir(run):
            continue
        records = read_jsonl(os.path.join(run, "trainer_log.jsonl"))
        evals = {int(r["current_steps"]): float(r["eval_loss"]) for r in records
                 if isinstance(r.get("eval_loss"), (int, float)) and math.isfinite(r["eval_loss"])}
        ckpts = adapter_checkpoints(run)
        best = min((s for s, _ in ckpts if s in evals), key=lambda s: (evals[s], s), default=None)
        if is_adapter_dir(run):
            last = max((int(r.get("current_steps", 0)) for r in records), default=0)
            out.append((_label(name, last, evals.get(last), False, lang), run))
        for step, path in ckpts:
            out.append((_label(f"{name}/{os.path.basename(path)}", step, evals.get(step), step == best, lang), path))
    return out


def _label(name: str, step: int, eval_loss: float | None, best: bool, lang: str) -> str:
    parts = [name, f"step {step}"]
    if eval_loss is not None:
        parts.append(f"eval_loss {eval_loss:.4f}")
    if best:
        parts.append(f"★ {t('best_mark', lang)}")
    return " · ".join(parts)
