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
    chat and export read) are never overwritten. When the model scored is not that adapter (adapter_name_or_path
    on the command line, or not LoRA), the folder says what it is: eval_<task>_base for the base model alone,
    eval_<task>_<adapter folder name> for another adapter, so a base-model run never lands in the run folder itself
    nor over the trained adapter's results."""
    import logging
    import os

    from tunelab.config.parse import parse_cli_args
    from tunelab.model.loader import model_source, use_trained_adapter

    if cfg.model_name_or_path:
        model_source(cfg.model_name_or_path)
    trained = use_trained_adapter(cfg, "eval", set(parse_cli_args(argv)[1]))
    if not cfg.do_train or cfg.save_dir or not cfg.task:
        return trained
    folder = f"eval_{cfg.task.strip()}"
    if trained is cfg:
        folder += "_" + _model_label(cfg.adapter_name_or_path)
    save_dir = os.path.join(cfg.output_dir, folder)
    logging.getLogger(__name__).info("eval: results go to %s (set save_dir to choose)", save_dir)
    return trained.replace(save_dir=save_dir)


def _model_label(adapters: str | None) -> str:
    """'base' without an adapter, else the folder name of the last adapter of the list."""
    import os

    last = [a.strip() for a in (adapters or "").split(",") if a.strip()][-1:]
    return os.path.basename(os.path.normpath(last[0])) if last else "base"
