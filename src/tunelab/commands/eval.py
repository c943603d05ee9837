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
    if any(a in ("-h", "--help") for a in argv):
        from tunelab.config.help import format_help

        print(format_help("eval", USAGE, SECTIONS))
        return 0
    from tunelab.config import load_config
    from tunelab.utils.logging import setup_logging

    cfg = load_config(argv)  # validated before anything heavy is imported
    setup_logging()
    from tunelab.eval import run_eval

    run_eval(cfg)
    return 0
