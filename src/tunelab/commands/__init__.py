"""One module per `tunelab` subcommand, each exposing `main(argv) -> int`; imported lazily by tunelab.cli."""
from __future__ import annotations

from typing import Sequence


def command_config(argv: list[str], command: str, usage: str, sections: Sequence[str]):
    """The shared prologue of config-driven commands: `--help` prints the keys of `sections` and returns None;
    otherwise the config is validated (before anything heavy is imported) and logging is set up."""
    if any(a in ("-h", "--help") for a in argv):
        from tunelab.config.help import format_help

        print(format_help(command, usage, sections))
        return None
    from tunelab.config import load_config
    from tunelab.utils.logging import setup_logging

    cfg = load_config(argv)
    setup_logging()
    return cfg
