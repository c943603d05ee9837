"""What fits a GPU: the card table, the largest batch and cutoff_len, recommended settings, and batch `auto`.

    gpu = parse_gpu("3090")            # Gpu("RTX 3090", 24 GiB, bf16=True)
    plan = fit(shape, setup, gpu)      # largest batch / cutoff_len that fit, settings with a reason each

A setting fits when the predicted nvidia-smi figure (peak reserved + CUDA context) stays within the card's
memory less a safety margin (MARGIN: other processes, the display, the allocator's bad days).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from tunelab.errors import ConfigError
from tunelab.estimate.archs import ModelShape
from tunelab.estimate.memory import CUDA_CONTEXT, Setup, estimate
from tunelab.estimate.terms import GiB

MARGIN = 0.5 * GiB
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class Gpu:
    name: str
    memory: int  # bytes, as nvidia-smi's total
    bf16: bool = True


GPUS = {
    "t4": Gpu("Tesla T4 16GB", 15360 * 2**20, bf16=False),
    "v100": Gpu("Tesla V100 16GB", 16384 * 2**20, bf16=False),
    "v100-32g": Gpu("Tesla V100 32GB", 32768 * 2**20, bf16=False),
    "a10g": Gpu("A10G 24GB", 23028 * 2**20),
    "l4": Gpu("L4 24GB", 23034 * 2**20),
    "3090": Gpu("RTX 3090 24GB", 24576 * 2**20),
    "4090": Gpu("RTX 4090 24GB", 24564 * 2**20),
    "a100-40g": Gpu("A100 40GB", 40960 * 2**20),
    "a100-80g": Gpu("A100 80GB", 81920 * 2**20),
    "h100": Gpu("H100 80GB", 81559 * 2**20),
    "h200": Gpu("H200 141GB", 143771 * 2**20),
}
_ALIASES = {"a100": "a100-80g", "rtx3090": "3090", "rtx4090": "4090", "rtx-3090": "3090", "rtx-4090": "4090", "h100-80g": "h100"}


def parse_gpu(text: str) -> Gpu:
    """A card name from GPUS, or a size: 24GiB, 24GB (10^9 bytes), 16g."""
    key = text.strip().lower().replace(" ", "")
    key = _ALIASES.get(key, key)
    if key in GPUS:
        return GPUS[key]
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(gib|gb|g)", key)
    if m:
        value = float(m.group(1))
        size = int(value * (1e9 if m.group(2) == "gb" else GiB))
        if size <= CUDA_CONTEXT:
            raise ConfigError(f"--gpu {text}: too small to hold even the CUDA context.")
        return Gpu(f"a {text.strip()} GPU", size)
    raise ConfigError(f"unknown GPU '{text}': give a memory size (24GiB, 16GB) or one of {', '.join(GPUS)}.")


def fits(shape: ModelShape, u: Setup, budget: int) -> bool:
    return estimate(shape, u).nvidia_smi <= budget


def largest_batch(shape: ModelShape, u: Setup, budget: int, limit: int = 128) -> int:
    """The largest batch (a power of two up to `limit`) whose estimate fits the budget; 0 if batch 1 does not."""
    best = 0
    for b in (x for x in BATCHES if x <= limit):
        if not fits(shape, replace(u, batch=b), budget):
            break
        best = b
    return best


def largest_cutoff(shape: ModelShape, u: Setup, budget: int) -> int:
    """The largest cutoff_len (a multiple of 256, up to the model's context) that fits at the setup's batch."""
    top = shape.max_positions or 131072
    lo, hi = 0, top // 256
    while lo < hi:  # memory grows with cutoff_len, so bisect on multiples of 256
        mid = (lo + hi + 1) // 2
        if fits(shape, replace(u, seq=mid * 256), budget):
            lo = mid
        else:
            hi = mid - 1
    return lo * 256


@dataclass
class Advice:
    setting: str
    value: str
    reason: str


def fit(shape: ModelShape, u: Setup, gpu: Gpu, accumulation: int = 1) -> dict:
    """The largest batch and cutoff_len for this card, and recommended settings (each with its reason)."""
    budget = gpu.memory - int(MARGIN)
    advice: list[Advice] = []
    if not gpu.bf16:
        advice.append(Advice("fp16", "true", f"{gpu.name} has no bfloat16: train in fp16 (same memory as bf16)."))
    u = _choose_bits(shape, u, budget, advice)
    wanted = u.batch * accumulation
    batch = largest_batch(shape, u, budget, limit=max(wanted, 1))
    if batch == 0 and not u.grad_ckpt:
        u = replace(u, grad_ckpt=True)
        batch = largest_batch(shape, u, budget, limit=max(wanted, 1))
        if batch:
            advice.append(Advice("gradient_checkpointing", "true", "without it even batch 1 does not fit."))
    if batch == 0:
        cutoff = largest_cutoff(shape, replace(u, batch=1), budget)
        raise ConfigError(
            f"{shape.name} does not fit {gpu.name} at batch 1 x {u.seq} tokens even with these settings "
            f"(estimate {estimate(shape, replace(u, batch=1)).nvidia_smi / GiB:.1f} GiB of {gpu.memory / GiB:.1f}). "
            + (f"cutoff_len {cutoff} would fit at batch 1." if cutoff else "Use a smaller model or a larger GPU.")
        )
    accum = math.ceil(wanted / batch)
    advice.append(Advice("per_device_train_batch_size", str(batch),
                         f"the largest power of two up to the effective batch {wanted} that fits ({estimate(shape, replace(u, batch=batch)).nvidia_smi / GiB:.1f} GiB)."))
    advice.append(Advice("gradient_accumulation_steps", str(accum),
                         f"keeps the effective batch at {batch * accum}" + (f" (asked: {wanted})" if batch * accum != wanted else "") + "."))
    u = replace(u, batch=batch)
    if u.grad_ckpt and fits(shape, replace(u, grad_ckpt=False), budget):
        advice.append(Advice("gradient_checkpointing", "false (disable_gradient_checkpointing: true)",
                             f"all activations fit ({estimate(shape, replace(u, grad_ckpt=False)).nvidia_smi / GiB:.1f} GiB): "
                             "no recomputation, about a third faster per step."))
    elif u.grad_ckpt:
        advice.append(Advice("gradient_checkpointing", "true", f"without it batch {batch} needs "
                             f"{estimate(shape, replace(u, grad_ckpt=False)).nvidia_smi / GiB:.1f} GiB."))
    _advise_optimizer(shape, u, advice)
    top = largest_cutoff(shape, u, budget)
    est = estimate(shape, u)
    return {"gpu": gpu.name, "gpu_gib": round(gpu.memory / GiB, 2), "margin_gib": round(MARGIN / GiB, 2),
            "largest_batch": largest_batch(shape, replace(u, batch=1), budget), "at_cutoff_len": u.seq,
            "largest_cutoff_len": top, "at_batch": batch, "setup": u, "estimate": est,
            "advice": [a.__dict__ for a in advice]}


def _choose_bits(shape: ModelShape, u: Setup, budget: int, advice: list[Advice]) -> Setup:
    if u.method not in ("lora", "qlora"):
        return u
    one = replace(u, batch=1)
    if not u.bits:
        if fits(shape, one, budget):
            advice.append(Advice("quantization_bit", "none (16-bit LoRA)", "the 16-bit base fits: no quantization error, faster steps."))
            return u
        u = replace(u, method="qlora", bits=4)
        advice.append(Advice("quantization_bit", "4", "the 16-bit base does not fit; NF4 stores a weight in ~0.52 B instead of 2."))
        return u
    if u.bits == 8:
        advice.append(Advice("quantization_bit", "4" if fits(shape, replace(one, bits=4), budget) else "8",
                             "NF4 (4-bit) needs ~0.52 B per weight against LLM.int8's ~1 B, and its matmuls are faster; "
                             "8-bit only if you need its smaller quantization error."))
        return u
    if fits(shape, replace(one, method="lora", bits=None), budget):
        advice.append(Advice("quantization_bit", "none (16-bit LoRA) or 4",
                             "the 16-bit base fits too: 16-bit LoRA avoids the quantization error; 4-bit leaves room for larger batches."))
    else:
        advice.append(Advice("quantization_bit", "4", "the 16-bit base does not fit this card; NF4 + double quantization is the smallest."))
    return u


def _advise_optimizer(shape: ModelShape, u: Setup, advice: list[Advice]) -> None:
    from tunelab.estimate.memory import trainable_params

    n, _ = trainable_params(shape, u)
    saved = 6 * n
    if u.optim in ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit"):
        return
    if saved > 1 * GiB:
        advice.append(Advice("optim", "adamw_8bit (or paged_adamw_8bit)", f"8-bit AdamW states save {saved / GiB:.1f} GiB on {n:,} trainable parameters."))
    else:
        advice.append(Advice("optim", u.optim, f"an 8-bit optimizer would save only {saved / GiB:.2f} GiB on {n:,} trainable (LoRA) parameters."))


def choose_batch(shape: ModelShape, u: Setup, free_bytes: int, limit: int = 64) -> int:
    """per_device_train_batch_size: auto on the GPU at hand: the largest power of two up to `limit` whose estimate,
    less the CUDA context (already counted in `free_bytes` once the context exists), fits the free memory."""
    budget = free_bytes - int(MARGIN) + int(CUDA_CONTEXT)
    return max(1, largest_batch(shape, u, budget, limit=limit))
