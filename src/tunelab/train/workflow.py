"""`tunelab train`: config -> data -> model -> trainer -> outputs, read top to bottom in `run_train`.

    from tunelab.config import load_config
    from tunelab.train.workflow import run_train
    run_train(load_config("examples/quickstart.yaml"))

What a run leaves in output_dir: adapter_model.safetensors + adapter_config.json (PEFT format), the tokenizer
with its chat template, checkpoint-N/ folders (resumable), trainer_log.jsonl, train_results.json /
eval_results.json / all_results.json, training_loss.png and training_eval_loss.png (plot_loss), and
tunelab_config.yaml (every key with defaults filled in, plus what tunelab derived from the hardware).
"""
from __future__ import annotations

import logging
import math
import os
import shutil
from typing import Any

from tunelab.config.parse import Config
from tunelab.config.resolve import Resolved, resolve, save_resolved
from tunelab.errors import ConfigError
from tunelab.utils.checkpoints import incomplete_checkpoints, latest_checkpoint, list_checkpoints

logger = logging.getLogger(__name__)


def decide_resume(cfg: Config, output_dir: str) -> str | None:
    """Which checkpoint to continue from: explicit path, `true` = latest, or the latest found in output_dir."""
    if cfg.overwrite_output_dir:
        return None
    rfc = cfg.resume_from_checkpoint
    if isinstance(rfc, str):
        if not os.path.isdir(rfc):
            raise ConfigError(f"resume_from_checkpoint '{rfc}' does not exist.")
        return rfc
    latest = latest_checkpoint(output_dir)
    if rfc is True and latest is None:
        raise ConfigError(f"resume_from_checkpoint: true, but {output_dir} holds no complete checkpoint to resume from.")
    if rfc is False:
        return None
    broken = incomplete_checkpoints(output_dir)
    if broken:
        logger.warning("ignoring incomplete checkpoint(s) %s (a save was interrupted)", ", ".join(os.path.basename(b) for b in broken))
    if latest:
        logger.info("continuing from %s (output_dir holds checkpoints; set overwrite_output_dir: true to start over)", latest)
    return latest


# What a run (or a do_predict run) writes into output_dir: overwrite_output_dir removes all of it before training,
# so a run killed early never leaves the old run's adapter or results beside its new checkpoints. Files the user
# put there (a dataset, notes) are not on the list and stay.
RUN_OUTPUT_FILES = frozenset({
    "adapter_model.safetensors", "adapter_model.bin", "adapter_config.json", "model.safetensors", "pytorch_model.bin",
    "model.safetensors.index.json", "config.json", "generation_config.json", "README.md", "training_args.bin",
    "trainer_log.jsonl", "trainer_state.json", "train_results.json", "eval_results.json", "all_results.json",
    "predict_results.json", "generated_predictions.jsonl", "training_loss.png", "training_eval_loss.png",
    "tunelab_config.yaml", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
})
RUN_OUTPUT_FOLDERS = frozenset({"runs"})  # TensorBoard's default logging_dir


def old_run_outputs(output_dir: str) -> list[str]:
    """Paths in output_dir that a previous run wrote (checkpoints, adapter, logs, results, plots, tokenizer)."""
    if not os.path.isdir(output_dir):
        return []
    out = [path for _, path in list_checkpoints(output_dir, complete_only=False)]
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if (name in RUN_OUTPUT_FILES and os.path.isfile(path)) or (name in RUN_OUTPUT_FOLDERS and os.path.isdir(path)):
            out.append(path)
        elif name.startswith("model-") and name.endswith(".safetensors"):  # full fine-tuning shards
            out.append(path)
    return out


def prepare_output_dir(cfg: Config, output_dir: str) -> None:
    if cfg.overwrite_output_dir:
        old = old_run_outputs(output_dir)
        for path in old:
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        if old:
            logger.info("overwrite_output_dir: removed %d outputs of the previous run from %s", len(old), output_dir)
    os.makedirs(output_dir, exist_ok=True)


