"""Which parts of the training fast path a run gets, decided as `tunelab train` decides them, for the estimate.

    plan = fast_path_plan(shape, cfg)                 # planning (the CLI): no torch, no GPU needed
    plan = fast_path_plan(shape, cfg, ask_triton=True) # on the training GPU itself (runtime.py): torch's own answer

The fast path (tunelab.model.fast, docs/fastpath.md) changes the memory of a step in four ways, each its own
decision there and its own term here (memory.py):

* fused LoRA projections (`fast_path_decision`): the same tensors as PEFT's layers (the dense weight is never
  stored), so no term of its own; it gates the three below.
* compiled decoder layers (`compile_decision`, on by default on one CUDA GPU): Liger is left out, the compiled
  backward keeps the layer's dequantized weights from the recompute to grad x (all of them, not one at a time).
* checkpoint offload (`offload_decision`, on by default on one process; TUNELAB_OFFLOAD_CHECKPOINTS=0 turns it
  off): the layer inputs live in host memory; the GPU holds two (the one in backward and the prefetched one) and
  the recomputed layer's output.
* host embedding (`embed.host_embedding_decision`, on where the offload is; TUNELAB_HOST_EMBEDDING=1 / 0 forces
  it): the embedding table leaves the GPU.

What is the trainer's own code and what is mirrored:
* `fast_path_decision` and `offload_decision` are called as they are (they read only the config, the device kind,
  the parallel mode and the environment; no torch): the model they inspect is a stand-in carrying the config's
  model_type, the device is "cuda" (the estimate is for one CUDA GPU), the parallel mode is
  `tunelab.config.resolve.resolve_parallel`'s.
* `compile_decision` is called as it is with `ask_triton=True` (train time, on the GPU). Its last check,
  `torch.utils._triton.has_triton()`, imports torch (4 s on a 2-core machine, where the estimate otherwise answers
  in 0.3 s) and answers for the machine it runs on: False on any machine without a CUDA GPU, where the CLI is often
  run to plan for one. So planning calls its other checks, `compile_config_decision` (environment, Liger forced,
  parallel, checkpointing), and assumes Triton on the training GPU (torch's CUDA wheels ship it);
  tests/test_estimate.py compares the plan with the real function over every combination.
* `host_embedding_decision` inspects the loaded model's embedding tensor (its class, requires_grad, and that it is
  on a CUDA device), so it cannot run before loading; its config checks (environment, the offload, 4-bit, one
  process) are `embed.host_embedding_config_decision`, called as it is; the model checks (untied head, a frozen
  plain embedding) are read from the shape and the config, pinned by a test to the real function on a CPU model.
* Liger (`kernels.apply_kernels`): left out where the layers are compiled and enable_liger_kernel is null; else
  on when enable_liger_kernel is true, or null with liger-kernel installed (where the estimate runs).
"""
from __future__ import annotations

import importlib.util
import os
import types
from dataclasses import dataclass

from tunelab.estimate.archs import ModelShape

TRITON_ASSUMED = "Triton assumed on the training GPU: torch's CUDA wheels ship it"


@dataclass(frozen=True)
class FastPathPlan:
    fused: bool
    fused_reason: str
    compiled: bool
    compiled_reason: str
    offload: bool
    offload_reason: str
    host_embedding: bool
    host_embedding_reason: str
    liger: bool
    liger_reason: str

    def lines(self) -> list[tuple[str, bool, str]]:
        """(what, on, why) for the report, in the order of the trainer's log."""
        return [("fused LoRA projections", self.fused, self.fused_reason),
                ("compiled decoder layers", self.compiled, self.compiled_reason),
                ("checkpoint offload to host memory", self.offload, self.offload_reason),
                ("input embedding in host memory", self.host_embedding, self.host_embedding_reason),
                ("Liger RMSNorm / RoPE / SwiGLU", self.liger, self.liger_reason)]

    def to_json(self) -> dict:
        keys = ("fused", "compiled", "offload", "host_embedding", "liger")
        return {k: {"on": getattr(self, k), "reason": getattr(self, k + "_reason")} for k in keys}


def stand_in_model(shape: ModelShape):
    """What the decisions read of a model before it is loaded: its config's model_type."""
    return types.SimpleNamespace(config=types.SimpleNamespace(model_type=shape.family))


