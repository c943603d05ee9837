"""`tunelab eval`: measure a model (base, base + adapter, merged, 4/8-bit) on one task and write the results.

    from tunelab.config import load_config
    from tunelab.eval import run_eval
    run_eval(load_config(["cfg.yaml", "task=predict", "eval_dataset=my_eval"]))

Tasks: predict (generation + BLEU/ROUGE, tunelab.eval.predict), perplexity (tunelab.eval.perplexity), and
mmlu / cmmlu / ceval or any benchmark folder in task_dir (tunelab.eval.choice). `tunelab eval compare A B` is
tunelab.eval.compare. The order of work is the same for every task: read and check the data, then load the model
through the inference engine (so a bad file fails in a second, not after a model load), then score and write the
results atomically into output_dir (save_dir, LLaMA-Factory's name, wins when given), next to
tunelab_config.yaml: every key and what tunelab derived from the hardware.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from tunelab.errors import ConfigError

logger = logging.getLogger(__name__)

GENERATION_TASKS = ("predict", "perplexity")


def output_dir_of(cfg) -> str:
    """save_dir (LLaMA-Factory's eval key) when given, else output_dir."""
    return os.path.abspath(cfg.save_dir or cfg.output_dir)


def for_training_config(cfg, cli_keys: set[str] | frozenset[str] = frozenset()):
    """A training config scores the adapter its training wrote (see model.loader.use_trained_adapter; cli_keys: the
    keys given on the command line, where adapter_name_or_path wins); its results go to <output_dir>/eval_<task>
    unless save_dir is given, so the run's own files (tunelab_config.yaml, which chat and export read) are never
    overwritten. When the model scored is not that adapter (adapter_name_or_path on the command line, or not
    LoRA), the folder says what it is: eval_<task>_base for the base model alone, eval_<task>_<adapter folder
    name> for another adapter, so a base-model run never lands in the run folder itself nor over the trained
    adapter's results. Any other config is returned as it is."""
    from tunelab.model.loader import use_trained_adapter

    trained = use_trained_adapter(cfg, "eval", cli_keys)
    if not cfg.do_train or cfg.save_dir or not cfg.task:
        return trained
    folder = f"eval_{cfg.task.strip()}"
    if trained is cfg:
        folder += "_" + _model_label(cfg.adapter_name_or_path)
    save_dir = os.path.join(cfg.output_dir, folder)
    logger.info("eval: results go to %s (set save_dir to choose)", save_dir)
    return trained.replace(save_dir=save_dir)


def _model_label(adapters: str | None) -> str:
    """'base' without an adapter, else the folder name of the last adapter of the list."""
    last = [a.strip() for a in (adapters or "").split(",") if a.strip()][-1:]
    return os.path.basename(os.path.normpath(last[0])) if last else "base"


def run_eval(cfg, engine: Any = None) -> dict[str, Any]:
    """Run cfg.task; `engine` (a loaded tunelab.infer.engine.Engine) is built from cfg when not given."""
    from tunelab.config.resolve import resolve, save_resolved

    task = (cfg.task or "").strip()
    if not task:
        raise ConfigError("task is not set: use task=predict, task=perplexity, or a benchmark (mmlu, cmmlu, ceval, "
                          "or the name of a folder in task_dir).")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {cfg.batch_size}.")
    if cfg.n_shot < 0:
        raise ConfigError(f"n_shot must be 0 or more, got {cfg.n_shot}.")
    out = output_dir_of(cfg)

    # 1. data, checked before anything heavy is loaded
    if task in GENERATION_TASKS:
        from tunelab.eval.dataset import load_eval_conversations

        if task == "predict":
            from tunelab.eval.metrics import metric_libraries

            metric_libraries()  # nltk / jieba / rouge-chinese present, or stop now
        samples = load_eval_conversations(cfg, purpose=task)
    else:
        from tunelab.eval.choice import load_benchmark

        bench = load_benchmark(cfg)

    # 2. the model, through the one inference engine
    resolved = resolve(cfg)
    if engine is None:
        from tunelab.infer.engine import Engine

        engine = Engine.from_config(cfg, resolved=resolved, max_batch_size=cfg.batch_size)
    os.makedirs(out, exist_ok=True)
    save_resolved(cfg, resolved, os.path.join(out, "tunelab_config.yaml"))

    # 3. score and write
    if task in GENERATION_TASKS:
        from tunelab.eval.dataset import held_out

        conversations = held_out(samples, cfg, engine.template)
        if task == "predict":
            from tunelab.eval.predict import run_predict

            return run_predict(cfg, engine, conversations, out)
        from tunelab.eval.perplexity import run_perplexity

        return run_perplexity(cfg, engine, conversations, out)
    from tunelab.eval.choice import run_choice

    return run_choice(cfg, engine, bench, out)