def check_output_dir(output_dir: str) -> None:
    """output_dir must be a folder or creatable as one: not a file, not under a file (checked before any load)."""
    path = os.path.abspath(output_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"output_dir '{output_dir}' is a file: give a folder (new or one of an earlier run) for the adapter, checkpoints and logs.")
    parent = path
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent) if os.path.dirname(parent) != parent else ""
    if parent and not os.path.isdir(parent):
        raise ConfigError(f"output_dir '{output_dir}' lies under '{parent}', which is a file, so the folder cannot be made: choose another output_dir.")
    if parent and not os.access(parent, os.W_OK):
        raise ConfigError(f"output_dir '{output_dir}' cannot be written: '{parent}' is not writable for this user.")


def training_arguments(cfg: Config, resolved: Resolved, has_eval: bool):
    """TrainingArguments from the config; keys this transformers version lacks are left out."""
    import inspect

    from tunelab.train.distributed import trainer_arguments
    from transformers import TrainingArguments

    eval_strategy = cfg.eval_strategy if has_eval else "no"
    load_best = cfg.load_best_model_at_end and has_eval
    save_steps = cfg.save_steps
    if load_best and eval_strategy == "steps" and save_steps % resolved.eval_steps:
        raise ConfigError(
            f"load_best_model_at_end needs save_steps ({save_steps}) to be a multiple of eval_steps ({resolved.eval_steps}), "
            "so that every evaluated step has a checkpoint to pick."
        )
    kwargs: dict[str, Any] = dict(
        output_dir=resolved.output_dir,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps if cfg.warmup_steps > 0 else cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_epsilon=cfg.adam_epsilon,
        max_grad_norm=cfg.max_grad_norm,
        optim=_optimizer(cfg, resolved),
        seed=cfg.seed,
        data_seed=cfg.seed,
        fp16=resolved.fp16,
        bf16=resolved.bf16,
        logging_steps=cfg.logging_steps,
        logging_first_step=False,
        save_strategy=cfg.save_strategy,
        save_steps=save_steps,
        save_total_limit=cfg.save_total_limit,
        save_only_model=cfg.save_only_model,
        eval_strategy=eval_strategy,
        eval_steps=resolved.eval_steps,
        load_best_model_at_end=load_best,
        metric_for_best_model=cfg.metric_for_best_model,
        greater_is_better=False if cfg.metric_for_best_model.endswith("loss") else None,
        report_to=resolved.report_to or "none",
        run_name=cfg.swanlab_run_name if (cfg.use_swanlab and cfg.swanlab_run_name) else cfg.run_name,
        dataloader_num_workers=cfg.dataloader_num_workers,
        dataloader_pin_memory=cfg.dataloader_pin_memory and resolved.device == "cuda",
        ddp_timeout=cfg.ddp_timeout,
        **trainer_arguments(cfg, resolved),  # DDP / FSDP / DeepSpeed settings when launched (none on one process)
        # gradient checkpointing is enabled on the model by the loader (non-reentrant), before PEFT wraps it; the
        # Trainer must not enable it again (newer transformers call the switch activation_checkpointing)
        activation_checkpointing=False,
        remove_unused_columns=False,
        include_num_input_tokens_seen=False,  # counted on the CPU by TunelabTrainer (no per-step sync)
        disable_tqdm=True,
        use_cpu=resolved.device == "cpu",
        prediction_loss_only=True,
        label_names=["labels"],
        logging_nan_inf_filter=False,
        save_safetensors=True,
    )
    if cfg.group_by_length:
        kwargs["train_sampling_strategy"] = "group_by_length"
        kwargs["group_by_length"] = True
    accepted = inspect.signature(TrainingArguments).parameters
    if "activation_checkpointing" not in accepted:
        kwargs["gradient_checkpointing"] = kwargs.pop("activation_checkpointing")
    return TrainingArguments(**{k: v for k, v in kwargs.items() if k in accepted})


def _optimizer(cfg: Config, resolved: Resolved) -> str:
    if cfg.optim in ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw_bnb_8bit") and resolved.device != "cuda":
        logger.warning("optim=%s needs a CUDA GPU (bitsandbytes paged/8-bit optimizer); using adamw_torch on %s.", cfg.optim, resolved.device)
        return "adamw_torch"
    if cfg.optim == "adamw_torch_fused" and resolved.device == "cpu":
        return "adamw_torch"
    return cfg.optim


