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
        ctx.kept = keep_dense()
        ctx.save_for_backward(x2, xa, a, b, *((w,) if ctx.kept else ()))  # w: the recompute's, for the backward
        ctx.weight, ctx.quant_state = weight, quant_state
        ctx.scale, ctx.dtype, ctx.in_dtype, ctx.x_shape = scale, dtype, in_dtype, x.shape
        ctx.a_dtype, ctx.b_dtype = lora_a.dtype, lora_b.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x2, xa, a, b, *kept = ctx.saved_tensors
        need = ctx.needs_input_grad
        if kept:
            dense, below = (lambda: kept[0]), None
        else:
            dense = lambda: dense_weight(ctx.weight, ctx.quant_state, ctx.dtype)  # noqa: E731
            below = dense_below(ctx.weight, ctx.quant_state, ctx.dtype, grad_y.shape[-1], x2.shape[1])
        grad_x, grad_a, grad_b = lora_backward(grad_y, x2, xa, a, b, dense, ctx.scale, ctx.dtype, need[0], need[1],
                                               need[2], below)
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
            if grad_x.dtype != ctx.in_dtype:
                grad_x = grad_x.to(ctx.in_dtype)
        if grad_a is not None:
            grad_a = grad_a.to(ctx.a_dtype)
        if grad_b is not None:
            grad_b = grad_b.to(ctx.b_dtype)
        return grad_x, grad_a, grad_b, None, None, None, None, None


def lora_backward(grad_y, x2, xa, a, b, dense, scale: float, dtype, need_x=True, need_a=True, need_b=True,
                  below=None):
    """The projection's backward from its input rows x2 [tokens, in] and xa = x2 @ a.T [tokens, r] (a, b: the
    compute-dtype copies of A and B; dense(): the base weight, dense [out, in] in `dtype`, made only for grad x):
    (grad x [tokens, in], grad A, grad B), each None where not needed; the LoRA gradients in `dtype` before the
    caller's cast. Also called without the forward having run (split.py: the recompute skips the o and down
    products, whose outputs no gradient needs) and for several projections at once (LoraGroup: A stacked, B a
    block diagonal). below (dense_below's): grad x as one augmented GEMM, [g, scale g B] @ [W; A]."""
    g = grad_y.reshape(-1, grad_y.shape[-1])
    if g.dtype != dtype:
        g = g.to(dtype)
    gb_r = torch.mm(g, b)  # [tokens, r] = grad of (x @ A.T), before the scale
    grad_x = grad_a = grad_b = None
    if need_x and below is not None:
        g_aug, a_rows = _augment(g, gb_r, a.t(), scale)  # [g, scale g B, 0], [A; 0] (as the forward's K columns)
        grad_x = torch.mm(g_aug, below(a_rows.t()))
    elif need_x:
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


def dense_group(parts, dtype, tail=None):
    """Frozen base weights stacked, [sum of outs, in] of `dtype` (q over k over v; gate over up): each 4-bit weight
    dequantized straight into its rows where the NF4 Triton kernel applies (no copy), else the dense weights
    concatenated. parts: (weight, quant_state) pairs; tail [sum of outs, t]: columns to their right, a
    [sum of outs, in + t] result (LoraGroup's augmented weight)."""
    if all(qs is not None and w.is_cuda and getattr(qs, "tunelab_triton", False) and qs.dtype == parts[0][1].dtype
           for w, qs in parts):
        from . import nf4_triton

        w = nf4_triton.dense_stack(parts, None if tail is None else tail.to(parts[0][1].dtype))
        return w if w.dtype == dtype else w.to(dtype)
    w = torch.cat([dense_weight(w, qs, dtype) for w, qs in parts])
    return w if tail is None else torch.cat([w, tail.to(dtype)], dim=1)


def dense_pair(w1, qs1, w2, qs2, dtype, tail=None):
    """dense_group of two weights (gate over up)."""
    return dense_group(((w1, qs1), (w2, qs2)), dtype, tail)


# Whether the recompute's dense base weights are kept for the backward (keep_dense; opt-in, TUNELAB_KEEP_DENSE=1, read
# at import): the checkpoint offload recomputes a layer right before its backward, so the weight its forward
# dequantized is the one the backward needs, one layer's worth held between them. Run 17 (docs/fastpath.md): no
# measured gain at 7B 4 x 1024 (within the lease's noise) for +0.26 GiB of peak, so it is off by default.
KEEP_DENSE = __import__("os").environ.get("TUNELAB_KEEP_DENSE", "0") == "1"
# Whether the backward of a 4-bit projection with a wider input than output (down: grad x [tokens, I] from grad y
# [tokens, H]) adds its rank-r term inside one augmented GEMM, [g, s g B] @ [W; A] (opt-in, TUNELAB_BELOW=1; otherwise
# the addmm_ over grad x; read at import). Run 17: the stacked dequantize of [W; A] costs 138 us against 114 for W
# alone, and the whole step did not move (12,252 against 12,260 tok/s), so it is off by default.
BELOW = __import__("os").environ.get("TUNELAB_BELOW", "0") == "1"


