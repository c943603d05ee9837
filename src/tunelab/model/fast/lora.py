"""One autograd function per LoRA projection: frozen base weight (NF4 4-bit or 16-bit) plus the LoRA update.

    y = x @ W.T (+ bias) + scale * (x @ A.T) @ B.T

`lora_linear` computes this as one function with its own backward, beside `lora_linear_reference`, the plain
torch composition it must equal (tests/test_fast_lora.py checks forward and backward against it).

Why it is faster than PEFT's LoRA over bitsandbytes' Linear4bit, per projection and pass:
* the 4-bit weight is dequantized once per use with bitsandbytes' own kernel, and the dense weight is never
  stored: it is recomputed in backward (as bitsandbytes does), so memory is what the plain path holds;
* the LoRA product is added into the base product by the same GEMM (addmm_ with beta=1, fp32 accumulation),
  where PEFT clones the output, casts A and B, and runs a separate multiply and add;
* backward runs the four small LoRA GEMMs and one big one (grad x = grad y @ W, plus the rank-r term added in
  place) instead of autograd's chain of casts, clones and adds;
* the Python per call is a few lines instead of PEFT's and bitsandbytes' dispatch.

Saved for backward: x and x @ A.T ([tokens, r]); under gradient checkpointing neither is kept (recomputed).
"""
from __future__ import annotations

import torch  # this module is imported only when the fast path is installed

from tunelab.model.fast import ops


def dense_weight(weight, quant_state, dtype):
    """The frozen base weight as a dense [out, in] tensor of `dtype`: bitsandbytes' dequantize kernels for 4-bit.

    Calls bitsandbytes' registered ops directly (the nested absmax first, then the 4-bit weight), which is what
    bitsandbytes.functional.dequantize_4bit does after its argument checks; the checks cost more CPU time than
    the kernels at these sizes and the quant state was checked when the layer was patched. The reference below
    goes through bitsandbytes.functional, so the tests compare the two."""
    if quant_state is None:
        return weight if weight.dtype == dtype else weight.to(dtype)
    if weight.is_cuda:
        from . import nf4_triton  # one Triton launch for the three below, bit-identical (docs/fastpath.md)

        # decided once per layer when the fast path patched it (patch_lora_layers), else here
        use = getattr(quant_state, "tunelab_triton", None)
        if use is None:
            use = nf4_triton.enabled_for(weight, quant_state)
        if use:  # compiled: one opaque op, as bitsandbytes' are
            w = nf4_triton.dense(weight, quant_state)
            return w if w.dtype == dtype else w.to(dtype)
    ops = torch.ops.bitsandbytes
    qs = quant_state
    absmax = qs.absmax
    if qs.nested:
        s2 = qs.state2
        absmax = ops.dequantize_blockwise.default(qs.absmax, s2.absmax, s2.code, s2.blocksize, torch.float32)
        absmax += qs.offset
    w = ops.dequantize_4bit.default(weight.view(-1, 1), absmax, qs.blocksize, qs.quant_type, qs.shape, qs.dtype)
    return w if w.dtype == dtype else w.to(dtype)


def reference_dense_weight(weight, quant_state, dtype):
    """The same through bitsandbytes' public dequantize_4bit (with its checks)."""
    if quant_state is None:
        return weight if weight.dtype == dtype else weight.to(dtype)
    import bitsandbytes.functional as bnbf

    w = bnbf.dequantize_4bit(weight.view(-1, 1), quant_state)
    return w if w.dtype == dtype else w.to(dtype)


def lora_linear_reference(x, weight, quant_state, bias, lora_a, lora_b, scale: float, dtype):
    """The same function in plain torch ops (autograd does the backward): the reference the tests compare with."""
    w = reference_dense_weight(weight, quant_state, dtype)
    xd = x.to(dtype)
    y = torch.nn.functional.linear(xd, w, None if bias is None else bias.to(dtype))
    return y + (xd @ lora_a.to(dtype).t()) @ lora_b.to(dtype).t() * scale


