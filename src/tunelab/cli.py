"""The `tunelab` command line: a thin dispatcher that imports each subcommand's module only when used.

    tunelab --help
    tunelab train examples/quickstart.yaml max_steps=20
    tunelab env

Each subcommand lives in `tunelab/commands/<name>.py` and exposes `main(argv: list[str]) -> int`.
`--help` must answer in well under a second, so nothing here imports torch.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

# name -> (module, one-line help). Modules are imported lazily.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("tunelab.commands.train", "fine-tune a model with LoRA / QLoRA / freeze / full (SFT)"),
    "chat": ("tunelab.commands.chat", "talk to a base or fine-tuned model (interactive or --prompt)"),
    "api": ("tunelab.commands.api", "serve base + fine-tuned models over an OpenAI-compatible HTTP API"),
    "export": ("tunelab.commands.export", "merge a LoRA adapter into its base model and save it"),
    "eval": ("tunelab.commands.eval", "evaluate: predict (BLEU/ROUGE), perplexity, mmlu/cmmlu/ceval, compare"),
    "data": ("tunelab.commands.data", "convert, split, validate, inspect and register datasets"),
    "bench": ("tunelab.commands.bench", "measure training speed and memory against the plain stack (GPU)"),
    "estimate": ("tunelab.commands.estimate", "predict GPU memory of a training run from the model config; what fits a card"),
    "webui": ("tunelab.commands.webui", "the browser UI: data, train, evaluate, chat, export (English / 中文)"),
    "webchat": ("tunelab.commands.webchat", "the browser chat alone, for the model a config names"),
    "quickstart": ("tunelab.commands.quickstart", "write the offline tiny model and demo data used by examples/quickstart.yaml"),
    "env": ("tunelab.commands.env", "print versions of Python, torch, CUDA, GPUs and libraries (for bug reports)"),
}

USAGE = "usage: tunelab <command> [config.yaml] [key=value ...] [--key value ...] [--debug]"


def _print_help() -> None:
    from tunelab import __version__

    lines = [f"tunelab {__version__}", USAGE, "", "commands:"]
    for name, (module, text) in COMMANDS.items():
        if _available(module):
            lines.append(f"  {name:<11} {text}")
    lines += [
        "",
        "Keys are LLaMA-Factory's names (learning_rate, lora_rank, dataset, ...): a YAML/JSON file,",
        "then key=value overrides, or --key value flags. `tunelab <command> --help` lists each command's options.",
        "Add --debug to see a full traceback on errors.",
    ]
    print("\n".join(lines))


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("TUNELAB_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        try:
            _print_help()
        except BrokenPipeError:
            pass
        return 0
    if argv[0] in ("-V", "--version", "version"):
        from tunelab import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS or not _available(COMMANDS[name][0]):
        import difflib

        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"tunelab: unknown command '{name}'.{hint} Run `tunelab --help` for the list.", file=sys.stderr)
        return 2
    from tunelab.errors import TunelabError

    try:
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.main(rest) or 0)
    except TunelabError as exc:
        if debug:
            raise
        print(f"tunelab {name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"tunelab {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tunelab ... | head`: the reader left; not an error of ours
        import os as _os

        _os.dup2(_os.open(_os.devnull, _os.O_WRONLY), sys.stdout.fileno())
        return 0
    except SystemExit as exc:  # argparse inside a subcommand: keep main() returning a code
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)


if __name__ == "__main__":
    raise SystemExit(main())
