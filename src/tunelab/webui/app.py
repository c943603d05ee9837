"""The page: the language switch, the model panel and the tabs (Data, Train, Evaluate, Chat, Export), or for
`tunelab webchat` the chat alone for one model. `build_app` / `build_webchat` return a gr.Blocks; `launch` serves it.

    demo = build_app({"model_name_or_path": "examples/tiny-qwen2"}, saves_dir="saves", lang="zh")
    launch(demo, host="127.0.0.1", port=7860)
"""
from __future__ import annotations

import os
from typing import Any

from tunelab.webui import chat_tab, data_tab, eval_tab, export_tab, model_panel, train_tab
from tunelab.webui.locale import LANG_NAMES, LANGS, t
from tunelab.webui.ui import Page

CSS = """
mark.trained { background: #c8f7c5; color: #0b4f0b; border-radius: 2px; }
.sample pre { white-space: pre-wrap; font-size: 0.85em; }
"""


def _language(page: Page, lang: str):
    import gradio as gr

    with gr.Row():
        page.add(gr.Markdown, {"value": lambda la: f"## {t('title', la)}\n{t('subtitle', la)}"}, elem_id="page-title")
        radio = page.add(gr.Radio, {"label": "language"}, choices=[(LANG_NAMES[x], x) for x in LANGS], value=lang,
                         elem_id="language", scale=0, min_width=200)
    return radio


def _lang_from_request(request, fallback: str) -> str:
    """?lang=zh|en in the address wins; otherwise the language the server was started with."""
    try:
        asked = (request.query_params.get("lang") or "").lower()
    except AttributeError:
        asked = ""
    return asked if asked in LANGS else fallback


def build_app(defaults: dict[str, Any] | None = None, *, saves_dir: str = "saves", lang: str = "en"):
    import gradio as gr

    defaults = dict(defaults or {})
    page = Page(lang)
    with gr.Blocks(title="tunelab", analytics_enabled=False) as demo:
        radio = _language(page, lang)
        panel = model_panel.build(page, defaults, saves_dir)
        with gr.Tabs():
            with page.keep(gr.Tab(t("tab_data", lang), id="data", elem_id="tab-data"), label="tab_data"):
                data = data_tab.build(page, defaults)
            with page.keep(gr.Tab(t("tab_train", lang), id="train", elem_id="tab-train"), label="tab_train"):
                train = train_tab.build(page, defaults)
            with page.keep(gr.Tab(t("tab_eval", lang), id="eval", elem_id="tab-eval"), label="tab_eval"):
                evaluate = eval_tab.build(page, defaults)
            with page.keep(gr.Tab(t("tab_chat", lang), id="chat", elem_id="tab-chat"), label="tab_chat"):
                chat = chat_tab.build(page, defaults)
            with page.keep(gr.Tab(t("tab_export", lang), id="export", elem_id="tab-export"), label="tab_export"):
                export = export_tab.build(page, defaults, saves_dir)
        model_panel.wire(panel, radio)
        data_tab.wire(data, panel, radio)
        train_tab.wire(page, train, panel, radio)
        eval_tab.wire(page, evaluate, panel, radio)
        chat_tab.wire(chat, panel, radio)
        export_tab.wire(export, panel, radio)
        _wire_language(page, radio, demo, lang)
        _wire_reattach(page, train, panel, radio, demo)
    return demo


def _wire_language(page: Page, radio, demo, lang: str) -> None:
    components = page.components()
    radio.change(lambda la: page.updates(la), [radio], components)

    import gradio as gr

    def load(request):
        return _lang_from_request(request, lang)

    load.__annotations__ = {"request": gr.Request}  # Gradio injects the request by this (real, not string) type
    demo.load(load, None, [radio])


def _wire_reattach(page: Page, train: dict[str, Any], panel, radio, demo) -> None:
    """On every page load: a run still training under the saves folder is shown again, its settings restored."""
    import gradio as gr

    keys = [k for k in page.fields]
    outputs = [page.fields[k] for k in keys] + [train["yaml"], train["command"], train["status"], train["timer"]]

    def reattach(request, language, saves_dir, output_dir):
        language = _lang_from_request(request, language)
        found, values = train_tab.reattach(page, language, saves_dir, output_dir)
        if found is None:
            return [gr.update() for _ in keys] + [gr.update(), gr.update(), gr.update(), gr.Timer(active=False)]
        out_dir = values.get("output_dir") or found
        updates = [gr.update(value=values[k]) if k in values else gr.update() for k in keys]
        yaml_path = os.path.join(found, train_tab.runs.CONFIG_FILE)
        try:
            with open(yaml_path, encoding="utf-8") as fh:
                yaml_text = fh.read()
        except OSError:
            yaml_text = ""
        return updates + [yaml_text, f"tunelab train {yaml_path}", t("attached", language, out=out_dir),
                          gr.Timer(active=True)]

    reattach.__annotations__ = {"request": gr.Request}
    demo.load(reattach, [radio, panel.saves_dir, page.fields["output_dir"]], outputs)


def build_webchat(config: dict[str, Any], *, lang: str = "en"):
    """`tunelab webchat cfg.yaml`: the chat tab alone, its model loaded from the config at start."""
    import gradio as gr

    from tunelab.config.parse import FIELDS

    model_keys = {k: v for k, v in config.items() if FIELDS[k][0] in ("model", "quantization") or k == "checkpoint"}
    gen_defaults = {k: v for k, v in config.items() if FIELDS[k][0] == "generation"}
    chat_tab.HOLDER.load(model_keys)
    page = Page(lang)
    with gr.Blocks(title="tunelab webchat", analytics_enabled=False) as demo:
        radio = _language(page, lang)
        page.add(gr.Markdown, {"value": lambda la: t("model_loaded", la, what=chat_tab.HOLDER.what)}, elem_id="webchat-model")
        chat = chat_tab.build(page, gen_defaults, fixed=True)
        chat_tab.wire(chat, None, radio, fixed_config=model_keys)
        _wire_language(page, radio, demo, lang)
    return demo


def launch(demo, *, host: str | None = None, port: int | None = None, share: bool = False) -> None:
    """Serve on host:port (127.0.0.1:7860 by default; GRADIO_SERVER_NAME / GRADIO_SERVER_PORT when set)."""
    host = host or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    if port is None:
        env = os.environ.get("GRADIO_SERVER_PORT")
        port = int(env) if env and env.isdigit() else 7860
    demo.queue(default_concurrency_limit=4).launch(server_name=host, server_port=port, share=share, css=CSS,
                                                    show_error=False, inbrowser=False, quiet=False)
