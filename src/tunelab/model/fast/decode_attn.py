"""Decode-step attention as one split-K Triton kernel pair ("flash decoding"), for the slot decoder's CUDA graphs.

A decode step has one query token per row. SDPA runs it through a prefill kernel (on the H200: cuDNN's flash
forward with 64 x 128 tiles, 13.9 us a layer at batch 1 over 512 cached positions for 7 query heads per key/value
head; 0.39 ms of a 5.5 ms token for a 7B), which parallelises over query tiles that a single token does not have.
Here the cached positions are split instead:

* `_partial_kernel`, one program per (row, key/value head, split of the positions): the query heads sharing that
  key/value head (grouped-query attention: 7 for Qwen2.5-7B, padded to 16 rows for `tl.dot`) against its
  positions in blocks of BLOCK_N, with an online softmax in float32; it writes its running max, its sum of
  exponentials and its unnormalised float32 output;
* `_combine_kernel`, one program per (row, query head): the splits' partial results rescaled to the common max
  and summed, divided by the common sum, written in the query's dtype as [rows, 1, heads, head_dim] (the layout
  the decoder layer's o_proj reads).

Semantics are SDPA's for a boolean mask (True = attend): softmax(q k^T * scale + mask) v per row and head, the
keys/values read where they lie in the cache (strided views of the slot buffers, no copy, no repeat_kv), the
mask's False positions never loaded. Numerics: q k^T on tensor cores (16-bit products are exact in their
float32 accumulator), the online softmax in float32, P V as two tensor-core products of a 16-bit split of P
(high part + remainder: ~16 of P's bits kept, where flash attention rounds P to 16 bits), one rounding to the
query's dtype at the end: the float32 reference rounded, to about a unit in the last place
(tests/test_decode_attn.py states the tolerances; the decoder's GPU test checks greedy tokens against plain
generate). Under Triton's CPU interpreter, whose 16-bit tl.dot is wrong, the same 16-bit operands (P's split
included) are multiplied as float32. A row whose mask is all False gives zeros (SDPA gives NaN): the decoder
never builds one.

History: the first version (H200 run of 2026-12-02) ran both products in float32 without tensor cores
(`input_precision="ieee"`): at batch 1 it took 8.1 us a layer against cuDNN's 13.9 (replay 5.47 ms against 5.57),
at batch 32 over 512 positions the step's replay went from 7.5 to 11.5 ms: the scalar products, not memory,
bounded it. Hence the tensor-core form, measured in runs 5 and 6 of that day (docs/serve.md: 4.4 against 19.9 us
at 1 x 512, 15.9 against 24.1 at 32 x 512) and on by default on CUDA since (TUNELAB_DECODE_ATTN=0 turns it off).

`decode_attention(q, k, v, mask, scale)` is the entry point: inline when eager, the custom op
tunelab::decode_attention inside torch.compile (an opaque call in the compiled decoder layer). `supported()`
says when the decoder may use it (CUDA, or Triton's CPU interpreter; 16-bit dtypes; head_dim <= 256).
Selection: infer/decoder.py's `TUNELAB_DECODE_ATTN` lever (docs/serve.md).
"""
from __future__ import annotations

import math

import torch

try:  # Triton is optional: without it supported() is False and the decoder keeps SDPA
    import triton
    import triton.language as tl
except Exception:
    triton = tl = None

BLOCK_N = 32  # cached positions per inner block
TARGET_PROGRAMS = 264  # splits are chosen so that rows x kv heads x splits reaches about 2 programs per SM (132 on an H100/H200)
MAX_SPLITS = 64


def interpreting() -> bool:
    """Whether the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 when this module was imported)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_partial_kernel, InterpretedFunction)


def supported(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether decode_attention can run these tensors: Triton present, CUDA tensors (or the interpreter), a
    16-bit dtype, query heads a multiple of key/value heads, head_dim <= 256, one query token."""
    if triton is None or not (query.is_cuda or interpreting()):
        return False
    if query.dtype not in (torch.bfloat16, torch.float16) or key.dtype != query.dtype:
        return False
    b, h, q, d = query.shape
    kv = key.shape[1]
    return q == 1 and h % kv == 0 and d <= 256 and h // kv <= 64


