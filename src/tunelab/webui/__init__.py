"""The web UI (`tunelab webui`, `tunelab webchat`): the whole fine-tuning loop on one Gradio page, English / 中文.

One module per tab (model_panel shared by all, data_tab, train_tab, eval_tab, chat_tab, export_tab), every string in
locale.py, config widgets built from the one schema (ui.py), training as an ordinary `tunelab train` process
(runs.py), the page assembled in app.py. Gradio is the `webui` extra, imported only when a page is built.
"""
from __future__ import annotations


def require_gradio() -> None:
    """Stop with a sentence naming the extra when Gradio is not installed."""
    import importlib.util

    from tunelab.errors import ConfigError

    if importlib.util.find_spec("gradio") is None:
        raise ConfigError("the web UI needs Gradio: pip install 'tunelab[webui]'.")
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home (usage statistics, version check)
