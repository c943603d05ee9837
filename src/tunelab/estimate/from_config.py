"""A training config (tunelab / LLaMA-Factory keys) as the estimate's Setup: every key that changes memory.

    shape, setup, notes = setup_from_config(load_config("examples/qwen2.5-7b-instruct_qlora_alpaca_zh.yaml"))
    shape, setup, notes, plan = setup_and_plan_from_config(cfg)      # plan: the fast path's decisions, with reasons

Keys taken into account: model_name_or_path, finetuning_type, quantization_bit, double_quantization,
lora_rank, lora_target, lora_dropout, additional_target, freeze_trainable_layers, per_device_train_batch_size,
cutoff_len, gradient_checkpointing / disable_gradient_checkpointing, optim, flash_attn, enable_liger_kernel,
use_fast_kernels, packing, rope_scaling, and the fast path's environment switches (TUNELAB_FAST_COMPILE,
TUNELAB_OFFLOAD_CHECKPOINTS, TUNELAB_HOST_EMBEDDING; fastpath.py). Keys that change memory but are not modelled
(use_dora, pure_bf16) give a note.
"""
from __future__ import annotations

import importlib.util
import os

from tunelab.errors import ConfigError
from tunelab.estimate.archs import ModelShape, model_shape
from tunelab.estimate.memory import Setup
from tunelab.estimate.terms import LORA_TARGETS


def liger_default() -> bool:
    """What enable_liger_kernel: null means on a CUDA GPU for eager layers: Liger when the package is installed."""
    return importlib.util.find_spec("liger_kernel") is not None


def apply_plan(shape: ModelShape, setup: Setup, cfg=None, liger: bool | None = None, ask_triton: bool = False):
    """(setup, plan): the fast path's decisions made for this setup as the trainer makes them (fastpath.py), and the
    setup's liger / compiled / offload / host_embedding set from them. cfg: the training config (for
    use_fast_kernels, use_dora, enable_liger_kernel, parallel keys, additional_target), or None for the CLI's model
    form (defaults; `liger` is enable_liger_kernel). The plain stack has no fast path: (setup, None)."""
    import types
    from dataclasses import replace

    from tunelab.estimate.fastpath import cli_config, fast_path_plan

    if setup.plain:
        return replace(setup, liger=False, compiled=False, offload=False, host_embedding=False), None
    view = cli_config(setup.method, setup.bits, setup.dropout, liger)
    if cfg is not None:
        keys = ("use_fast_kernels", "use_dora", "enable_liger_kernel", "deepspeed", "fsdp", "additional_target")
        view = types.SimpleNamespace(**{**vars(view), **{k: getattr(cfg, k, None) for k in keys}})
        if liger is not None:
            view.enable_liger_kernel = liger
    plan = fast_path_plan(shape, view, grad_ckpt=setup.grad_ckpt, ask_triton=ask_triton)
    if view.use_fast_kernels is True and not plan.fused:  # the trainer's error (model.fast.apply_fast_path)
        raise ConfigError(f"use_fast_kernels: true, but the fast path cannot apply here: {plan.fused_reason}. "
                          "Set use_fast_kernels: null (auto) or false.")
    # the setup keeps what the trainer would install with checkpointing on, so that a changed gradient_checkpointing
    # (fit's recommendations) gets the offload, and the host embedding that follows it, as the trainer would
    # (and a 4-bit base, where fit switches a 16-bit one, the host embedding the trainer gives only to 4-bit bases)
    with_ckpt = plan if setup.grad_ckpt else fast_path_plan(shape, view, grad_ckpt=True, ask_triton=ask_triton)
    view4 = types.SimpleNamespace(**{**vars(view), "quantization_bit": 4, "finetuning_type": "lora"})
    host = fast_path_plan(shape, view4, grad_ckpt=True, ask_triton=ask_triton).host_embedding if with_ckpt.fused else False
    follows = host and os.environ.get("TUNELAB_HOST_EMBEDDING") != "1"
    return replace(setup, liger=plan.liger, compiled=plan.compiled, offload=with_ckpt.offload,
                   host_embedding=host, host_embedding_with_offload=follows), plan


def parse_targets(text: str) -> tuple[str, ...]:
    """lora_target: all, or a comma list of projection names."""
    if text.strip() == "all":
        return LORA_TARGETS
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise ConfigError("lora_target is empty: use all or names such as q_proj,v_proj.")
    return names


def setup_from_config(cfg, batch: int | None = None, ask_triton: bool = False) -> tuple[ModelShape, Setup, list[str]]:
    """(shape, setup, notes) for a validated tunelab Config; `batch` overrides per_device_train_batch_size."""
    shape, setup, notes, _ = setup_and_plan_from_config(cfg, batch, ask_triton)
    return shape, setup, notes


def setup_and_plan_from_config(cfg, batch: int | None = None, ask_triton: bool = False):
    """(shape, setup, notes, plan): setup_from_config's, and the fast path's decisions (fastpath.FastPathPlan).
    ask_triton: on the training GPU itself, let the trainer's compile_decision ask torch for Triton."""
    from dataclasses import replace

    if not cfg.model_name_or_path:
        raise ConfigError("model_name_or_path is not set in the config: the estimate needs the model's config.")
    shape = model_shape(cfg.model_name_or_path)
    if cfg.rope_scaling and not shape.rope_scaling:
        shape = replace(shape, rope_scaling=True)
    notes = []
    bits = cfg.quantization_bit
    method = {"lora": "qlora" if bits else "lora", "freeze": "freeze", "full": "full"}[cfg.finetuning_type]
    size = batch if batch is not None else cfg.per_device_train_batch_size
    if not isinstance(size, int):
        size = 1  # "auto": the caller picks the batch with tunelab.estimate.fit
    ckpt = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else not cfg.disable_gradient_checkpointing
    attn = {"fa2": "fa2", "eager": "eager", "disabled": "eager"}.get(cfg.flash_attn, "sdpa")
    extra = tuple(t.strip() for t in (cfg.additional_target or "").split(",") if t.strip())
    if cfg.use_dora:
        notes.append("use_dora: DoRA's weight-norm terms are not modelled (the estimate is low for it).")
    if cfg.pure_bf16:
        notes.append("pure_bf16: modelled with fp32 trainable parameters (the estimate is slightly high).")
    setup = Setup(
        method=method, bits=bits, rank=cfg.lora_rank, targets=parse_targets(cfg.lora_target), dropout=cfg.lora_dropout,
        batch=size, seq=cfg.cutoff_len, grad_ckpt=ckpt, optim=cfg.optim, attn=attn, plain=False,
        double_quant=cfg.double_quantization, mask=bool(cfg.packing) or size > 1,
        freeze_layers=cfg.freeze_trainable_layers, extra_trainable=extra,
    )
    setup, plan = apply_plan(shape, setup, cfg, ask_triton=ask_triton)
    return shape, setup, notes, plan
