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
    """A training config scores the adapter its training wrote (see model.loader.use_trained_adapter); its results
    go to <output_dir>/eval_<task> unless save_dir is given, so the run's own files (tunelab_config.yaml, which
    chat and export read) are never overwritten."""
    import logging
    import os

    from tunelab.config.parse import parse_cli_args
    from tunelab.model.loader import model_source, use_trained_adapter

    if cfg.model_name_or_path:
        model_source(cfg.model_name_or_path)
    trained = use_trained_adapter(cfg, "eval", set(parse_cli_args(argv)[1]))
    if trained is cfg or cfg.save_dir or not cfg.task:
        return trained
    save_dir = os.path.join(cfg.output_dir, f"eval_{cfg.task.strip()}")
    logging.getLogger(__name__).info("eval: results go to %s (set save_dir to choose)", save_dir)
    return trained.replace(save_dir=save_dir)
