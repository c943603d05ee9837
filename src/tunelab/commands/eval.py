"""`tunelab eval [config.yaml] task=... [key=value ...]`: predict (BLEU/ROUGE), perplexity, mmlu/cmmlu/ceval;
`tunelab eval compare A B [--out DIR]`: the before/after report of two evaluations (see tunelab.eval)."""
from __future__ import annotations

USAGE = (
    "usage: tunelab eval [config.yaml] task=predict|perplexity|mmlu|cmmlu|ceval|<folder in task_dir> [key=value ...]\n"
    "       tunelab eval compare A B [--out DIR] [--samples N]"
)
SECTIONS = ("eval", "model", "quantization", "data", "generation")


def main(argv: list[str]) -> int:
    if argv and argv[0] == "compare":
        from tunelab.utils.logging import setup_logging

        setup_logging()
        from tunelab.eval.compare import main as compare_main

        return compare_main(argv[1:])
    from tunelab.commands import command_config

    cfg = command_config(argv, "eval", USAGE, SECTIONS)
    if cfg is None:
        return 0
    from tunelab.eval import run_eval

    run_eval(cfg)
    return 0