def check_trackers(resolved: Resolved) -> None:
    import importlib.util

    for tracker in resolved.report_to:
        if importlib.util.find_spec(tracker) is None:
            raise ConfigError(f"report_to includes {tracker}, but the {tracker} package is not installed: pip install {tracker} (or pip install 'tunelab[tracking]').")


def setup_swanlab(cfg: Config) -> None:
    """SwanLab reads its settings from the environment through the Trainer integration."""
    if cfg.swanlab_project:
        os.environ.setdefault("SWANLAB_PROJ_NAME", cfg.swanlab_project)
    if cfg.swanlab_workspace:
        os.environ.setdefault("SWANLAB_WORKSPACE", cfg.swanlab_workspace)
    if cfg.swanlab_api_key:
        os.environ.setdefault("SWANLAB_API_KEY", cfg.swanlab_api_key)
    os.environ.setdefault("SWANLAB_MODE", cfg.swanlab_mode)


def planned_steps(cfg: Config, num_samples: int) -> int:
    """Optimizer steps the run will make (the Trainer's own arithmetic for epochs, unless max_steps is set)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    batches = math.ceil(num_samples / cfg.per_device_train_batch_size)
    per_epoch = max(batches // cfg.gradient_accumulation_steps + int(batches % cfg.gradient_accumulation_steps > 0), 1)
    return math.ceil(cfg.num_train_epochs * per_epoch)


def checkpoint_step(checkpoint: str) -> int:
    import json

    try:
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as fh:
            return int(json.load(fh)["global_step"])
    except (OSError, ValueError, KeyError):
        return 0


def finish_from_checkpoint(cfg: Config, checkpoint: str, tokenizer, output_dir: str) -> dict[str, Any]:
    """The run already reached its last step: do not train again (that would add a step); complete its outputs."""
    import json

    from tunelab.train.plots import plot_loss
    from tunelab.utils.io import atomic_write_json, read_jsonl

    logger.info("%s already holds the last step (%s): nothing to train; set overwrite_output_dir: true to start over",
                output_dir, os.path.basename(checkpoint))
    results = os.path.join(output_dir, "all_results.json")
    if os.path.isfile(results) and any(n.endswith(".safetensors") for n in os.listdir(output_dir)):
        with open(results, encoding="utf-8") as fh:
            return json.load(fh)
    # killed between the last checkpoint and the final save: the last checkpoint is the final model
    for name in os.listdir(checkpoint):
        if name.endswith((".safetensors", ".json")) and not name.startswith(("trainer_state", "optimizer", "scheduler", "rng_state")):
            shutil.copy2(os.path.join(checkpoint, name), os.path.join(output_dir, name))
    tokenizer.save_pretrained(output_dir)
    losses = [r["loss"] for r in read_jsonl(os.path.join(output_dir, "trainer_log.jsonl")) if "loss" in r]
    metrics = {"global_step": checkpoint_step(checkpoint), "train_loss": sum(losses) / len(losses) if losses else None}
    atomic_write_json(os.path.join(output_dir, "train_results.json"), metrics)
    atomic_write_json(results, metrics)
    if cfg.plot_loss:
        plot_loss(output_dir, smoothing=cfg.plot_smoothing)
    return metrics


def save_final(trainer, tokenizer, output_dir: str) -> None:
    trainer.save_model(output_dir)  # every rank: FSDP / ZeRO-3 gather the weights; rank 0 writes
    if trainer.args.should_save:
        tokenizer.save_pretrained(output_dir)


NOTHING_TO_DO = (
    "nothing to do: do_train and do_predict are both false (LLaMA-Factory's defaults for keys a config leaves out). "
    "Add do_train: true to train, or do_predict: true with predict_with_generate: true to generate answers for "
    "eval_dataset; `tunelab eval` scores a model otherwise (task=perplexity gives the eval loss)."
)


def run_train(cfg: Config) -> dict[str, Any]:
    """A `tunelab train` run, as LLaMA-Factory's run_sft: train when do_train, then predict when do_predict.

    The cheap checks come first (output_dir, model source, the run-folder lock, the data's registry, files and
    records), so a typo fails in a second rather than after the tokenizer and model load. Returns the metrics."""
    from tunelab.model.loader import model_source
    from tunelab.utils.lock import RunLock

    if not cfg.do_train and not cfg.do_predict:
        if cfg.do_eval:  # LLaMA-Factory would compute the eval loss of the model as it is
            raise ConfigError("do_eval without do_train or do_predict: `tunelab train` trains or predicts; for the eval "
                              "loss of a model as it is, run `tunelab eval <config> task=perplexity`.")
        raise ConfigError(NOTHING_TO_DO)
    if not cfg.model_name_or_path:
        raise ConfigError("model_name_or_path is not set: give a local model folder or a hub id (e.g. Qwen/Qwen2.5-7B-Instruct).")
    check_output_dir(cfg.output_dir)
    if model_source(cfg.model_name_or_path) == "hub":
        logger.info("model_name_or_path '%s': no local folder of that name, so it is read from the hub", cfg.model_name_or_path)
    if cfg.do_predict:
        check_predict(cfg)
    # Rank 0 holds the lock for all processes of a multi-GPU run (the others write nothing of their own there).
    lock = RunLock(cfg.output_dir) if int(os.environ.get("RANK", "0")) == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        check_data_early(cfg)
        metrics: dict[str, Any] = train_sft(cfg) if cfg.do_train else {}
        if cfg.do_predict and int(os.environ.get("RANK", "0")) == 0:  # several processes: rank 0 generates alone
            metrics.update(run_prediction(cfg, trained=cfg.do_train))
        return metrics
    finally:
        if lock is not None:
            lock.release()


EARLY_CHECK_RECORDS = 1000


def check_data_early(cfg: Config) -> None:
    """The registry, the data files and the shape of the first records (EARLY_CHECK_RECORDS of each local dataset)
    before anything heavy: an unregistered name, a missing file or a broken line fails in a second. The full read
    (every record) follows with the tokenizer; hub datasets are only looked up here."""
    from tunelab.data.loader import load_conversations, split_names
    from tunelab.data.registry import resolve_dataset

    for key, required in (("dataset", cfg.do_train), ("eval_dataset", False)):
        names = getattr(cfg, key)
        if not names:
            if required:
                raise ConfigError("dataset is not set: name a dataset from dataset_info.json, a built-in one (alpaca_gpt4_en) or a file path.")
            continue
        local = [n for n in split_names(names) if resolve_dataset(n, cfg.dataset_dir).load_from == "file"]
        if local:
            limit = min(cfg.max_samples or EARLY_CHECK_RECORDS, EARLY_CHECK_RECORDS)
            load_conversations(local, cfg.dataset_dir, max_samples=limit, skip_invalid=cfg.skip_invalid,
                               require_reply=key == "dataset" or cfg.do_train, seed=cfg.seed)


def check_predict(cfg: Config) -> None:
    """do_predict needs data to predict on (as LLaMA-Factory) and the metric libraries, checked before training."""
    if not cfg.eval_dataset and not cfg.val_size > 0:
        raise ConfigError(
            "do_predict: true predicts on evaluation data: set eval_dataset (a dataset name or file), or val_size "
            "to predict on the part held out from dataset (as LLaMA-Factory)."
        )
    from tunelab.eval.metrics import metric_libraries

    metric_libraries()  # nltk / jieba / rouge-chinese present, or stop now rather than after training


def run_prediction(cfg: Config, *, trained: bool) -> dict[str, Any]:
    """do_predict: generate an answer for every sample of eval_dataset (or of the val_size split) and write
    generated_predictions.jsonl + predict_results.json (BLEU-4 / ROUGE) into output_dir, as LLaMA-Factory's
    do_predict does, through tunelab's predict code (tunelab.eval.predict). The model is the adapter just trained
    (do_train), else base + adapter_name_or_path; batches of per_device_eval_batch_size."""
    import json

    from tunelab.eval.dataset import held_out, load_eval_conversations
    from tunelab.eval.predict import run_predict
    from tunelab.infer.engine import Engine
    from tunelab.utils.io import atomic_write_json, honour_umask

    output_dir = os.path.abspath(cfg.output_dir)
    changes: dict[str, Any] = {"batch_size": cfg.per_device_eval_batch_size, "save_dir": None}
    if trained:
        changes.update(adapter_name_or_path=output_dir, checkpoint=None)
    pcfg = cfg.replace(**changes)
    samples = load_eval_conversations(pcfg, purpose="predict")
    resolved = resolve(pcfg)
    engine = Engine.from_config(pcfg, resolved=resolved, max_batch_size=pcfg.batch_size)
    conversations = held_out(samples, pcfg, engine.template)
    os.makedirs(output_dir, exist_ok=True)
    if not trained:
        save_resolved(pcfg, resolved, os.path.join(output_dir, "tunelab_config.yaml"))
    logger.info("do_predict: generating for %d samples with %s", len(conversations),
                f"the adapter just trained in {output_dir}" if trained else (pcfg.adapter_name_or_path or "the base model"))
    results = run_predict(pcfg, engine, conversations, output_dir)
    all_path = os.path.join(output_dir, "all_results.json")  # LLaMA-Factory's save_metrics adds them there too
    merged: dict[str, Any] = {}
    if trained and os.path.isfile(all_path):
        with open(all_path, encoding="utf-8") as fh:
            merged = json.load(fh)
    merged.update(results)
    atomic_write_json(all_path, merged)
    honour_umask(output_dir)
    return results


def resolve_batch_size(cfg: Config, resolved: Resolved) -> Config:
    """per_device_train_batch_size: auto -> the memory estimate's choice on the GPU at hand (logged); else cfg as is."""
    if cfg.per_device_train_batch_size != "auto":
        return cfg
    from tunelab.estimate.runtime import auto_batch

    batch, reason = auto_batch(cfg, resolved.device)
    logger.info("per_device_train_batch_size: auto -> %d (%s)", batch, reason)
    return cfg.replace(per_device_train_batch_size=batch)


