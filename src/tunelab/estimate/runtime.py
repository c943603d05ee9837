"""The estimate at train time: `per_device_train_batch_size: auto`, and the warning before a run that will not fit.

    batch, reason = auto_batch(cfg, device)        # the largest batch that fits this GPU's free memory
    text = fit_warning(cfg, device)                # None, or a sentence naming the setting to change

Both read the free memory of the current GPU (torch.cuda.mem_get_info) unless given `free_bytes`, and take the fast
path's decisions as the trainer will make them on this GPU (fastpath.py with ask_triton: the trainer's own
compile_decision, Triton check included). On a CPU (or any
device without a memory model) auto means batch 1: tunelab's CPU runs are small models and tests, where host
memory, not the estimate, is the limit.
"""
from __future__ import annotations

import logging
from dataclasses import replace

from tunelab.errors import TunelabError
from tunelab.estimate.fit import MARGIN, choose_batch, largest_batch, largest_cutoff
from tunelab.estimate.from_config import setup_from_config
from tunelab.estimate.memory import CUDA_CONTEXT, estimate
from tunelab.estimate.terms import GiB

logger = logging.getLogger(__name__)
AUTO_LIMIT = 64
CPU_AUTO_BATCH = 1


def free_gpu_bytes() -> int:
    import torch

    free, _ = torch.cuda.mem_get_info()  # the current device: each rank's own GPU under torchrun
    return int(free)


def auto_batch(cfg, device: str, free_bytes: int | None = None) -> tuple[int, str]:
    """(batch, reason) for per_device_train_batch_size: auto."""
    if device != "cuda":
        return CPU_AUTO_BATCH, f"on {device} there is no GPU memory to fit: batch {CPU_AUTO_BATCH}"
    try:
        shape, setup, _ = setup_from_config(cfg, batch=1, ask_triton=True)  # on this GPU: the trainer's compile decision
    except TunelabError as exc:
        return CPU_AUTO_BATCH, f"the memory estimate is unavailable ({exc}): batch {CPU_AUTO_BATCH}"
    setup = replace(setup, mask=True)  # real batches are padded (or packed): an explicit mask, k/v repeated by SDPA
    free = free_gpu_bytes() if free_bytes is None else free_bytes
    batch = choose_batch(shape, setup, free, limit=AUTO_LIMIT)
    est = estimate(shape, replace(setup, batch=batch))
    return batch, (f"the largest power of two up to {AUTO_LIMIT} whose estimate ({est.nvidia_smi / GiB:.1f} GiB at "
                   f"{batch} x {setup.seq} tokens) fits the {free / GiB:.1f} GiB free on the GPU")


def fit_warning(cfg, device: str, free_bytes: int | None = None) -> str | None:
    """A sentence when the estimate exceeds the GPU's free memory, naming the setting to change; else None."""
    if device != "cuda":
        return None
    try:
        shape, setup, _ = setup_from_config(cfg, ask_triton=True)  # on this GPU: the trainer's compile decision
        est = estimate(shape, setup)
    except TunelabError:
        return None  # an architecture the estimate cannot read: nothing to warn about
    free = free_gpu_bytes() if free_bytes is None else free_bytes
    need = est.nvidia_smi - int(CUDA_CONTEXT)  # the context exists already: mem_get_info's free excludes it
    if need <= free:
        return None
    budget = free - int(MARGIN) + int(CUDA_CONTEXT)
    head = (f"the memory estimate for this run is {need / GiB:.1f} GiB but the GPU has {free / GiB:.1f} GiB free: "
            "it will likely run out of memory. ")
    batch = largest_batch(shape, setup, budget, limit=max(setup.batch - 1, 1)) if setup.batch > 1 else 0
    if batch:
        accum = cfg.gradient_accumulation_steps * setup.batch // batch
        return head + (f"Set per_device_train_batch_size: {batch} (and gradient_accumulation_steps: {accum} to keep the "
                       "effective batch), or per_device_train_batch_size: auto.")
    if not setup.grad_ckpt and estimate(shape, replace(setup, grad_ckpt=True)).nvidia_smi - int(CUDA_CONTEXT) <= free:
        return head + "Turn gradient checkpointing on (remove disable_gradient_checkpointing)."
    if setup.method == "lora" and estimate(shape, replace(setup, method="qlora", bits=4)).nvidia_smi - int(CUDA_CONTEXT) <= free:
        return head + "Set quantization_bit: 4 (QLoRA)."
    cutoff = largest_cutoff(shape, setup, budget)
    if cutoff >= 256:
        return head + f"Lower cutoff_len to {cutoff}."
    return head + "Use a smaller model, quantization_bit: 4, or a GPU with more memory."