# The order of the two GEMMs (TUNELAB_LORA_FIRST=1: opt-in, its speed not measured yet: docs/fastpath.md). Default: the
# big product first, then the rank-r product added by its GEMM epilogue (beta 1): that second GEMM reads and
# writes the whole [tokens, out] output, memory-bound (gate/up at 7B 4 x 1024: 125 us each, 25 ms of the
# compiled step, run 8's profile). LoRA first: the rank-r product only writes the output, and the big GEMM adds
# it in its epilogue (beta = alpha), where the extra read overlaps a compute-bound GEMM. Rounding differs: the
# big product is no longer rounded to bf16 before the add (one rounding instead of two), the rank-r product is
# (as PEFT's is).
LORA_FIRST = __import__("os").environ.get("TUNELAB_LORA_FIRST", "0") == "1"


def _two_products_eager(a1, b1, bias, a2, b2, alpha: float):
    if LORA_FIRST and bias is None:  # (a bias, as Qwen2's q_proj has, keeps the default order)
        return torch.mm(a2, b2).addmm_(a1, b1, beta=alpha)  # alpha * (a2 @ b2) + a1 @ b1, one epilogue
    y = torch.mm(a1, b1) if bias is None else torch.addmm(bias, a1, b1)
    return y.addmm_(a2, b2, alpha=alpha)  # the second product added by the GEMM epilogue (beta 1), in place


def _two_products_fake(a1, b1, bias, a2, b2, alpha):
    return a1.new_empty((a1.shape[0], b1.shape[1]))


_two_products_op = ops.define(
    "two_products", "(Tensor a1, Tensor b1, Tensor? bias, Tensor a2, Tensor b2, float alpha) -> Tensor",
    _two_products_eager, _two_products_fake)


def two_products(a1, b1, bias, a2, b2, alpha: float):
    """a1 @ b1 (+ bias) + alpha * a2 @ b2, the second product added in place by the GEMM epilogue.

    Compiled, it is one opaque op: functionalization would turn the in-place addmm_ into an out-of-place addmm,
    which copies its [tokens, out] input first (ATen's addmm_out with beta 1): one device copy per projection
    and pass, 599 copies and 15 ms of the compiled 7B step on the H200 (run 5's profile). Eager, it is inline
    (a custom op's dispatch costs CPU time that the eager step, bound by the CPU, cannot spare)."""
    if torch.compiler.is_compiling():
        return _two_products_op(a1, b1, bias, a2, b2, alpha)
    return _two_products_eager(a1, b1, bias, a2, b2, alpha)