def keep_dense() -> bool:
    """Whether a fused function called now keeps its dense base weight for its backward: inside the offload's
    recompute (fast.Passes.recompute, set by offload.py and split.py around it; read inside the function's forward,
    where grad mode is always off: a call without gradient keeps no autograd state, so nothing is held). Elsewhere
    (no checkpointing, or torch's own checkpoint) the weight is dequantized again in the backward: keeping it would
    hold every layer's weights at once."""
    from tunelab.model.fast import Passes

    return KEEP_DENSE and Passes.recompute


def dense_below(weight, quant_state, dtype, out_features: int, in_features: int):
    """For a 4-bit weight through the NF4 kernel whose input is wider than its output (down), the function
    rows -> [W; rows] ([out + r, in], W dequantized straight into the top rows) that lora_backward's augmented
    grad x takes; else None (the rank-r term then goes through two_products' epilogue). [g, s g B] is a copy of
    grad y, narrow here, where the add it replaces reads and writes the wide grad x."""
    if not (BELOW and quant_state is not None and weight.is_cuda and getattr(quant_state, "tunelab_triton", False)
            and out_features < in_features):
        return None
    from . import nf4_triton

    def below(rows):
        w = nf4_triton.dense_stack(((weight, quant_state), (rows, None)))
        return w if w.dtype == dtype else w.to(dtype)

    return below


# LoraPair's forward as one augmented GEMM (_augment); TUNELAB_PAIR_AUGMENT=0 (read at import) keeps the rank-r
# product as a second GEMM over the output, for an A/B on the GPU (bench +noaugment)
AUGMENT = __import__("os").environ.get("TUNELAB_PAIR_AUGMENT", "1") != "0"
# The multiple the augmented input's rank-r columns are padded to with zeros (TUNELAB_AUGMENT_PAD, read at import):
# 8 keeps each row 16-byte aligned; 64 makes the augmented width itself a multiple of 64 where the base width is
# (7B gate/up: 3,648 instead of 3,600 columns, rows 128-byte aligned for the NF4 kernel's strided store and the
# GEMM's K tiles, for 1.3% more of that GEMM's products): an A/B knob (tools/gemm_probe.py, run 18)
AUGMENT_PAD = int(__import__("os").environ.get("TUNELAB_AUGMENT_PAD", "8"))


def _augment(x2, xa, bd, scale):
    """The rank-r product as part of the base GEMM (K augmentation): [x, x A^T] @ [W, scale B]^T = x W^T + scale
    (x A^T) B^T, one GEMM with r more columns, where adding it afterwards (two_products' addmm_) reads and writes
    the whole [tokens, out] output once more (gate and up at 7B 4 x 1024: 249 us a call, 14 ms of the step; run
    15's profile). The r columns are padded with zeros to a multiple of 8, which keeps each row 16-byte aligned for
    the GEMM (AUGMENT_PAD). Returns (the augmented input, the tail of the weight: scale B and the zero columns)."""
    pad = (-xa.shape[1]) % AUGMENT_PAD
    tail = bd * scale
    if pad:
        tail = torch.cat([tail, tail.new_zeros((tail.shape[0], pad))], dim=1)
        xa = torch.cat([xa, xa.new_zeros((xa.shape[0], pad))], dim=1)
    return torch.cat([x2, xa], dim=1), tail


