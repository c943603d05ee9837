"""The Data tab: the datasets of dataset_info.json (training and evaluation sets alike), preview of encoded samples
with the trained tokens marked, length statistics with a histogram and the cutoff_len truncation count, validation
with every invalid record listed, and convert + register of a file. All of it is `tunelab data`'s functions
(tunelab.datatools), through the model panel's tokenizer and template (the offline Qwen2.5 one when none is set)."""
from __future__ import annotations

import html
import os
import tempfile
from typing import Any

from tunelab.webui.locale import t
from tunelab.webui.ui import Page, sentence

MAIN_DATA_KEYS = ("dataset_dir", "cutoff_len", "max_samples", "val_size")


def registry_names(dataset_dir: str) -> list[str]:
    from tunelab.data.registry import load_registry

    try:
        return sorted(load_registry(dataset_dir or "data"))
    except Exception:  # noqa: BLE001 - a broken registry is reported by the listing, not here
        return []


def registry_table(dataset_dir: str, lang: str) -> str:
    """A Markdown table of every entry: name, file or hub id, format."""
    from tunelab.data.registry import load_registry, registry_path

    try:
        reg = load_registry(dataset_dir or "data")
    except Exception as exc:  # noqa: BLE001
        return sentence(exc, lang)
    if not reg:
        return t("no_registry", lang, path=dataset_dir)
    rows = [t("datasets_found", lang, n=len(reg), path=registry_path(dataset_dir)), "", "| name | file / hub | formatting |",
            "|---|---|---|"]
    for name, entry in sorted(reg.items()):
        where = entry.get("file_name") or entry.get("hf_hub_url") or entry.get("ms_hub_url") or "" if isinstance(entry, dict) else "?"
        fmt = entry.get("formatting", "alpaca") if isinstance(entry, dict) else "?"
        rows.append(f"| {name} | {where} | {fmt} |")
    return "\n".join(rows)


def build(page: Page, defaults: dict[str, Any]) -> dict[str, Any]:
    import gradio as gr

    c: dict[str, Any] = {}
    dataset_dir = defaults.get("dataset_dir") or "data"
    names = registry_names(dataset_dir)
    with gr.Row():
        c["dataset_dir"] = page.field("dataset_dir", dataset_dir)
        for key in ("dataset", "eval_dataset"):
            chosen = [v.strip() for v in str(defaults.get(key) or "").split(",") if v.strip()]
            c[key] = page.add(gr.Dropdown, {"info": ("help", key)}, label=key, choices=names, value=chosen,
                              multiselect=True, allow_custom_value=True, elem_id=f"field-{key}")
            page.fields[key] = c[key]
    with gr.Row():
        for key in MAIN_DATA_KEYS[1:]:
            c[key] = page.field(key, defaults.get(key))
    c["registry"] = gr.Markdown(registry_table(dataset_dir, page.lang), elem_id="data-registry")
    with gr.Row():
        c["target"] = page.add(gr.Dropdown, {"label": "data_target", "info": "data_target_help"}, choices=names,
                               value=names[0] if names else None, allow_custom_value=True, elem_id="data-target", scale=3)
        c["n"] = page.add(gr.Slider, {"label": "preview_n"}, minimum=1, maximum=20, step=1, value=3, elem_id="preview-n")
    with gr.Row():
        c["preview_btn"] = page.add(gr.Button, {"value": "preview"}, elem_id="preview-btn")
        c["stats_btn"] = page.add(gr.Button, {"value": "statistics"}, elem_id="stats-btn")
        c["validate_btn"] = page.add(gr.Button, {"value": "validate"}, elem_id="validate-btn")
    c["status"] = gr.Markdown("", elem_id="data-status")
    c["preview"] = gr.HTML("", elem_id="data-preview")
    with gr.Row():
        c["stats"] = gr.Markdown("", elem_id="data-stats")
        c["histogram"] = gr.Image(None, type="filepath", show_label=False, elem_id="data-histogram", visible=False)
    with page.keep(gr.Accordion(page.text("convert_register", page.lang), open=False), label="convert_register"):
        with gr.Row():
            c["src"] = page.add(gr.Textbox, {"label": "src_file"}, elem_id="convert-src")
            c["out"] = page.add(gr.Textbox, {"label": "out_file"}, elem_id="convert-out")
            c["to"] = page.add(gr.Dropdown, {"label": "to_format"}, choices=["alpaca", "sharegpt", "openai"], value="alpaca")
            c["map"] = page.add(gr.Textbox, {"label": "map_columns"}, elem_id="convert-map")
        with gr.Row():
            c["convert_btn"] = page.add(gr.Button, {"value": "convert"}, elem_id="convert-btn")
            c["reg_name"] = page.add(gr.Textbox, {"label": "register_name"}, elem_id="register-name")
            c["register_btn"] = page.add(gr.Button, {"value": "register"}, elem_id="register-btn")
        c["convert_status"] = gr.Markdown("", elem_id="convert-status")
    return c


def wire(c: dict[str, Any], panel, lang: Any) -> None:
    import gradio as gr

    def relist(dataset_dir: str, language: str):
        names = registry_names(dataset_dir)
        return (registry_table(dataset_dir, language), gr.update(choices=names), gr.update(choices=names),
                gr.update(choices=names))

    listing = [c["registry"], c["dataset"], c["eval_dataset"], c["target"]]
    c["dataset_dir"].blur(relist, [c["dataset_dir"], lang], listing)
    c["dataset_dir"].submit(relist, [c["dataset_dir"], lang], listing)
    model, template = panel.fields["model_name_or_path"], panel.fields["template"]
    common = [lang, c["target"], c["dataset_dir"], model, template]
    c["preview_btn"].click(preview, [*common, c["n"], c["cutoff_len"]], [c["status"], c["preview"]])
    c["stats_btn"].click(statistics, [*common, c["cutoff_len"]], [c["status"], c["stats"], c["histogram"]])
    c["validate_btn"].click(validate, [*common, c["cutoff_len"]], [c["status"], c["stats"]])
    c["convert_btn"].click(convert, [lang, c["src"], c["out"], c["to"], c["map"]], [c["convert_status"]])
    c["register_btn"].click(register, [lang, c["reg_name"], c["out"], c["src"], c["dataset_dir"]],
                            [c["convert_status"]]).then(relist, [c["dataset_dir"], lang], listing)