class LoraLinear(torch.autograd.Function):
    """The fused projection (module level, so torch.compile can trace it without a graph break)."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, weight, quant_state, bias, scale, dtype):
        in_dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        if x2.dtype != dtype:
            x2 = x2.to(dtype)
        a = lora_a.to(dtype)
        b = lora_b.to(dtype)
        w = dense_weight(weight, quant_state, dtype)
        xa = torch.mm(x2, a.t())  # [tokens, r]
        y = two_products(x2, w.t(), None if bias is None else bias.to(dtype), xa, b.t(), scale)
        # the compute-dtype copies of A and B are saved (r x in and out x r: small), not cast again in backward
        ctx.save_for_backward(x2, xa, a, b)
        ctx.weight, ctx.quant_state = weight, quant_state
        ctx.scale, ctx.dtype, ctx.in_dtype, ctx.x_shape = scale, dtype, in_dtype, x.shape
        ctx.a_dtype, ctx.b_dtype = lora_a.dtype, lora_b.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x2, xa, a, b = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_x, grad_a, grad_b = lora_backward(
            grad_y, x2, xa, a, b, lambda: dense_weight(ctx.weight, ctx.quant_state, ctx.dtype), ctx.scale, ctx.dtype,
            need[0], need[1], need[2])
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
            if grad_x.dtype != ctx.in_dtype:
                grad_x = grad_x.to(ctx.in_dtype)
        if grad_a is not None:
            grad_a = grad_a.to(ctx.a_dtype)
        if grad_b is not None:
            grad_b = grad_b.to(ctx.b_dtype)
        return grad_x, grad_a, grad_b, None, None, None, None, None


def lora_backward(grad_y, x2, xa, a, b, dense, scale: float, dtype, need_x=True, need_a=True, need_b=True):
    """The projection's backward from its input rows x2 [tokens, in] and xa = x2 @ a.T [tokens, r] (a, b: the
    compute-dtype copies of A and B; dense(): the base weight, dense [out, in] in `dtype`, made only for grad x):
    (grad x [tokens, in], grad A, grad B), each None where not needed; the LoRA gradients in `dtype` before the
    caller's cast. Also called without the forward having run (split.py: the recompute skips the o and down
    products, whose outputs no gradient needs) and for two projections at once (LoraPair: A stacked, B a block
    diagonal)."""
    g = grad_y.reshape(-1, grad_y.shape[-1])
    if g.dtype != dtype:
        g = g.to(dtype)
    gb_r = torch.mm(g, b)  # [tokens, r] = grad of (x @ A.T), before the scale
    grad_x = grad_a = grad_b = None
    if need_x:
        w = dense()
        grad_x = two_products(g, w, None, gb_r, a, scale)
        del w
    if need_a:
        grad_a = torch.mm(gb_r.t(), x2).mul_(scale)
    if need_b:
        grad_b = torch.mm(g.t(), xa).mul_(scale)
    return grad_x, grad_a, grad_b


def lora_linear(x, weight, quant_state, bias, lora_a, lora_b, scale: float, dtype):
    """x [..., in] -> [..., out]; weight packed 4-bit (with its quant_state) or dense [out, in] (quant_state None);
    lora_a [r, in], lora_b [out, r] (trainable, any float dtype); computed in `dtype`."""
    return LoraLinear.apply(x, lora_a, lora_b, weight, quant_state, bias, float(scale), dtype)


def dense_pair(w1, qs1, w2, qs2, dtype, tail=None):
    """Two frozen base weights stacked, [out1 + out2, in] of `dtype` (gate over up): each 4-bit weight dequantized
    straight into its rows where the NF4 Triton kernel applies (no copy), else the two dense weights concatenated.
    tail [out1 + out2, t]: columns to their right, a [out1 + out2, in + t] result (LoraPair's augmented weight)."""
    if (qs1 is not None and qs2 is not None and w1.is_cuda and getattr(qs1, "tunelab_triton", False)
            and getattr(qs2, "tunelab_triton", False) and qs1.dtype == qs2.dtype):
        from . import nf4_triton

        w = nf4_triton.dense_cat(w1, qs1, w2, qs2, None if tail is None else tail.to(qs1.dtype))
        return w if w.dtype == dtype else w.to(dtype)
    w = torch.cat([dense_weight(w1, qs1, dtype), dense_weight(w2, qs2, dtype)])
    return w if tail is None else torch.cat([w, tail.to(dtype)], dim=1)


# LoraPair's forward as one augmented GEMM (_augment); TUNELAB_PAIR_AUGMENT=0 (read at import) keeps the rank-r
# product as a second GEMM over the output, for an A/B on the GPU (bench +noaugment)
AUGMENT = __import__("os").environ.get("TUNELAB_PAIR_AUGMENT", "1") != "0"


def _augment(x2, xa, bd, scale):
    """The rank-r product as part of the base GEMM (K augmentation): [x, x A^T] @ [W, scale B]^T = x W^T + scale
    (x A^T) B^T, one GEMM with r more columns, where adding it afterwards (two_products' addmm_) reads and writes
    the whole [tokens, out] output once more (gate and up at 7B 4 x 1024: 249 us a call, 14 ms of the step; run
    15's profile). The r columns are padded with zeros to a multiple of 8, which keeps each row 16-byte aligned for
    the GEMM. Returns (the augmented input, the tail of the weight: scale B and the zero columns)."""
    pad = (-xa.shape[1]) % 8
    tail = bd * scale
    if pad:
        tail = torch.cat([tail, tail.new_zeros((tail.shape[0], pad))], dim=1)
        xa = torch.cat([xa, xa.new_zeros((xa.shape[0], pad))], dim=1)
    return torch.cat([x2, xa], dim=1), tail


class LoraPair(torch.autograd.Function):
    """Two LoRA projections of the same input (gate and up) as one function: one GEMM for both x @ A^T (A stacked),
    then one GEMM for both base products and both rank-r products (the stacked weights with scale B beside them as
    a block diagonal, its zero blocks adding exact zeros: _augment), and in backward one GEMM for grad x over both
    (the two branches summed in the GEMM's fp32 accumulation, where separate projections round each to the
    compute dtype and add them). The forward rounds once (base and rank-r products summed in fp32) where the
    separate projections round the base product before adding the rank-r one."""

    @staticmethod
    def forward(ctx, x, a1, b1, a2, b2, w1, qs1, w2, qs2, scale, dtype):
        in_dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        if x2.dtype != dtype:
            x2 = x2.to(dtype)
        a = torch.cat([a1.to(dtype), a2.to(dtype)])  # [r1 + r2, in]
        bd = torch.block_diag(b1.to(dtype), b2.to(dtype))  # [out1 + out2, r1 + r2]
        xa = torch.mm(x2, a.t())
        if AUGMENT:
            x_aug, tail = _augment(x2, xa, bd, scale)
            y = torch.mm(x_aug, dense_pair(w1, qs1, w2, qs2, dtype, tail).t())  # base + rank-r products, one GEMM
        else:  # the rank-r product added by a second GEMM over the output, as the single projections do
            y = two_products(x2, dense_pair(w1, qs1, w2, qs2, dtype).t(), None, xa, bd.t(), scale)
        ctx.save_for_backward(x2, xa, a, bd)
        ctx.weights = (w1, qs1, w2, qs2)
        ctx.scale, ctx.dtype, ctx.in_dtype, ctx.x_shape = scale, dtype, in_dtype, x.shape
        ctx.r1, ctx.o1 = a1.shape[0], b1.shape[0]
        ctx.dtypes = (a1.dtype, b1.dtype, a2.dtype, b2.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x2, xa, a, bd = ctx.saved_tensors
        dtype, scale, r1, o1 = ctx.dtype, ctx.scale, ctx.r1, ctx.o1
        g = grad_y.reshape(-1, grad_y.shape[-1])
        if g.dtype != dtype:
            g = g.to(dtype)
        # grad x over both (one GEMM) and grad A stacked; grad B per block below (the zero blocks need none)
        grad_x, grad_a, _ = lora_backward(g, x2, xa, a, bd, lambda: dense_pair(*ctx.weights, dtype), scale, dtype,
                                          ctx.needs_input_grad[0], True, False)
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
            if grad_x.dtype != ctx.in_dtype:
                grad_x = grad_x.to(ctx.in_dtype)
        ga1, ga2 = grad_a[:r1].to(ctx.dtypes[0]), grad_a[r1:].to(ctx.dtypes[2])
        gb1 = torch.mm(g[:, :o1].t(), xa[:, :r1]).mul_(scale).to(ctx.dtypes[1])
        gb2 = torch.mm(g[:, o1:].t(), xa[:, r1:]).mul_(scale).to(ctx.dtypes[3])
        return grad_x, ga1, gb1, ga2, gb2, None, None, None, None, None, None


def lora_pair(x, first, second):
    """x [..., in] -> [..., out1 + out2]: the two projections' outputs side by side; first / second: each one's
    (weight, quant_state, bias, lora_a, lora_b, scale, dtype) as fast.fused_args gives them (no bias, one scale and
    one compute dtype between them: the caller checks)."""
    w1, qs1, _, a1, b1, scale, dtype = first
    w2, qs2, _, a2, b2, _, _ = second
    return LoraPair.apply(x, a1, b1, a2, b2, w1, qs1, w2, qs2, float(scale), dtype)
