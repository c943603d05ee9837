"""`tunelab webchat cfg.yaml [key=value ...] [--host H] [--port P] [--lang en|zh] [--share]`: the web UI's chat tab
alone, for the one model (and adapter) the config names, loaded before the page is served."""
from __future__ import annotations


def main(argv: list[str]) -> int:
    from tunelab.commands.webui import page_defaults, parser
    from tunelab.errors import ConfigError

    args = parser("tunelab webchat").parse_args(argv)
    from tunelab.webui import require_gradio

    require_gradio()
    config = page_defaults(args.config)
    if not config.get("model_name_or_path"):
        raise ConfigError("tunelab webchat needs a model: give a config with model_name_or_path (and adapter_name_or_path).")
    from tunelab.utils.logging import setup_logging

    setup_logging()
    from tunelab.webui.app import build_webchat, launch

    launch(build_webchat(config, lang=args.lang), host=args.host, port=args.port, share=args.share)
    return 0
