"""A command's own `--flags` taken out of argv, the rest left for the config parser (`tunelab chat`, `tunelab api`).

    taken, rest = take_flags(["cfg.yaml", "--prompt", "Hi", "top_k=5", "--compare-base"], {"prompt"}, {"compare_base"})
    # taken == [("prompt", "Hi"), ("compare_base", True)], rest == ["cfg.yaml", "top_k=5"]

A flag is `--name value` or `--name=value`, with `-` and `_` alike in the name (`--batch-size` is batch_size).
A boolean flag alone means true; `--name=value` means true for 1/true/yes/on, false for anything else. Everything
else (a config file, key=value, `--key value` for config keys) stays in `rest`, in order. Flags come back in
argv order, repeats included, so a command decides what a repeat means (chat: the last wins; api's --lora: one
adapter each).
"""
from __future__ import annotations

from collections.abc import Collection

from tunelab.errors import ConfigError

TRUE_WORDS = ("1", "true", "yes", "on")


def take_flags(
    argv: list[str], value_flags: Collection[str], bool_flags: Collection[str] = ()
) -> tuple[list[tuple[str, str | bool]], list[str]]:
    """(the command's flags as (key, value) pairs in argv order, the other arguments); a value flag at the end of
    argv without its value is a ConfigError naming it."""
    taken: list[tuple[str, str | bool]] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        name, eq, value = tok[2:].partition("=") if tok.startswith("--") else ("", "", "")
        key = name.replace("-", "_")
        if key in bool_flags:
            taken.append((key, not eq or value.strip().lower() in TRUE_WORDS))
        elif key in value_flags:
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"--{name} needs a value.")
                i += 1
                value = argv[i]
            taken.append((key, value))
        else:
            rest.append(tok)
        i += 1
    return taken, rest
