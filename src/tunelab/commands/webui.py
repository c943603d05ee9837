"""`tunelab webui [config.yaml] [key=value ...] [--host H] [--port P] [--saves-dir DIR] [--lang en|zh] [--share]`:
the browser UI (data, train, evaluate, chat, export) in English or Chinese.

Serves on 127.0.0.1:7860 unless --host / --port (or GRADIO_SERVER_NAME / GRADIO_SERVER_PORT) say otherwise; a
public share link only with --share. A config given here fills the page's fields (it is validated first).
"""
from __future__ import annotations

import argparse

USAGE = "usage: tunelab webui [config.yaml] [key=value ...] [--host H] [--port P] [--saves-dir DIR] [--lang en|zh] [--share]"


def parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, usage=USAGE.replace("usage: ", ""), description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="*", help="a YAML/JSON config and key=value overrides that fill the page")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1, or GRADIO_SERVER_NAME)")
    p.add_argument("--port", type=int, help="port (default 7860, or GRADIO_SERVER_PORT)")
    p.add_argument("--lang", choices=("en", "zh"), default="en", help="language of the page (default en; ?lang=zh in the address)")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link (off by default)")
    return p


def page_defaults(config_args: list[str]) -> dict:
    """The given config's keys (validated by the one parser), or {} when none is given."""
    if not config_args:
        return {}
    from tunelab.config import load_config

    return dict(load_config(config_args).given)


def main(argv: list[str]) -> int:
    p = parser("tunelab webui")
    p.add_argument("--saves-dir", default="saves", help="folder of the run folders (default saves)")
    args = p.parse_args(argv)
    from tunelab.webui import require_gradio

    require_gradio()
    defaults = page_defaults(args.config)
    from tunelab.utils.logging import setup_logging

    setup_logging()
    from tunelab.webui.app import build_app, launch

    launch(build_app(defaults, saves_dir=args.saves_dir, lang=args.lang), host=args.host, port=args.port, share=args.share)
    return 0