def stand_in_resolved(cfg, device: str = "cuda", parallel: str | None = None, grad_ckpt: bool = True):
    """The resolved settings the decisions read: the device kind, a name for the log, the parallel mode, whether
    gradient checkpointing is on (compile_decision keeps the layers eager without it)."""
    if parallel is None:
        from tunelab.config.resolve import resolve_parallel

        parallel = resolve_parallel(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    return types.SimpleNamespace(device=device, device_name="the training GPU", parallel=parallel,
                                 gradient_checkpointing=grad_ckpt)


def cli_config(method: str, bits: int | None, dropout: float, liger: bool | None, use_fast_kernels: bool | None = None):
    """The config keys the decisions read, for the CLI's model form (no training config given)."""
    return types.SimpleNamespace(
        use_fast_kernels=use_fast_kernels, finetuning_type="lora" if method in ("lora", "qlora") else method,
        use_dora=False, lora_dropout=dropout, quantization_bit=bits if method == "qlora" else None,
        enable_liger_kernel=liger, deepspeed=None, fsdp=None, additional_target=None)


def compile_checks_without_triton(cfg, resolved) -> tuple[bool, str]:
    """compile_decision's checks after the fast path's own, less the Triton one (see the module docstring)."""
    from tunelab.model.fast import compile_config_decision

    on, reason = compile_config_decision(cfg, resolved)
    return (True, f"{reason}; {TRITON_ASSUMED}") if on else (False, reason)


def host_embedding_checks(shape: ModelShape, cfg, resolved, offload: bool) -> tuple[bool, str]:
    """host_embedding_decision's config checks (it also needs the loaded embedding on a CUDA device); offload: the
    checkpoint offload installed (apply_fast_path passes whether it offloaded any layer)."""
    from tunelab.model.fast.embed import host_embedding_config_decision

    on, reason = host_embedding_config_decision(cfg, resolved, offload)
    if not on:
        return False, reason
    extra = [t.strip() for t in (getattr(cfg, "additional_target", None) or "").split(",")]
    if "embed_tokens" in extra:  # PEFT trains (and wraps) it: no longer a frozen plain nn.Embedding
        return False, "the input embedding is not a frozen plain nn.Embedding"
    if shape.tied:
        return False, "the embedding is tied to the output head"
    return True, "input embedding in pinned host memory"


def liger_choice(cfg, compiled: bool) -> tuple[bool, str]:
    """kernels.apply_kernels' choice for training on a CUDA GPU."""
    wanted = getattr(cfg, "enable_liger_kernel", None)
    if wanted is False:
        return False, "enable_liger_kernel: false"
    if wanted is None and compiled:
        return False, "left out: the compiled decoder layers fuse RMSNorm, RoPE and SwiGLU (inductor)"
    if wanted:
        return True, "enable_liger_kernel: true"
    if importlib.util.find_spec("liger_kernel") is None:
        return False, "liger-kernel is not installed (where the estimate runs)"
    return True, "liger-kernel installed, enable_liger_kernel: null"


def fast_path_plan(shape: ModelShape, cfg, *, grad_ckpt: bool = True, ask_triton: bool = False, device: str = "cuda",
                   parallel: str | None = None) -> FastPathPlan:
    """The fast path's decisions for this model and config on one CUDA GPU (see the module docstring).
    grad_ckpt: gradient checkpointing on (the offload moves checkpoints: without them it installs nothing)."""
    from tunelab.model.fast import compile_decision, fast_path_decision, offload_decision

    model, resolved = stand_in_model(shape), stand_in_resolved(cfg, device, parallel, grad_ckpt)
    fused, fused_reason = fast_path_decision(model, cfg, resolved)
    if fused:
        if ask_triton:
            compiled, compiled_reason = compile_decision(model, cfg, resolved)
        else:
            compiled, compiled_reason = compile_checks_without_triton(cfg, resolved)
        offload, offload_reason = offload_decision(cfg, resolved)
        if offload and not grad_ckpt:  # offload_checkpoints() finds no checkpointed layer: nothing installed
            offload, offload_reason = False, "gradient checkpointing is off: no checkpoints to offload"
        host, host_reason = host_embedding_checks(shape, cfg, resolved, offload)
    else:
        off = f"the fast path is off ({fused_reason})"
        compiled = offload = host = False
        compiled_reason = offload_reason = host_reason = off
    liger, liger_reason = liger_choice(cfg, compiled)
    if device != "cuda":
        liger, liger_reason = False, f"the device is {device}: Liger needs a CUDA GPU"
    return FastPathPlan(fused, fused_reason, compiled, compiled_reason, offload, offload_reason, host, host_reason,
                        liger, liger_reason)
