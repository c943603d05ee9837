"""Cross-entropy over a chunk of logits in one Triton kernel: each row's loss, and its gradient written in place.

The fused linear cross-entropy (model/kernels.py) computes, per chunk of trained rows, logits = h @ W^T and from
them the loss and d(loss)/d(logits) = softmax - onehot, which the next two GEMMs take to grad h (and grad W). In
torch that is eight passes over the [rows, vocab] block: the fp32 copy of the bf16 logits, logsumexp's two, the
subtraction, exp, the target's -1, the cast back; at Qwen2.5's 152,064-token vocabulary and 4,096 rows a step,
~10 ms of the H200's step (run 14's profile: `aten::logsumexp` 9.4 ms, exp/sub ~6 ms more). Here one program per
row reads the row twice in its own dtype: an online max and sum of exponentials (per lane, reduced at the end),
then exp(x - lse), minus one at the target, stored over the logits in their dtype. The row's loss (lse - x[t]) is
written in fp32. So the chunk needs no fp32 block at all: the caller can take twice the rows per chunk.

Arithmetic: fp32 throughout, as the torch path (which upcasts the logits before logsumexp); the two differ only
in the order of the sum (the tests bound the loss at 1e-6 relative and the gradient at one rounding of its dtype).
Rows are trained rows only (the caller has dropped ignored positions), targets in [0, vocab).

Selection (`enabled_for(logits)`): a CUDA tensor in bf16, fp16 or fp32, Triton importable, TUNELAB_CE_TRITON not
"0" (on by default); the tests run it under Triton's CPU interpreter (TRITON_INTERPRET=1), where it takes CPU
tensors.
"""
from __future__ import annotations

import os
from typing import Any

BLOCK = 4096  # vocabulary entries a program holds per iteration (38 iterations a row at Qwen2.5's 152,064)
NUM_WARPS = 8
_KERNEL: list = []  # the jitted kernel, built on first use (this module imports neither torch nor Triton itself)


def switched_on() -> bool:
    """TUNELAB_CE_TRITON is not "0" (torch-free: the memory planner asks it too)."""
    return os.environ.get("TUNELAB_CE_TRITON") != "0"


def _kernel() -> Any:
    """The jitted kernel, or None without Triton."""
    if not _KERNEL:
        try:
            _KERNEL.append(_build())
        except Exception:  # Triton missing or broken: the torch path stays
            _KERNEL.append(None)
    return _KERNEL[0]


def interpreting() -> bool:
    """Whether the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1 when Triton was imported)."""
    kernel = _kernel()
    if kernel is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def enabled_for(logits) -> bool:
    """True when the fused loss should use this kernel for a chunk of `logits` (or a tensor of their dtype and
    device)."""
    import torch

    if not switched_on() or logits.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    return (logits.is_cuda and _kernel() is not None) or interpreting()


def cross_entropy_rows(logits, targets, write_grad: bool):
    """Each row's cross-entropy (fp32 [rows]) of `logits` [rows, vocab] (contiguous rows) against `targets`;
    with `write_grad`, softmax - onehot overwrites `logits` in its dtype (the gradient of the summed loss)."""
    import torch

    rows, vocab = logits.shape
    assert logits.stride(1) == 1 and targets.shape == (rows,)
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _kernel()[(rows,)](logits, logits.stride(0), targets, loss, vocab, BLOCK=BLOCK, WRITE_GRAD=write_grad,
                           num_warps=NUM_WARPS)
    return loss


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def ce_rows_kernel(logits_ptr, row_stride, targets_ptr, loss_ptr, vocab, BLOCK: tl.constexpr,
                       WRITE_GRAD: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * row_stride
        lanes = tl.arange(0, BLOCK)
        # per-lane running max and sum of exp(x - max): one reduction at the end instead of one per block. The
        # max starts finite so a lane that only ever sees the masked tail (-inf) keeps exp(-inf - m) = 0.
        m = tl.full([BLOCK], -1.0e30, tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        for start in range(0, vocab, BLOCK):
            cols = start + lanes
            x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
            m = m_new
        row_max = tl.max(m, axis=0)
        lse = row_max + tl.log(tl.sum(s * tl.exp(m - row_max), axis=0))
        target = tl.load(targets_ptr + row)
        x_t = tl.load(base + target).to(tl.float32)
        tl.store(loss_ptr + row, lse - x_t)
        if WRITE_GRAD:
            for start in range(0, vocab, BLOCK):
                cols = start + lanes
                inside = cols < vocab
                x = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32)
                p = tl.exp(x - lse)
                p = tl.where(cols == target, p - 1.0, p)
                tl.store(base + cols, p.to(logits_ptr.dtype.element_ty), mask=inside)

    return ce_rows_kernel
