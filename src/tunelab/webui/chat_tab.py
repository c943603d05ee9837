"""The Chat tab (and `tunelab webchat`): streaming chat through the one inference engine (tunelab.infer.Engine),
with a system prompt and generation settings, and the base model beside the fine-tuned one (the same loaded model
with its adapter switched off, each side keeping its own history). One model is loaded per server at a time."""
from __future__ import annotations

import threading
from typing import Any

from tunelab.webui.locale import t
from tunelab.webui.ui import Page, collect, sentence

GEN_KEYS = ("system", "do_sample", "temperature", "top_p", "top_k", "max_new_tokens", "repetition_penalty")


class EngineHolder:
    """The server's loaded engine, rebuilt only when the model settings change."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.engine = None
        self.key: str | None = None
        self.what = ""

    def load(self, values: dict[str, Any]):
        from tunelab.config.parse import build_config
        from tunelab.infer import Engine

        config = {k: v for k, v in values.items()}
        key = repr(sorted(config.items()))
        with self.lock:
            if self.engine is not None and key == self.key:
                return self.engine
            self.unload()
            cfg = build_config(config, source="the web UI")
            self.engine = Engine.from_config(cfg, max_batch_size=1)
            self.key = key
            self.what = cfg.model_name_or_path + (f" + {', '.join(self.engine.adapters)}" if self.engine.adapters else "")
            return self.engine

    def unload(self) -> None:
        if self.engine is not None:
            self.engine.unload()
        self.engine, self.key, self.what = None, None, ""


HOLDER = EngineHolder()


def build(page: Page, defaults: dict[str, Any], fixed: bool = False) -> dict[str, Any]:
    import gradio as gr

    c: dict[str, Any] = {}
    with gr.Row():
        if not fixed:  # webchat: the model of its config, loaded at start, no other
            c["load"] = page.add(gr.Button, {"value": "load_model"}, variant="primary", elem_id="chat-load")
            c["unload"] = page.add(gr.Button, {"value": "unload_model"}, elem_id="chat-unload")
        c["compare"] = page.add(gr.Checkbox, {"label": "compare_base"}, value=False, elem_id="chat-compare")
    c["status"] = gr.Markdown(t("model_unloaded", page.lang) if not fixed else "", elem_id="chat-status")
    with gr.Row():
        c["tuned"] = page.add(gr.Chatbot, {"label": "tuned_model"}, elem_id="chat-tuned", height=320)
        c["base"] = page.add(gr.Chatbot, {"label": "base_model"}, elem_id="chat-base", height=320, visible=False)
    with gr.Row():
        c["message"] = page.add(gr.Textbox, {"label": "message"}, elem_id="chat-message", scale=4)
        c["send"] = page.add(gr.Button, {"value": "send"}, variant="primary", elem_id="chat-send", scale=0)
        c["clear"] = page.add(gr.Button, {"value": "clear"}, elem_id="chat-clear", scale=0)
    with page.keep(gr.Accordion(page.text("section_generation", page.lang), open=False), label="section_generation"):
        c["system"] = page.field("system", defaults.get("system"))
        with gr.Row():
            for key in GEN_KEYS[1:]:
                c[key] = page.field(key, defaults.get(key))
    return c


def wire(c: dict[str, Any], panel, lang: Any, fixed_config: dict[str, Any] | None = None) -> None:
    import gradio as gr

    panel_inputs = panel.inputs if panel is not None else []

    def model_values(values) -> dict[str, Any]:
        if fixed_config is not None:
            return dict(fixed_config)
        from tunelab.webui.model_panel import panel_values

        return {k: v for k, v in panel_values(list(values)).items() if k != "finetuning_type"}

    def load(language, *values):
        def work():
            return HOLDER.load(model_values(values))

        from tunelab.webui.ui import run_logged

        for log, engine, error in run_logged(work):
            if error is not None:
                yield sentence(error, language)
            elif engine is not None:
                yield t("model_loaded", language, what=HOLDER.what)
            else:
                yield log.splitlines()[-1] if log else "..."

    def unload(language):
        with HOLDER.lock:
            HOLDER.unload()
        return t("model_unloaded", language)

    gen_inputs = [c[k] for k in GEN_KEYS]

    def send(language, message, tuned, base, compare, *gen_values):
        tuned, base = list(tuned or []), list(base or [])
        text = (message or "").strip()
        if not text:
            yield "", tuned, base, ""
            return
        engine = HOLDER.engine
        if engine is None:
            yield message, tuned, base, t("need_model", language)
            return
        if compare and not engine.has_adapter:
            yield message, tuned, base, t("compare_needs_adapter", language)
            return
        try:
            gen = collect(list(GEN_KEYS), list(gen_values))
            system = gen.pop("system", engine.system)
            from tunelab.config.parse import build_config

            gen = {k: getattr(build_config(gen, source="the chat settings"), k) for k in gen}  # validated
            sides = [("tuned", tuned)] + ([("base", base)] if compare else [])
            for name, history in sides:
                conv = _conversation(history, text, system)
                history += [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
                for piece in _stream(engine, conv, gen, base=name == "base"):
                    history[-1]["content"] += piece
                    yield "", tuned, base, ""
            yield "", tuned, base, ""
        except Exception as exc:  # noqa: BLE001
            yield message, tuned, base, sentence(exc, language)

    if "load" in c:
        c["load"].click(load, [lang, *panel_inputs], [c["status"]])
        c["unload"].click(unload, [lang], [c["status"]])
    outs = [c["message"], c["tuned"], c["base"], c["status"]]
    ins = [lang, c["message"], c["tuned"], c["base"], c["compare"], *gen_inputs]
    c["send"].click(send, ins, outs)
    c["message"].submit(send, ins, outs)
    c["clear"].click(lambda: ([], []), None, [c["tuned"], c["base"]])
    c["compare"].change(lambda on: gr.update(visible=bool(on)), [c["compare"]], [c["base"]])


def _conversation(history: list[dict[str, Any]], text: str, system: str | None):
    from tunelab.infer import ChatSession

    session = ChatSession(system=system, messages=[{"role": m["role"], "content": _text(m["content"])} for m in history])
    return session.conversation(text)


def _text(content: Any) -> str:
    """A Chatbot message's text (Gradio may hand back a list of content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return str(content)


def _stream(engine, conv, gen: dict[str, Any], base: bool):
    """The engine's stream, with the adapter switched off for the base side (held for the whole answer)."""
    if not base:
        yield from engine.stream(conv, **gen)
        return
    with engine.adapter_disabled():
        yield from engine.stream(conv, **gen)