def warn_if_too_big(cfg: Config, resolved: Resolved) -> None:
    """Before the model loads: warn when the memory estimate exceeds the GPU's free memory (one process, unsharded)."""
    if getattr(cfg, "fsdp", None) or cfg.deepspeed or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    from tunelab.estimate.runtime import fit_warning

    warning = fit_warning(cfg, resolved.device)
    if warning:
        logger.warning(warning)


def peak_memory() -> dict[str, float]:
    """The run's real peak GPU memory, allocated and reserved (what `tunelab estimate` predicts), for the results."""
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"peak_memory_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
            "peak_memory_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3)}


def train_sft(cfg: Config) -> dict[str, Any]:
    """The training part of a run (do_train). Returns the final metrics (also written to all_results.json)."""
    from tunelab.data.collator import Collator, PackedSet, full_pack_length, pad_multiple
    from tunelab.data.processing import build_datasets
    from tunelab.data.template import get_template, template_mismatch_warning
    from tunelab.model.fast.varlen import active as varlen_active
    from tunelab.model.kernels import select_loss
    from tunelab.model.loader import load_model
    from tunelab.model.tokenizer import load_tokenizer
    from tunelab.train.callbacks import GradientHealthCallback, LogCallback
    from tunelab.train.distributed import barrier, check_distributed, init_distributed, main_process_first, min_across_ranks
    from tunelab.train.plots import plot_loss
    from tunelab.train.trainer import TunelabTrainer
    from tunelab.utils.io import atomic_write_json, honour_umask
    from transformers import PrinterCallback, set_seed

    resolved = resolve(cfg)
    for warning in resolved.warnings:
        logger.warning(warning)
    check_trackers(resolved)
    check_distributed(cfg, resolved)
    rank = init_distributed(resolved.device, cfg.ddp_timeout)  # one process alone: nothing to join
    if "swanlab" in resolved.report_to:
        setup_swanlab(cfg)
    output_dir = resolved.output_dir
    auto_batch = cfg.per_device_train_batch_size == "auto"
    cfg = resolve_batch_size(cfg, resolved)  # per_device_train_batch_size: auto -> a number, before anything uses it
    if auto_batch and rank.distributed:  # every rank trains one batch size: the largest that fits on all GPUs
        cfg = cfg.replace(per_device_train_batch_size=min_across_ranks(cfg.per_device_train_batch_size))

    # 1. tokenizer, template, data (before the model: data errors surface in seconds, not after a 20 s load)
    tokenizer = load_tokenizer(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code, cache_dir=cfg.cache_dir, revision=cfg.model_revision)
    template = get_template(cfg.template, tokenizer, enable_thinking=cfg.enable_thinking)
    mismatch = template_mismatch_warning(template, tokenizer)
    if mismatch:
        logger.warning(mismatch)
    with main_process_first():  # rank 0 tokenizes into the cache; the other ranks then read it
        data = build_datasets(cfg, tokenizer, template)
    logger.info("data: %d training samples (%d tokens, %d trained), %d evaluation samples",
                data.stats["train_samples"], data.stats["train_tokens"], data.stats["train_trained_tokens"], data.stats["eval_samples"])

    # 2. output folder and resume decision, then the model
    resume = decide_resume(cfg, output_dir)
    barrier()  # every rank has read output_dir before rank 0 changes it
    if rank.is_main:
        prepare_output_dir(cfg, output_dir)
    barrier()
    if resume and checkpoint_step(resume) >= planned_steps(cfg, len(data.train)):
        metrics = finish_from_checkpoint(cfg, resume, tokenizer, output_dir) if rank.is_main else {}
        barrier()
        return metrics
    args = training_arguments(cfg, resolved, has_eval=data.eval is not None)  # before the model: ZeRO-3 loads by it
    set_seed(cfg.seed)  # the adapter's initialisation is random too: the seed must cover it
    warn_if_too_big(cfg, resolved)
    model = load_model(cfg, resolved, for_training=True)
    # ZeRO-3 gathers a weight only when its module runs; the fused loss reads the output head's weight without
    # running the head, so there the model computes its own loss
    loss_impl = "plain" if resolved.parallel == "deepspeed-zero3" else select_loss(model)
    logger.info("loss: %s cross-entropy", "fused linear" if loss_impl == "fused" else "plain")

    # 3. trainer
    pad_to = pad_multiple(resolved.device, cfg.cutoff_len,
                          graphs=getattr(model, "_tunelab_layer_graphs", None) is not None)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if cfg.packing:
        train_set = PackedSet(data.train, cfg.cutoff_len)
        logger.info("packing: %d samples into %d rows of up to %d tokens", len(data.train), len(train_set), cfg.cutoff_len)
    else:
        train_set = data.train
    trainer = TunelabTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=data.eval,
        data_collator=Collator(pad_id, pad_to, varlen=varlen_active(model),
                               pack_length=full_pack_length(cfg.cutoff_len if cfg.packing else None)),
        processing_class=tokenizer,
        callbacks=[log_callback := LogCallback(output_dir), GradientHealthCallback()],
        loss_impl=loss_impl,
        nan_check=cfg.nan_check,
    )
    trainer.remove_callback(PrinterCallback)  # our LogCallback prints the progress lines
    if rank.is_main:
        save_resolved(cfg, resolved, os.path.join(output_dir, "tunelab_config.yaml"))

    # 4. train, save, report
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    finally:  # an error inside the loop skips on_train_end: the run's SIGTERM handler must not outlive it
        log_callback.stop_request.restore()
    trainer.check_pending_losses()  # a NaN in the last steps must not reach the saved adapter
    save_final(trainer, tokenizer, output_dir)
    metrics = dict(result.metrics)
    metrics["num_input_tokens_seen"] = trainer.state.num_input_tokens_seen
    metrics.update(peak_memory())
    trainer.save_metrics("train", metrics)
    if data.eval is not None:  # the final evaluation, unless the last step was just evaluated
        done = [r for r in trainer.state.log_history if "eval_loss" in r and r.get("step") == trainer.state.global_step]
        eval_metrics = {k: v for k, v in done[-1].items() if k.startswith("eval_")} if done else trainer.evaluate()
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    trainer.save_state()
    if rank.is_main:  # (the Trainer's own save_metrics / save_state write on rank 0 only)
        atomic_write_json(os.path.join(output_dir, "all_results.json"), metrics)
        if cfg.plot_loss:
            plot_loss(output_dir, smoothing=cfg.plot_smoothing)
        honour_umask(output_dir)  # safetensors and mkstemp write 0600; outputs read like any other file
    barrier()  # no rank leaves (and no launcher reports success) before the outputs are complete
    logger.info("done: adapter and logs in %s", output_dir)
    return metrics