def splits_for(rows: int, kv_heads: int, width: int) -> tuple[int, int]:
    """(splits, blocks per split) over `width` cached positions: enough programs to fill the GPU at small
    batches, one split per row and head where the batch alone fills it."""
    blocks = max(1, -(-width // BLOCK_N))
    want = max(1, -(-TARGET_PROGRAMS // max(1, rows * kv_heads)))
    splits = min(blocks, want, MAX_SPLITS)
    per = -(-blocks // splits)
    return -(-blocks // per), per


if triton is not None:

    @triton.jit
    def _partial_kernel(Q, K, V, MASK, O, M, L, scale, width,
                        sqb, sqh, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smn,
                        sob, soh, sos, sod, smlb, smlh, smls,
                        G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                        BLOCK: tl.constexpr, PER_SPLIT: tl.constexpr, HAS_MASK: tl.constexpr,
                        DOT_F32: tl.constexpr):
        row = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D_PAD)
        gmask = g < G
        dmask = d < D
        heads = kvh * G + g
        q = tl.load(Q + row * sqb + heads[:, None] * sqh + d[None, :] * sqd, mask=gmask[:, None] & dmask[None, :], other=0.0)
        m = tl.full([G_PAD], -1.0e30, tl.float32)
        s = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        start = split * PER_SPLIT * BLOCK
        for i in range(0, PER_SPLIT):
            n = start + i * BLOCK + tl.arange(0, BLOCK)
            keep = n < width
            if HAS_MASK:
                keep = keep & (tl.load(MASK + row * smb + n * smn, mask=n < width, other=0) != 0)
            k = tl.load(K + row * skb + kvh * skh + n[:, None] * skn + d[None, :] * skd, mask=keep[:, None] & dmask[None, :], other=0.0)
            if DOT_F32:  # Triton's CPU interpreter: its 16-bit tl.dot is wrong; float32 products are the same values
                scores = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32))) * scale
            else:  # tensor cores: 16-bit products are exact in the float32 accumulator
                scores = tl.dot(q, tl.trans(k)) * scale  # [G_PAD, BLOCK] float32
            scores = tl.where(keep[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new[:, None])
            s = s * alpha + tl.sum(p, 1)
            v = tl.load(V + row * svb + kvh * svh + n[:, None] * svn + d[None, :] * svd, mask=keep[:, None] & dmask[None, :], other=0.0)
            # P as a 16-bit high part plus its 16-bit remainder: two tensor-core products, ~16 bits of P kept
            p_hi = p.to(v.dtype)
            p_lo = (p - p_hi.to(tl.float32)).to(v.dtype)
            if DOT_F32:
                pv = tl.dot(p_hi.to(tl.float32), v.to(tl.float32)) + tl.dot(p_lo.to(tl.float32), v.to(tl.float32))
            else:
                pv = tl.dot(p_hi, v) + tl.dot(p_lo, v)
            acc = acc * alpha[:, None] + pv
            m = m_new
        out = row * sob + heads[:, None] * soh + split * sos + d[None, :] * sod
        tl.store(O + out, acc, mask=gmask[:, None] & dmask[None, :])
        ml = row * smlb + heads * smlh + split * smls
        tl.store(M + ml, m, mask=gmask)
        tl.store(L + ml, s, mask=gmask)

    @triton.jit
    def _combine_kernel(O, M, L, OUT, splits, sob, soh, sos, sod, smlb, smlh, smls, sxb, sxh, sxd,
                        D: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)
        sp = tl.arange(0, S_PAD)
        d = tl.arange(0, D_PAD)
        smask = sp < splits
        ml = row * smlb + head * smlh + sp * smls
        m = tl.load(M + ml, mask=smask, other=-1.0e30)
        s = tl.load(L + ml, mask=smask, other=0.0)
        top = tl.max(m, 0)
        w = tl.exp(m - top)  # splits past every attended position have m = -1e30: weight 0 (their s is 0 too)
        total = tl.sum(w * s, 0)
        part = tl.load(O + row * sob + head * soh + sp[:, None] * sos + d[None, :] * sod, mask=smask[:, None] & (d[None, :] < D), other=0.0)
        acc = tl.sum(part * w[:, None], 0)
        res = tl.where(total > 0, acc / total, 0.0)
        tl.store(OUT + row * sxb + head * sxh + d * sxd, res.to(OUT.dtype.element_ty), mask=d < D)


def _launch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float,
            out: torch.Tensor) -> None:
    b, h, _, d = query.shape
    kv, width = key.shape[1], key.shape[2]
    g = h // kv
    splits, per = splits_for(b, kv, width)
    dev = query.device
    part = torch.empty((b, h, splits, d), dtype=torch.float32, device=dev)
    mx = torch.empty((b, h, splits), dtype=torch.float32, device=dev)
    sm = torch.empty((b, h, splits), dtype=torch.float32, device=dev)
    q = query[:, :, 0]
    if mask is not None:  # [b, 1, 1, w] (or [b, w]) booleans; a uint8 view for the loads
        mask = mask.reshape(mask.shape[0], mask.shape[-1])[:, :width].expand(b, width)
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)
        mstrides = (mask.stride(0), mask.stride(1))
    else:
        mstrides = (0, 0)
    d_pad = triton.next_power_of_2(d)
    _partial_kernel[(b, kv, splits)](
        q, key, value, mask if mask is not None else q, part, mx, sm, float(scale), width,
        q.stride(0), q.stride(1), q.stride(2), *key.stride(), *value.stride(), *mstrides,
        *part.stride(), *mx.stride(),
        G=g, G_PAD=max(16, triton.next_power_of_2(g)), D=d, D_PAD=d_pad, BLOCK=BLOCK_N, PER_SPLIT=per, HAS_MASK=mask is not None,
        DOT_F32=interpreting(), num_warps=4)
    o = out.view(b, h, d)
    _combine_kernel[(b, h)](part, mx, sm, o, splits, *part.stride(), *mx.stride(), *o.stride(),
                            D=d, D_PAD=d_pad, S_PAD=max(2, triton.next_power_of_2(splits)), num_warps=4)


def reference(query, key, value, mask=None, scale=None):
    """What decode_attention computes, in torch (float32, keys/values repeated per query head): for tests."""
    b, h, _, d = query.shape
    kv = key.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k = key.float().repeat_interleave(h // kv, dim=1)
    v = value.float().repeat_interleave(h // kv, dim=1)
    scores = (query.float() @ k.transpose(-1, -2)) * scale  # [b, h, 1, w]
    if mask is not None:
        scores = scores.masked_fill(~mask.reshape(mask.shape[0], 1, 1, -1)[..., : key.shape[2]], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v  # [b, h, 1, d]
    return out.transpose(1, 2).to(query.dtype)  # [b, 1, h, d]


def _run(query, key, value, mask, scale, out_dtype=None):
    """The launch; out_dtype (tests only): float32 shows the kernel's sums before the final rounding."""
    if triton is None:
        raise RuntimeError("tunelab's decode attention kernel needs the 'triton' package, which cannot be imported")
    b, h, _, d = query.shape
    out = torch.empty((b, 1, h, d), dtype=out_dtype or query.dtype, device=query.device)
    _launch(query, key, value, mask, scale, out)
    return out


@torch.library.custom_op("tunelab::decode_attention", mutates_args=())
def _decode_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                         scale: float) -> torch.Tensor:
    return _run(query, key, value, mask, scale)


@_decode_attention_op.register_fake
def _(query, key, value, mask, scale):
    b, h, _, d = query.shape
    return query.new_empty((b, 1, h, d))


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None,
                     scale: float | None = None) -> torch.Tensor:
    """Attention of one query token per row: query [b, h, 1, d], key/value [b, kv, w, d] (any strides), mask
    None or booleans broadcastable as [b, 1, 1, w] (True = attend) -> [b, 1, h, d] in the query's dtype."""
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"decode_attention takes a boolean mask (got {mask.dtype})")
    if torch.compiler.is_compiling():
        return _decode_attention_op(query, key, value, mask, scale)
    return _run(query, key, value, mask, scale)
