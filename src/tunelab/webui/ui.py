"""What every tab shares: the language registry (`Page`), config-key widgets built from the one schema, and
`sentence` (every failure shown on the page as a sentence, never a traceback).

    page = Page("en")
    lr = page.field("learning_rate")                   # a gr.Number labelled learning_rate, help from the schema
    box = page.add(gr.Button, value="start")           # a button whose text is locale key "start"
    page.updates("zh")                                 # gr.update(...) for every registered component, in Chinese
    values = collect(["learning_rate"], [1e-4])        # only what differs from the schema default
"""
from __future__ import annotations

import logging
import typing
from typing import Any, Callable, Literal, Union

from tunelab.config.parse import FIELDS
from tunelab.errors import TunelabError
from tunelab.webui.locale import field_help, t

logger = logging.getLogger("tunelab.webui")
_NONE = type(None)


class Page:
    """Builds components with translated texts and remembers them, so the language switch can update them all."""

    def __init__(self, lang: str = "en") -> None:
        self.lang = lang
        self.items: list[tuple[Any, dict[str, Any]]] = []
        self.fields: dict[str, Any] = {}  # config key -> its component (each key has one widget on the page)

    def text(self, spec: Any, lang: str) -> str:
        if callable(spec):
            return spec(lang)
        if isinstance(spec, tuple) and spec[0] == "help":
            return field_help(spec[1], lang)
        return t(spec, lang)

    def add(self, cls: Callable, texts: dict[str, Any] | None = None, **kw: Any) -> Any:
        """cls(**kw), with the attributes in `texts` (label, info, value, placeholder: locale keys, ("help", key) or
        a function of the language) translated now and on every language switch."""
        texts = dict(texts or {})
        comp = cls(**kw, **{k: self.text(v, self.lang) for k, v in texts.items()})
        self.items.append((comp, texts))
        return comp

    def keep(self, comp: Any, **texts: Any) -> Any:
        """Register a component made elsewhere (a Tab, an Accordion) under locale keys for its attributes."""
        self.items.append((comp, texts))
        return comp

    def field(self, key: str, value: Any = None, **kw: Any) -> Any:
        comp = field_widget(key, self.lang, value, **kw)
        self.items.append((comp, {"info": ("help", key)}))
        self.fields[key] = comp
        return comp

    def components(self) -> list[Any]:
        return [c for c, _ in self.items]

    def updates(self, lang: str) -> list[Any]:
        import gradio as gr

        return [gr.update(**{k: self.text(v, lang) for k, v in texts.items()}) for _, texts in self.items]


# ------------------------------------------------------------------------------------------ config-key widgets
def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(tp) is Union:
        args = [a for a in typing.get_args(tp) if a is not _NONE]
        return (args[0] if len(args) == 1 else Union[tuple(args)]), _NONE in typing.get_args(tp)
    return tp, False


def widget_kind(key: str) -> str:
    """dropdown, checkbox, tristate (optional bool), int, float or text: how a config key is edited."""
    tp, optional = _unwrap(FIELDS[key][2])
    if typing.get_origin(tp) is Literal:
        return "dropdown"
    if tp is bool:
        return "tristate" if optional else "checkbox"
    if tp in (int, float) and not optional:
        return tp.__name__
    return "text"


def choices_of(key: str) -> list[str]:
    tp, optional = _unwrap(FIELDS[key][2])
    if widget_kind(key) == "tristate":
        return ["", "true", "false"]
    return ([""] if optional else []) + [str(c) for c in typing.get_args(tp)]


def shown_value(key: str, value: Any) -> Any:
    """A config value as its widget shows it (None -> empty)."""
    kind = widget_kind(key)
    if kind == "checkbox":
        return bool(value)
    if kind in ("int", "float"):
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def field_widget(key: str, lang: str, value: Any = None, **kw: Any) -> Any:
    import gradio as gr

    default = FIELDS[key][1].default
    shown = shown_value(key, default if value is None else value)
    kind = widget_kind(key)
    common = {"label": key, "info": field_help(key, lang), "elem_id": f"field-{key}", **kw}
    if kind == "checkbox":
        return gr.Checkbox(value=shown, **common)
    if kind in ("dropdown", "tristate"):
        return gr.Dropdown(choices=choices_of(key), value=shown, allow_custom_value=False, **common)
    if kind == "int":
        return gr.Number(value=shown, precision=0, **common)
    if kind == "float":
        return gr.Number(value=shown, **common)
    return gr.Textbox(value=shown, **common)


def collect(keys: list[str], values: list[Any]) -> dict[str, Any]:
    """{key: value} for the widgets whose value differs from the schema default (empty text = unset)."""
    out: dict[str, Any] = {}
    for key, value in zip(keys, values):
        kind = widget_kind(key)
        if isinstance(value, (list, tuple)):  # a multi-select (dataset names): the schema's comma list
            value = ",".join(str(v) for v in value)
        if isinstance(value, str):
            value = value.strip()
            if value == "":
                value = None
        if kind == "int" and isinstance(value, float) and value.is_integer():
            value = int(value)
        default = FIELDS[key][1].default
        if value is None and kind in ("int", "float"):
            continue  # a cleared number box: the default
        if value == default or (value is None and default is None) or shown_value(key, value) == shown_value(key, default):
            continue
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------ failures as sentences
def sentence(exc: BaseException, lang: str) -> str:
    """The sentence a failure shows on the page: tunelab's own message, or for a bug the exception's type and text
    (the traceback goes to the server's log only)."""
    if isinstance(exc, TunelabError):
        return t("error", lang, message=str(exc))
    logger.error("web UI action failed", exc_info=exc)
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return t("error", lang, message=str(exc))
    return t("unexpected", lang, kind=type(exc).__name__, message=str(exc) or "no message")


# ------------------------------------------------------------------------------------------ long work, with its log
def run_logged(fn: Callable[[], Any], every: float = 0.5):
    """Run fn() in a thread; yield ("log so far", None, None) while it runs, then ("log", result, exception).

    The lines are the `tunelab` loggers' records (the CLI's progress messages), so merge and evaluation show their
    progress on the page as they do in a terminal."""
    import threading
    import time

    lines: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(f"[{record.levelname.lower()}] {record.getMessage()}")

    handler = _Collect(level=logging.INFO)
    root = logging.getLogger("tunelab")
    old_level = root.level
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    root.addHandler(handler)
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the page as a sentence
            box["error"] = exc

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(every)
            yield "\n".join(lines[-40:]), None, None
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    yield "\n".join(lines[-40:]), box.get("result"), box.get("error")