def _spec_and_template(target: str, dataset_dir: str, model: str, template: str):
    from tunelab.datatools.source import local_spec
    from tunelab.datatools.tokens import load_template
    from tunelab.errors import ConfigError

    if not (target or "").strip():
        raise ConfigError("no dataset chosen: pick a registered name or give a file path.")
    spec = local_spec(target.strip(), (dataset_dir or "data").strip())
    tpl, note = load_template((model or "").strip() or None, (template or "").strip() or None if (model or "").strip() else None)
    return spec, tpl, note


def preview(lang: str, target: str, dataset_dir: str, model: str, template: str, n: float, cutoff: float):
    from tunelab.datatools.preview import segments
    from tunelab.datatools.source import InvalidLog, iter_conversations

    try:
        spec, tpl, note = _spec_and_template(target, dataset_dir, model, template)
        log = InvalidLog()
        blocks = []
        for shown, conv in enumerate(iter_conversations(spec, log), 1):
            parts = segments(conv, tpl, int(cutoff) if cutoff else None) or segments(conv, tpl)
            body = "".join(f"<mark class='trained'>{html.escape(s)}</mark>" if on else html.escape(s) for s, on in parts)
            blocks.append(f"<div class='sample'><b>{shown}. {html.escape(conv.source)}</b><pre>{body}</pre></div>")
            if shown >= int(n or 3):
                break
        status = t("preview_legend", lang) + (f" {note}" if note else "")
        if log.count:
            status += "\n\n```\n" + log.summary() + "\n```"
        return status, "\n".join(blocks)
    except Exception as exc:  # noqa: BLE001 - a sentence on the page
        return sentence(exc, lang), ""


def statistics(lang: str, target: str, dataset_dir: str, model: str, template: str, cutoff: float):
    import gradio as gr

    from tunelab.datatools.source import InvalidLog
    from tunelab.datatools.stats import collect_stats
    from tunelab.datatools.validate import validate_dataset

    try:
        spec, tpl, note = _spec_and_template(target, dataset_dir, model, template)
        log = InvalidLog()
        report = collect_stats(spec, log, template=tpl, workers=1)
        lines = report.lines()
        cutoff_len = int(cutoff) if cutoff else 2048
        truncation = validate_dataset(spec, lambda _: None, template=tpl, cutoff_len=cutoff_len, workers=1)
        lines += [line for line in truncation.lines()[1:] if "cutoff_len" in line or "lost" in line]
        image = None
        if report.valid:
            image = os.path.join(tempfile.mkdtemp(prefix="tunelab-webui-"), "histogram.png")
            report.plot(image)
        text = "```\n" + "\n".join(lines) + ("\n" + log.summary() if log.count else "") + "\n```"
        return (note or ""), text, gr.update(value=image, visible=image is not None)
    except Exception as exc:  # noqa: BLE001
        return sentence(exc, lang), "", gr.update(value=None, visible=False)


def validate(lang: str, target: str, dataset_dir: str, model: str, template: str, cutoff: float):
    from tunelab.datatools.source import InvalidLog
    from tunelab.datatools.validate import validate_dataset

    try:
        spec, tpl, note = _spec_and_template(target, dataset_dir, model, template)
        log = InvalidLog(keep=200)
        report = validate_dataset(spec, log, template=tpl, cutoff_len=int(cutoff) if cutoff else 2048, workers=1)
        head = t("valid_clean", lang) if report.clean else t("invalid_listed", lang, n=log.count)
        listed = "\n".join(str(i) for i in log.first)
        return head, "```\n" + "\n".join(report.lines()) + ("\n\n" + listed if listed else "") + "\n```"
    except Exception as exc:  # noqa: BLE001
        return sentence(exc, lang), ""


def convert(lang: str, src: str, out: str, to: str, mapping: str) -> str:
    from tunelab.datatools.convert import convert_file
    from tunelab.errors import ConfigError

    try:
        if not (src or "").strip() or not (out or "").strip():
            raise ConfigError(t("missing_value", "en", what="input / output file"))
        r = convert_file(src.strip(), out.strip(), to=to, mapping=(mapping or "").strip() or None)
        return t("converted", lang, n=r.written, fmt=to, out=out.strip(), src_fmt=r.formatting, reason=r.reason)
    except Exception as exc:  # noqa: BLE001
        return sentence(exc, lang)


def register(lang: str, name: str, out: str, src: str, dataset_dir: str) -> str:
    from tunelab.datatools.register import register_dataset
    from tunelab.errors import ConfigError

    try:
        file = (out or "").strip() or (src or "").strip()
        if not (name or "").strip() or not file:
            raise ConfigError(t("missing_value", "en", what="name / file"))
        r = register_dataset(name.strip(), file, dataset_dir=(dataset_dir or "data").strip())
        return t("registered", lang, verb=t(f"verb_{r.status}", lang), name=name.strip(), path=r.path, n=r.records)
    except Exception as exc:  # noqa: BLE001
        return sentence(exc, lang)
