"""Which of PyTorch's fused attention kernels SDPA tries first, for the fast path's training step.

    applied = prefer_sdpa_backend()   # "cudnn" (TUNELAB_SDPA_FIRST, default below) or None when left as it is

transformers' SDPA attention calls torch's scaled_dot_product_attention (causal, no mask for full-length rows,
grouped-query heads through enable_gqa); torch picks the first backend in its priority order that accepts the
inputs: flash (FlashAttention-2's kernels built into torch), memory-efficient, math, then cuDNN. On Hopper the cuDNN
kernels are a newer design than the built-in FlashAttention-2 ones; tools/attn_probe.py times each at the 7B shapes
(docs/fastpath.md). Putting a backend first keeps the others after it: an input it refuses (a mask it does not
take, a head size) goes to the next one, as before. The order is process-wide torch state, set once when the fast
path is installed (before any layer compiles: a compiled graph keeps the kernel chosen while tracing).
"""
from __future__ import annotations

import os

# TUNELAB_SDPA_FIRST when unset: "" leaves torch's order (flash first)
DEFAULT_FIRST = ""
BACKENDS = ("cudnn", "flash", "efficient")


def prefer_sdpa_backend() -> str | None:
    """Put TUNELAB_SDPA_FIRST's backend (cudnn, flash, efficient; "" or "default": leave torch's order) first in
    SDPA's priority order; returns its name, or None when the order was left alone. An unknown name is a
    ConfigError; a torch without the priority call leaves the order (returns None)."""
    name = os.environ.get("TUNELAB_SDPA_FIRST", DEFAULT_FIRST).strip().lower()
    if name in ("", "default"):
        return None
    if name not in BACKENDS:
        from tunelab.errors import ConfigError

        raise ConfigError(f"TUNELAB_SDPA_FIRST={name!r}: expected one of {', '.join(BACKENDS)} or default")
    import torch
    from torch.nn.attention import SDPBackend

    if not hasattr(torch._C, "_set_sdp_priority_order"):
        return None
    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]
    order = [int(first)] + [b for b in torch._C._get_sdp_priority_order() if b != int(first)]
    torch._C._set_sdp_priority_order(order)
    return name
