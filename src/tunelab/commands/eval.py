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
    cfg = trained_adapter_eval(cfg, argv)
    from tunelab.eval import run_eval

    run_eval(cfg)
    return 0


def trained_adapter_eval(cfg, argv: list[str]):
    """A training config scores the adapter its training wrote and writes to <output_dir>/eval_<task> (see
    tunelab.eval.for_training_config); adapter_name_or_path on the command line wins."""
    from tunelab.config.parse import parse_cli_args
    from tunelab.eval import for_training_config
    from tunelab.model.loader import model_source

    if cfg.model_name_or_path:
        model_source(cfg.model_name_or_path)
    return for_training_config(cfg, set(parse_cli_args(argv)[1]))