def _group_inputs(ctx, x, a, w1, qs1, w2, qs2, w3, qs3, scale, dtype):
    """LoraGroup's forward prologue: (x's rows in `dtype`, x @ A^T, the (weight, quant state) parts), with what its
    backward reads set on ctx."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype != dtype:
        x2 = x2.to(dtype)
    ctx.parts = ((w1, qs1), (w2, qs2)) if w3 is None else ((w1, qs1), (w2, qs2), (w3, qs3))
    ctx.scale, ctx.dtype, ctx.in_dtype, ctx.x_shape = scale, dtype, x.dtype, x.shape
    return x2, torch.mm(x2, a.t()), ctx.parts


class LoraGroup(torch.autograd.Function):
    """Two or three LoRA projections of the same input (gate and up; q, k and v) as one function: one GEMM for their
    x @ A^T (A stacked, a [sum of r, in]), then one GEMM for all base products and rank-r products (the stacked
    weights with scale B beside them as a block diagonal bd [sum of outs, sum of r], its zero blocks adding exact
    zeros: _augment), the stacked biases in its epilogue, and in backward one GEMM for grad x over all (the branches
    summed in the GEMM's fp32 accumulation, where separate projections round each to the compute dtype and add
    them), one for grad A (stacked) and one for grad bd (autograd's block_diag backward keeps its diagonal blocks).
    a and bd come in as tensors in the compute dtype (lora_group stacks them: autograd takes their gradients back to
    each parameter). The forward rounds once (base and rank-r products summed in fp32) where the separate
    projections round the base product before adding the rank-r one."""

    @staticmethod
    def forward(ctx, x, a, bd, bias, w1, qs1, w2, qs2, w3, qs3, scale, dtype):
        x2, xa, parts = _group_inputs(ctx, x, a, w1, qs1, w2, qs2, w3, qs3, scale, dtype)
        if AUGMENT:
            x_aug, tail = _augment(x2, xa, bd, scale)
            w = dense_group(parts, dtype, tail)  # [W; ...] with scale B (and zero columns) to the right
            y = torch.mm(x_aug, w.t()) if bias is None else torch.addmm(bias, x_aug, w.t())
        else:  # the rank-r product added by a second GEMM over the output, as the single projections do
            w = dense_group(parts, dtype)
            y = two_products(x2, w.t(), bias, xa, bd.t(), scale)
        ctx.kept = keep_dense()
        ctx.save_for_backward(x2, xa, a, bd, *((w,) if ctx.kept else ()))
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x2, xa, a, bd, *kept = ctx.saved_tensors
        dtype, cols = ctx.dtype, x2.shape[1]
        if kept:
            dense = lambda: kept[0][:, :cols]  # noqa: E731 (the augmented weight's base columns)
        else:
            dense = lambda: dense_group(ctx.parts, dtype)  # noqa: E731
        need = ctx.needs_input_grad
        grad_x, grad_a, grad_bd = lora_backward(grad_y, x2, xa, a, bd, dense, ctx.scale, dtype, need[0], need[1],
                                                need[2])
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
            if grad_x.dtype != ctx.in_dtype:
                grad_x = grad_x.to(ctx.in_dtype)
        return grad_x, grad_a, grad_bd, None, None, None, None, None, None, None, None, None


class LoraGroupReplay(LoraGroup):
    """LoraGroup whose forward does not compute: it returns the output a no-grad first pass made from the same input
    (`kept`, in bias's place: the replayed groups have none) and saves what LoraGroup's backward needs (x and
    x @ A^T, a [tokens, r] GEMM). The checkpoint offload keeps gate/up's output for some layers
    (split.first_pass_keep) so that their recompute skips the pair's GEMM; the backward is LoraGroup's."""

    @staticmethod
    def forward(ctx, x, a, bd, kept, w1, qs1, w2, qs2, w3, qs3, scale, dtype):
        x2, xa, _ = _group_inputs(ctx, x, a, w1, qs1, w2, qs2, w3, qs3, scale, dtype)  # xa: as the forward made it
        ctx.save_for_backward(x2, xa, a, bd)  # no dense weight kept: the backward dequantizes
        return kept.view(*x.shape[:-1], kept.shape[-1])


def _group_args(projections):
    """LoraGroup's arguments after x and before the weights: (a stacked, bd the block diagonal of the Bs, the stacked
    biases or None), in the compute dtype, then the weights and quant states."""
    if len(projections) not in (2, 3):
        raise ValueError(f"lora_group takes two or three projections, not {len(projections)}")
    dtype = projections[0][6]
    a = torch.cat([p[3].to(dtype) for p in projections])  # [sum of r, in]
    bd = torch.block_diag(*[p[4].to(dtype) for p in projections])  # [sum of outs, sum of r]
    bias = None if projections[0][2] is None else torch.cat([p[2].to(dtype) for p in projections])
    (w1, qs1), (w2, qs2) = projections[0][:2], projections[1][:2]
    w3, qs3 = projections[2][:2] if len(projections) == 3 else (None, None)
    return a, bd, bias, (w1, qs1, w2, qs2, w3, qs3)


def lora_group(x, *projections):
    """x [..., in] -> [..., sum of outs]: two or three projections' outputs side by side; each projection: its
    (weight, quant_state, bias, lora_a, lora_b, scale, dtype) as fast.fused_args gives them (one scale and one
    compute dtype among them, biases on all or none: the caller checks)."""
    a, bd, bias, weights = _group_args(projections)
    return LoraGroup.apply(x, a, bd, bias, *weights, float(projections[0][5]), projections[0][6])


def lora_pair_replay(x, first, second, kept):
    """lora_pair's output for input x without computing it: `kept`, what lora_pair(x, first, second) returned in a
    no-grad pass over the same x; its backward is lora_pair's (LoraGroupReplay)."""
    a, bd, bias, weights = _group_args((first, second))
    if bias is not None:
        raise ValueError("lora_pair_replay covers projections without a bias (the caller checks)")
    return LoraGroupReplay.apply(x, a, bd, kept, *weights, float(first[5]), first[6])


def lora_pair(x, first, second):
    """lora_group of gate and up (no bias: the caller checks)."""
    return lora_group(x, first, second)
