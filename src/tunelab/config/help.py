"""`tunelab <command> --help`: the keys of the schema sections a command reads, with defaults and help text."""
from __future__ import annotations

import dataclasses
import typing

from tunelab.config.parse import _describe
from tunelab.config.schema import SECTIONS


def format_help(command: str, usage: str, sections: typing.Sequence[str]) -> str:
    lines = [usage, ""]
    for name in sections:
        cls = SECTIONS[name]
        hints = typing.get_type_hints(cls)
        lines.append(f"{name} keys:")
        for f in dataclasses.fields(cls):
            default = f.default
            lines.append(f"  {f.name} ({_describe(hints[f.name])}; default {default!r})")
            lines.append(f"      {f.metadata.get('help', '')}")
        lines.append("")
    return "\n".join(lines)
