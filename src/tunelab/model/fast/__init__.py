"""The fast training path: which models it covers, and installing it on a PEFT LoRA model.

    on, reason = fast_path_decision(model, cfg, resolved)   # e.g. (False, "the device is cpu: it needs a CUDA GPU")
    applied = apply_fast_path(model, cfg, resolved)         # ["fast-lora(196 projections)"] or []

The decision is made once, after the adapters are attached, and logged; `use_fast_kernels` in the config
forces it (false: always the plain path; true: an error naming the reason when it cannot apply; null, the
default: on where it applies). What it installs (one file per fused op, each beside its torch reference):

* lora.py: each LoRA projection (q, k, v, o, gate, up, down) as one autograd function over the frozen NF4 or
  16-bit base weight: dequantize once per use, LoRA product added in the same GEMM, hand-written backward.
* compile.py: torch.compile of each decoder layer, its checkpoint included (`compile_decision`: one GPU, Triton
  present, Liger not forced on; TUNELAB_FAST_COMPILE=0 turns it off). Inductor then fuses the norms, RoPE and
  SwiGLU itself, so Liger's module kernels are left out where it applies (kernels.apply_kernels asks first).
* offload.py: checkpointed layer inputs in pinned host memory (on by default on one process;
  TUNELAB_OFFLOAD_CHECKPOINTS=0 turns it off); each layer's forward is then compiled under the eager offloading
  checkpoint instead of the whole checkpointed call. Its no-grad first pass goes through the fused projections
  instead of PEFT's (TUNELAB_FUSED_FIRST_PASS=0: PEFT's; run 14 measured the fused one faster).
* group.py: gate and up as one function (lora.LoraGroup), on by default (TUNELAB_GROUP_GATE_UP=0 turns it off);
  q, k and v likewise when TUNELAB_GROUP_QKV=1 (off by default: no measured gain, run 17).
* split.py: under the offload, the backward recomputes a covered decoder layer without its o and down products
  (their outputs feed only the residuals; h2, the residual after attention, is kept on the host beside the input),
  for batches of at least 2,048 tokens (TUNELAB_SPLIT_MIN_TOKENS; TUNELAB_SPLIT_RECOMPUTE=0 turns it off).
* attention.py: which SDPA backend is tried first (TUNELAB_SDPA_FIRST; default: torch's order).
* varlen.py: packed rows' attention through FlashAttention's varlen kernel, each sample within itself (on by
  default with `packing: true` on Ampere or newer; TUNELAB_VARLEN=0 keeps the masked SDPA path; the collator then
  gives packed batches their sample boundaries).
* embed.py: the frozen input embedding in pinned host memory (on by default with the offload: 4-bit base, one
  process, untied head; TUNELAB_HOST_EMBEDDING=0/1 forces it).

Coverage: CUDA, unsharded weights (one GPU, DDP, ZeRO-1/2; not FSDP or ZeRO-3); LoRA (not DoRA), lora_dropout 0, one adapter,
base layers bitsandbytes 4-bit or plain 16-bit linear layers; decoder families Qwen2 / Qwen2.5 / Qwen3 (dense)
and Llama. Anything else keeps PEFT's layers.
A patched layer falls back to PEFT's own forward whenever a call is outside that (adapters disabled or merged,
several active adapters, no gradient: evaluation and generation keep bitsandbytes' fast inference kernels).
"""
from __future__ import annotations

import logging
import types

logger = logging.getLogger(__name__)

ARCHITECTURES = ("qwen2", "qwen3", "llama")


