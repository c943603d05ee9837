"""Derived settings: what tunelab decided from the user's config and the hardware, kept apart from the config.

The user's values are never rewritten. `resolve(cfg)` returns a `Resolved` record (the dtype chosen for the GPU,
the device, the lora_alpha default, the trackers, ...) and the warnings that explain each fallback. Both are
saved next to the outputs (`tunelab_config.yaml`) so a run can be reproduced and compared.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from tunelab.config.parse import Config
from tunelab.errors import ConfigError

logger = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "wandb", "swanlab", "mlflow")


@dataclass
class Resolved:
    device: str  # cuda | npu | mps | cpu
    device_name: str
    compute_dtype: str  # float32 | bfloat16 | float16
    fp16: bool
    bf16: bool
    gradient_checkpointing: bool
    lora_alpha: int
    eval_steps: int | None
    report_to: list[str]
    output_dir: str
    attn_implementation: str
    use_modelscope: bool
    warnings: list[str] = field(default_factory=list)
    world_size: int = 1  # training processes (torchrun / accelerate WORLD_SIZE)
    parallel: str = "single"  # single | ddp | fsdp | deepspeed-zero<N>
    fast_path: str = "not applied"  # "on (...)" / "off (reason)": set by model.fast when a training model is built

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def detect_device() -> tuple[str, str]:
    """(kind, human name) of the accelerator training will use."""
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.cuda.get_device_name(0)
    if getattr(torch, "npu", None) is not None and torch.npu.is_available():  # Ascend, via torch_npu
        return "npu", "Ascend NPU"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps", "Apple MPS"
    return "cpu", "CPU"


def bf16_supported(device: str) -> bool:
    import torch

    if device == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device in ("cpu", "npu")


def resolve_precision(cfg: Config, device: str, device_name: str) -> tuple[str, bool, bool, list[str]]:
    """(compute dtype, fp16, bf16, warnings): honour the request, fall back with one warning where it cannot run."""
    warnings: list[str] = []
    if cfg.fp16 and device == "cpu":
        warnings.append("fp16 was requested but training runs on the CPU, where fp16 mixed precision is not available: training in float32 instead.")
        return "float32", False, False, warnings
    if cfg.bf16 and not bf16_supported(device):
        warnings.append(f"bf16 was requested but {device_name} does not support bfloat16: training in fp16 instead.")
        return "float16", True, False, warnings
    if cfg.bf16 or cfg.pure_bf16:
        return "bfloat16", False, True, warnings
    if cfg.fp16:
        return "float16", True, False, warnings
    if device == "cpu":
        return "float32", False, False, warnings
    # Neither was asked for on an accelerator: fp32 training would be slow and heavy, so pick the best 16-bit type.
    if bf16_supported(device):
        warnings.append(f"neither fp16 nor bf16 was set: training in bf16, which {device_name} supports (set fp16: true or bf16: true to choose).")
        return "bfloat16", False, True, warnings
    warnings.append(f"neither fp16 nor bf16 was set: training in fp16 on {device_name} (set bf16/fp16 to choose).")
    return "float16", True, False, warnings


def resolve_trackers(cfg: Config) -> list[str]:
    raw = [t.strip().lower() for t in cfg.report_to.split(",") if t.strip()]
    if raw in ([], ["none"]):
        trackers: list[str] = []
    elif raw == ["all"]:
        import importlib.util

        trackers = [t for t in TRACKERS if importlib.util.find_spec(t) is not None]
    else:
        unknown = [t for t in raw if t not in TRACKERS]
        if unknown:
            raise ConfigError(f"report_to: unknown tracker '{unknown[0]}'; use none, all, or a comma list of {', '.join(TRACKERS)}.")
        trackers = raw
    if cfg.use_swanlab and "swanlab" not in trackers:
        trackers.append("swanlab")
    return trackers


def resolve_attention(cfg: Config, device: str) -> str:
    if cfg.flash_attn in ("disabled", "eager"):
        return "eager"
    if cfg.flash_attn == "fa2":
        import importlib.util

        if device != "cuda" or importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("flash_attn: fa2 needs a CUDA GPU and the flash-attn package (pip install flash-attn); use flash_attn: sdpa or auto.")
        return "flash_attention_2"
    return "sdpa"


def resolve(cfg: Config) -> Resolved:
    device, device_name = detect_device()
    dtype, fp16, bf16, warnings = resolve_precision(cfg, device, device_name)
    if cfg.gradient_checkpointing is not None:
        checkpointing = cfg.gradient_checkpointing
    else:
        checkpointing = not cfg.disable_gradient_checkpointing
    if cfg.use_unsloth:
        warnings.append("use_unsloth is accepted for compatibility, but tunelab selects its own kernels; it is ignored.")
    # eval_steps unset: the Trainer uses logging_steps, whose LLaMA-Factory (transformers) default is 500; tunelab's
    # own logging default (10) is display only, so an unset logging_steps counts as 500 here.
    logging_steps = cfg.logging_steps if "logging_steps" in cfg.given else 500
    eval_steps = cfg.eval_steps if cfg.eval_steps is not None else (logging_steps if cfg.eval_strategy == "steps" else None)
    return Resolved(
        device=device,
        device_name=device_name,
        compute_dtype=dtype,
        fp16=fp16,
        bf16=bf16,
        gradient_checkpointing=checkpointing,
        lora_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_rank,
        eval_steps=eval_steps,
        report_to=resolve_trackers(cfg),
        output_dir=os.path.abspath(cfg.output_dir),
        attn_implementation=resolve_attention(cfg, device),
        use_modelscope=cfg.use_modelscope_hub or os.environ.get("USE_MODELSCOPE_HUB", "0").lower() in ("1", "true"),
        warnings=warnings,
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        parallel=resolve_parallel(cfg, int(os.environ.get("WORLD_SIZE", "1"))),
    )


def resolve_parallel(cfg: Config, world_size: int) -> str:
    """How the model is spread: FSDP / DeepSpeed from the config or an `accelerate launch` FSDP config, else DDP."""
    if cfg.deepspeed:
        from tunelab.config.parse import deepspeed_stage

        return f"deepspeed-zero{deepspeed_stage(cfg.deepspeed)}"
    if cfg.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return "fsdp"
    return "ddp" if world_size > 1 else "single"


def save_resolved(cfg: Config, resolved: Resolved, path: str) -> None:
    """Write every key (defaults filled in) and the derived values as YAML, atomically; secrets (hf_hub_token,
    swanlab_api_key, any *_token / *api_key*) are written as <redacted>."""
    import yaml

    from tunelab.utils.io import atomic_write_text
    from tunelab.utils.secrets import redact

    doc = {"config": redact(cfg.to_dict()), "given": redact(dict(cfg.given)), "resolved": redact(resolved.to_dict())}
    atomic_write_text(path, yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
