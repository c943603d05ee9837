"""The estimate as a human-readable table, or as JSON (peak_allocated_gib and nvidia_smi_gib at the top level)."""
from __future__ import annotations

from typing import Any

from tunelab.estimate.memory import CUDA_CONTEXT, Estimate
from tunelab.estimate.terms import GiB


PHASES = {"loss": "loss", "backward": "backward", "backward_end": "backward end", "step": "optim step"}


def _gib(n: float) -> str:
    return f"{n / GiB:7.2f}"


def describe(est: Estimate) -> str:
    u = est.setup
    what = {"qlora": f"QLoRA ({u.bits}-bit base)", "lora": "LoRA (16-bit base)", "freeze": f"freeze (last {u.freeze_layers} layers)", "full": "full fine-tuning"}[u.method]
    if u.plain:
        stack = "plain transformers + PEFT + bitsandbytes"
    else:
        parts = ["fused loss", "compiled decoder layers" if u.compiled else ("eager layers, Liger kernels" if u.liger else "eager layers")]
        parts += ["checkpoints offloaded"] if u.offload and u.grad_ckpt else []
        parts += ["host embedding"] if u.host_embedding_on() else []
        stack = f"tunelab ({', '.join(parts)})"
    return (f"{est.shape.name}: {what}, r={u.rank}, batch {u.batch} x {u.seq} tokens, "
            f"checkpointing {'on' if u.grad_ckpt else 'off'}, {u.optim}, {u.attn} attention; stack: {stack}")


def table(est: Estimate) -> str:
    lines = [describe(est), f"config: {est.shape.source}"]
    if est.plan is not None:
        lines.append("fast path, as `tunelab train` decides it on one CUDA GPU:")
        lines += [f"  {what}: {'on' if on else 'off'} - {why}" for what, on, why in est.plan.lines()]
    lines += ["", f"{'what':<58}{'GiB':>8}  note"]
    for r in est.rows:
        if r.bytes == 0 and r.key not in ("optimizer", "host_embedding"):
            continue
        lines.append(f"{r.label[:57]:<58}{_gib(r.bytes)}  {r.note}")
    alloc_gap = est.peak_reserved - est.peak_allocated
    lines += [
        "-" * 78,
        f"{'peak allocated (max_memory_allocated) at ' + PHASES.get(est.phase, est.phase):<58}{_gib(est.peak_allocated)}",
        f"{'allocator reserve (cached, not handed out)':<58}{_gib(alloc_gap)}",
        f"{'CUDA context, cuBLAS and kernels':<58}{_gib(CUDA_CONTEXT)}",
    ]
    if est.nvidia_smi - est.peak_reserved - CUDA_CONTEXT > 0:
        lines.append(f"{'paged optimizer states (managed memory)':<58}{_gib(est.nvidia_smi - est.peak_reserved - CUDA_CONTEXT)}")
    lines.append(f"{'nvidia-smi will show about':<58}{_gib(est.nvidia_smi)}")
    if est.host_pinned:
        lines.append(f"{'pinned host memory (offloaded checkpoints, embedding)':<58}{_gib(est.host_pinned)}  CPU RAM, not GPU")
    for w in est.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def fit_table(plan: dict[str, Any]) -> str:
    lines = ["", f"on {plan['gpu']} ({plan['gpu_gib']:.1f} GiB, {plan['margin_gib']:.1f} GiB kept free):",
             f"  largest batch at cutoff_len {plan['at_cutoff_len']}: {plan['largest_batch']}",
             f"  largest cutoff_len at batch {plan['at_batch']}: {plan['largest_cutoff_len']}",
             "  recommended:"]
    for a in plan["advice"]:
        lines.append(f"    {a['setting']}: {a['value']}  - {a['reason']}")
    return "\n".join(lines)


def fit_json(plan: dict[str, Any]) -> dict[str, Any]:
    keys = ("gpu", "gpu_gib", "margin_gib", "largest_batch", "at_cutoff_len", "largest_cutoff_len", "at_batch", "advice")
    out = {k: plan[k] for k in keys}
    out["recommended_peak_allocated_gib"] = round(plan["estimate"].peak_allocated / GiB, 3)
    out["recommended_nvidia_smi_gib"] = round(plan["estimate"].nvidia_smi / GiB, 3)
    return out