def fast_path_decision(model, cfg, resolved) -> tuple[bool, str]:
    """(on, reason): whether the fast path applies to this model, config and device, and why (for the log)."""
    wanted = getattr(cfg, "use_fast_kernels", None)
    if wanted is False:
        return False, "use_fast_kernels: false"
    if resolved.device != "cuda":
        return False, f"the device is {resolved.device}: the fast path needs a CUDA GPU"
    parallel = getattr(resolved, "parallel", "single")
    if parallel in ("fsdp", "deepspeed-zero3"):  # sharded weights are no longer bitsandbytes layers with a quant state
        return False, f"parallel {parallel} shards the weights: the fast path covers unsharded ones (one GPU, DDP, ZeRO-1/2)"
    if cfg.finetuning_type != "lora":
        return False, f"finetuning_type {cfg.finetuning_type}: the fast path covers LoRA"
    if cfg.use_dora:
        return False, "use_dora: DoRA is not fused"
    if cfg.lora_dropout:
        return False, f"lora_dropout {cfg.lora_dropout}: only dropout 0 is fused"
    if cfg.quantization_bit == 8:
        return False, "quantization_bit 8: the fast path covers 4-bit and 16-bit base weights"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(base.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        return False, f"architecture {model_type} is not covered yet (covered: {', '.join(ARCHITECTURES)})"
    return True, f"{model_type} LoRA on {resolved.device_name}"


# Without gradient checkpointing a compiled layer's forward saves all 7 dequantized weights of every layer for the
# backward (inductor's partitioner on the CPU graphs, docs/estimate.md: ~12 GiB more at 7B than eager); not measured
# on a GPU, so that case keeps the eager fast path.
NO_CHECKPOINT_REASON = ("gradient checkpointing is off: a compiled layer would keep its dequantized weights for "
                        "the backward (~12 GiB more at 7B), so the layers run eager")


def compile_config_decision(cfg, resolved) -> tuple[bool, str]:
    """compile_decision's checks of the config, the parallel mode and the environment (no torch, no model; the fast
    path itself is checked by the caller): the memory planner calls it where Triton cannot be asked."""
    import os

    if os.environ.get("TUNELAB_FAST_COMPILE", "1") == "0":
        return False, "TUNELAB_FAST_COMPILE=0"
    if getattr(cfg, "enable_liger_kernel", None) is True:
        return False, "enable_liger_kernel: true (Liger's kernels are not compiled with the layers)"
    parallel = getattr(resolved, "parallel", "single")
    if parallel != "single":
        return False, f"parallel {parallel}: compiled layers are measured on one GPU only"
    if getattr(resolved, "gradient_checkpointing", True) is False:
        return False, NO_CHECKPOINT_REASON
    return True, "decoder layers compiled"


def compile_decision(model, cfg, resolved) -> tuple[bool, str]:
    """(on, reason): whether the fast path compiles the decoder layers (it must be on itself first)."""
    on, reason = fast_path_decision(model, cfg, resolved)
    if not on:
        return False, f"the fast path is off ({reason})"
    on, reason = compile_config_decision(cfg, resolved)
    if not on:
        return False, reason
    from torch.utils._triton import has_triton

    if not has_triton():
        return False, "Triton is not available for torch.compile"
    return True, "decoder layers compiled"


def offload_decision(cfg, resolved) -> tuple[bool, str]:
    """(on, reason) for the checkpoint offload (offload.py): on by default on one process (TUNELAB_OFFLOAD_CHECKPOINTS=0
    turns it off). Measured on the H200 (run 8, docs/fastpath.md): with the compiled layers at 7B QLoRA 4 x 1024
    11,103 tok/s at 6.84 GiB against 10,113 at 7.42 without it, in one lease. The end-to-end GPU test of
    `tunelab train` with it on (tests/test_gpu.py::test_qlora_train_on_gpu) stalled once in run 9 and passed alone
    in 66 s in a later lease (docs/fastpath.md); TUNELAB_OFFLOAD_CHECKPOINTS=0 restores the previous default."""
    import os

    if os.environ.get("TUNELAB_OFFLOAD_CHECKPOINTS", "1") == "0":
        return False, "TUNELAB_OFFLOAD_CHECKPOINTS=0"
    parallel = getattr(resolved, "parallel", "single")
    if parallel != "single":
        return False, f"parallel {parallel}: its reentrant-style backward bypasses DDP/FSDP hooks"
    return True, "checkpointed layer inputs in pinned host memory"


class Passes:
    """Switches the checkpoint offload (offload.py, split.py) sets around its own calls; read by _fast_forward, so
    a compiled caller is guarded on them (each of those functions always sees the same values).
    first_pass: the offload's no-grad first pass takes the fused function too (as plain arithmetic, no autograd
    state), not PEFT's inference path (bitsandbytes' three-launch dequantize and a separate LoRA pass); other
    no-grad calls (evaluation, generation) keep PEFT's.
    recompute: inside the offload's recompute of a layer (its full recompute, or split.py's halves), right before
    that layer's backward: the fused functions keep the dense base weights they made for it (lora.keep_dense)."""
    first_pass = False
    recompute = False

    @staticmethod
    def fused_now() -> bool:
        """Whether a call now may take a fused function: under gradient, or in the offload's fused first pass."""
        import torch

        return torch.is_grad_enabled() or Passes.first_pass


def fused_args(module):
    """(weight, quant_state, bias, lora_a, lora_b, scale, dtype) when a call of this patched layer is the fused
    case (one active adapter, not disabled or merged, its packed weight still quantized), else None; dtype: the
    compute dtype (autocast's on CUDA, else the base layer's)."""
    import torch

    if module.disable_adapters or module.merged:
        return None
    active = module.active_adapters
    if len(active) != 1 or active[0] != module._tunelab_adapter:
        return None
    name = module._tunelab_adapter
    weight = module._tunelab_base.weight
    quant_state = getattr(weight, "quant_state", None)
    if module._tunelab_quantized and quant_state is None:  # the packed weight was replaced (a wrapper, sharding)
        return None
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else module._tunelab_dtype
    return (weight, quant_state, module._tunelab_base.bias, module.lora_A[name].weight, module.lora_B[name].weight,
            module.scaling[name], dtype)


def _fast_forward(self, x, *args, **kwargs):
    """Replaces a PEFT LoRA layer's forward: the fused function when the call is the plain training case."""
    if self._tunelab_skip:  # split.py's recompute: this product's output is not needed, only its input
        return x
    pending = self._tunelab_pending  # group.py: q's call made this projection's output from the same input
    if pending is not None:
        self._tunelab_pending = None
        if pending[0] is x and not (args or kwargs):
            return pending[1]
    if args or kwargs or not Passes.fused_now():
        return self._tunelab_plain_forward(x, *args, **kwargs)
    fused = fused_args(self)
    if fused is None:
        return self._tunelab_plain_forward(x, *args, **kwargs)
    if self._tunelab_group is not None:  # q of a grouped attention: q, k and v as one function (group.py)
        from tunelab.model.fast.group import qkv_forward

        out = qkv_forward(self, x, fused)
        if out is not None:
            return out
    from tunelab.model.fast.lora import lora_linear

    return lora_linear(x, *fused)


def _patchable(module) -> str | None:
    """The adapter name if this PEFT layer fits the fused function, else None."""
    import torch

    base = module.get_base_layer()
    names = list(module.lora_A.keys())
    if len(names) != 1 or getattr(module, "lora_variant", {}).get(names[0]) is not None:
        return None
    name = names[0]
    if not isinstance(module.lora_dropout[name], torch.nn.Identity) or getattr(module, "fan_in_fan_out", False):
        return None
    if module.lora_A[name].bias is not None or module.lora_B[name].bias is not None:
        return None
    if base.bias is not None and base.bias.requires_grad:
        return None
    weight = base.weight
    if getattr(weight, "quant_state", None) is not None:  # bitsandbytes 4-bit
        return name if type(base).__name__ == "Linear4bit" else None
    if type(base) is torch.nn.Linear and not weight.requires_grad and weight.dtype in (torch.bfloat16, torch.float16):
        return name
    return None


def patch_lora_layers(model) -> int:
    """Route every fitting PEFT LoRA linear layer through the fused function; returns how many were patched."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or hasattr(module, "_tunelab_plain_forward"):
            continue
        name = _patchable(module)
        if name is None:
            continue
        weight = module.get_base_layer().weight
        qs = getattr(weight, "quant_state", None)
        module._tunelab_adapter = name
        # a plain attribute: nn.Module's setattr would register the base layer a second time as a submodule
        object.__setattr__(module, "_tunelab_base", module.get_base_layer())
        module._tunelab_dtype = qs.dtype if qs is not None else weight.dtype
        module._tunelab_quantized = qs is not None
        module._tunelab_skip = False  # set by split.py around its recompute only
        module._tunelab_group = None  # q of a grouped attention: (k, v) (group.group_qkv)
        module._tunelab_pending = None  # k or v of one: (input, output) q's call made (group.qkv_forward)
        if qs is not None and weight.is_cuda:  # the dequantize kernel, decided once per layer (nf4_triton.py)
            from tunelab.model.fast import nf4_triton

            qs.tunelab_triton = nf4_triton.enabled_for(weight, qs)
        module._tunelab_plain_forward = module.forward
        module.forward = types.MethodType(_fast_forward, module)
        count += 1
    return count


def unpatch_lora_layers(model) -> None:
    """Give every patched layer its PEFT forward back (and every grouped MLP its own forward)."""
    from tunelab.model.fast.group import ungroup

    ungroup(model)
    for module in model.modules():
        if hasattr(module, "_tunelab_plain_forward"):
            module.forward = module._tunelab_plain_forward
            del module._tunelab_plain_forward, module._tunelab_base, module._tunelab_skip
            del module._tunelab_group, module._tunelab_pending


def apply_fast_path(model, cfg, resolved) -> list[str]:
    """Install the fast path where it applies (logged either way); returns what was applied."""
    from tunelab.errors import ConfigError

    on, reason = fast_path_decision(model, cfg, resolved)
    if not on:
        if getattr(cfg, "use_fast_kernels", None) is True:
            raise ConfigError(f"use_fast_kernels: true, but the fast path cannot apply here: {reason}. "
                              "Set use_fast_kernels: null (auto) or false.")
        return _record(resolved, f"off ({reason})", [])
    count = patch_lora_layers(model)
    if count == 0:
        return _record(resolved, "off (no LoRA layer fits the fused projection)", [])
    applied, what = [f"fast-lora({count} projections)"], [f"{count} LoRA projections fused"]
    from tunelab.model.fast import group

    if group.enabled():  # on by default (TUNELAB_GROUP_GATE_UP=0: off); run 14 measured it faster at every shape
        grouped = group.group_gate_up(model)
        if grouped:
            applied.append(f"group-gate-up({grouped} layers)")
            what.append(f"gate and up as one function in {grouped} layers")
    if group.qkv_enabled():  # opt-in (TUNELAB_GROUP_QKV=1): run 17 measured no gain
        grouped = group.group_qkv(model)
        if grouped:
            applied.append(f"group-qkv({grouped} layers)")
            what.append(f"q, k and v as one function in {grouped} layers")
    from tunelab.model.fast.attention import prefer_sdpa_backend

    first = prefer_sdpa_backend()  # TUNELAB_SDPA_FIRST (attention.py): before any layer compiles
    if first:
        applied.append(f"sdpa-{first}-first")
        what.append(f"SDPA tries {first} attention first")
    from tunelab.model.fast import varlen

    if varlen.enabled() and getattr(cfg, "packing", False) and varlen.install(model):  # runs 21-22: +8% packed
        applied.append(varlen.APPLIED)
        what.append("packed rows' attention per sample (FlashAttention varlen)")
    from tunelab.model.fast.embed import host_embedding_decision, keep_embedding_on_host

    compiled = compile_decision(model, cfg, resolved)[0]
    offload = offload_decision(cfg, resolved)[0]
    offloaded = 0
    if offload:
        from tunelab.model.fast.offload import offload_checkpoints

        offloaded = offload_checkpoints(model, compiled=compiled)  # compiled: each layer's forward under it
    if host_embedding_decision(model, cfg, resolved, offload=offloaded > 0)[0]:
        moved = keep_embedding_on_host(model)
        applied.append("host-embedding")
        what.append(f"input embedding in host memory ({moved / 2**30:.2f} GiB off the GPU)")
    if offloaded:
        from tunelab.model.fast.offload import kept_layers, split_layers

        applied.append(f"offload({offloaded} layers)")
        what.append(f"checkpoints of {offloaded} layers in host memory")
        split = split_layers(model)
        if split:
            applied.append(f"split-recompute({split} layers)")
            what.append(f"{split} layers recomputed without their o and down products")
        if getattr(model, "_tunelab_layer_graphs", None) is not None:  # graphs.py (on by default; TUNELAB_LAYER_GRAPHS=0: off)
            applied.append(f"layer-graphs({offloaded} layers)")
            what.append(f"CUDA graphs over {offloaded} layers' calls that take the full recompute")
        kept = kept_layers(model)
        if kept:
            applied.append(f"keep-gate-up({kept} layers)")
            what.append(f"{kept} layers keep gate/up's output for the backward (TUNELAB_KEEP_GATE_UP)")
    if compiled:
        from tunelab.model.fast.compile import compile_decoder_layers

        layers = offloaded or compile_decoder_layers(model)
        if layers:
            applied.append(f"compile({layers} layers)")
            what.append(f"{layers} decoder layers compiled (the first step compiles)")
    return _record(resolved, f"on ({reason}): " + "; ".join(what), applied)


def _record(resolved, decision: str, applied: list[str]) -> list[str]:
    """Log the decision and keep it in the resolved settings (saved in tunelab_config.yaml beside the outputs)."""
    logger.info("fast path: %s", decision)
    resolved.fast_path = decision
    return applied
