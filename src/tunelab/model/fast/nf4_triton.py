"""One Triton kernel that dequantizes a bitsandbytes 4-bit weight (NF4 or FP4, with or without double
quantization) straight to its dense dtype, bit-identical to bitsandbytes' own dequantize.

bitsandbytes needs three launches for a double-quantized weight: `dequantize_blockwise` (uint8 absmax ->
fp32 through its 256-entry code and the second-level fp32 absmax), an in-place `absmax += offset`, then
`dequantize_4bit`. This kernel does all three in one pass: each program reads its blocks' uint8 absmax, the
second-level absmax and code entry, rebuilds the fp32 absmax, and writes the dense values.

Arithmetic, matched to bitsandbytes 0.50 (csrc/kernels.cu kDequantizeBlockwise, csrc/cpu_ops.cpp,
bitsandbytes/functional.py dequantize_4bit), so the output is bit for bit the same:
* nested absmax: `code2[q] * absmax2[block // blocksize2]` (one fp32 multiply, rounded), then `+ offset`
  (one fp32 add, rounded). The kernel is compiled with `enable_fp_fusion=False` so the multiply and add are
  never contracted into an FMA (which would round once instead of twice);
* element: `table[nibble] * absmax` in fp32 (the high nibble of byte i is element 2i, the low nibble 2i+1;
  blocks are over the flat element index), rounded once to the output dtype (round to nearest even);
* the tables are the fp32 constants of bitsandbytes' CUDA kernel (FP4's sign applied to its 3-bit table is
  exact, so a 16-entry table with -0.0 at 0b1000 is the same function);
* bitsandbytes' CUDA library is built with --use_fast_math, so both of its products flush a subnormal result
  to a zero of the same sign (mul.ftz); its CPU library does not. The kernel does the same flush on CUDA
  tensors (`ftz`), with integer operations after each product; torch's offset add does not flush, and neither
  does the kernel's. (Only blocks whose absmax is below ~1.5e-37 are affected: the tests craft such blocks.)

bf16 rounding is written with integer operations (`rne_to_bf16`) under Triton's CPU interpreter, because the
interpreter's float32 -> bfloat16 cast truncates; compiled for a GPU the kernel uses the hardware conversion
(cvt.rn, round to nearest even) by default. Both give RTNE; tests/test_nf4_triton.py checks each against
bitsandbytes (the integer version on the CPU under the interpreter and on the GPU, the hardware one on the GPU).

Selection: `dense_weight()` in lora.py calls `dense` here (inline when eager, the custom op
tunelab::dequantize_4bit inside torch.compile) when `enabled_for(weight, quant_state)`
holds (CUDA tensor, nf4/fp4, a block size bitsandbytes allows, Triton importable, env TUNELAB_NF4_TRITON not
"0"); otherwise it keeps bitsandbytes' path. See docs/fastpath.md ("One-launch NF4 dequantize").
"""
from __future__ import annotations

import os

import torch

from tunelab.model.fast import ops

# bitsandbytes' CUDA tables (csrc/kernels.cu nf4_dequantization_lut / fp4_dequantization_lut), as fp32.
NF4_TABLE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0)
_FP4_MAGNITUDE = (0.0, 0.005208333333, 0.66666667, 1.0, 0.33333333, 0.5, 0.16666667, 0.25)
FP4_TABLE = _FP4_MAGNITUDE + tuple(-v for v in _FP4_MAGNITUDE)  # bit 3 is the sign; -0.0 at 0b1000

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' dequantize_4bit accepts
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Whether dense_weight() uses this kernel when TUNELAB_NF4_TRITON is unset: yes, since on the H200 it was bit-
# identical to bitsandbytes at every 7B projection shape and 1.44-1.87x faster on the GPU, about even on the
# host (tools/nf4_probe.py; docs/fastpath.md). "0" forces bitsandbytes' path, "1" the kernel.
DEFAULT_ON = True

# Tuning: packed bytes per program, warps, and the tile form (tools/nf4_probe.py measured them on the H200):
# byte tile (load packed bytes, split the nibbles, interleave with join/reshape) or element tile (each output
# element loads its byte and shifts by its parity: no interleave, each byte read twice through L1).
BYTES_PER_PROGRAM = 2048
NUM_WARPS = 4
ELEMENT_TILE = False
# Table gather (tools/nf4_probe.py's knob, off until measured): per block, the 16 products table[j] * absmax rounded
# to the out dtype once ([ROWS, 16]), each element picked from them by its nibble (tl.gather) instead of its own
# fp32 multiply and rounding. The same product and rounding (FTZ before the rounding), so the same bits.
TABLE_GATHER = False
# A strided out (the left columns of a wider buffer: the stacked gate/up weight with its LoRA columns) whose row
# length is a multiple of the block size (every Qwen / Llama width) is stored per quantization block, its row and
# column from a 32-bit division by the blocks per row as a compile-time constant (a multiply and a shift). The
# per-element form divides a 64-bit flat index by the runtime row length for every stored vector (an emulated
# 64-bit division, ~70 instructions): run 18 (tools/nf4_store_probe.py, GPU alone) measured gate + up into a
# [37,888, 3,600] buffer at 172.0 us against 117.0 contiguous, and run 17's per-block form with a runtime divisor
# 176.7 (Triton already computes the address once per stored vector: the division, not its count, is the cost).
# TUNELAB_NF4_BLOCK_ROWS=0 keeps the per-element form (the A/B); any row length not a multiple uses it anyway.
BLOCK_ROWS = os.environ.get("TUNELAB_NF4_BLOCK_ROWS", "1") != "0"

try:  # Triton is optional: without it (or broken) enabled_for() is False and bitsandbytes' path stays
    import triton
    import triton.language as tl
except Exception:
    triton = tl = None
_tables: dict = {}


def _load_triton():
    return triton if triton is not None else False


def interpreting() -> bool:
    """Whether the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1 when this module was imported)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(nf4_dequant_kernel, InterpretedFunction)


def enabled_for(weight, quant_state) -> bool:
    """True when dense_weight() should use this kernel for `weight` (packed 4-bit) and its quant state."""
    flag = os.environ.get("TUNELAB_NF4_TRITON")
    if flag == "0" or (flag is None and not DEFAULT_ON):
        return False
    qs = quant_state
    if not weight.is_cuda or qs.quant_type not in ("nf4", "fp4") or qs.dtype not in OUT_DTYPES:
        return False
    if qs.blocksize not in BLOCKSIZES or (qs.nested and qs.state2.blocksize not in BLOCKSIZES):
        return False
    return triton is not None


def _table(quant_type: str, device) -> torch.Tensor:
    key = (quant_type, str(device))
    t = _tables.get(key)
    if t is None:
        t = torch.tensor(NF4_TABLE if quant_type == "nf4" else FP4_TABLE, dtype=torch.float32, device=device)
        _tables[key] = t
    return t


def _state_tensors(weight, qs):
    """(absmax, absmax2, code2, offset, blocksize2) of a quant state; unused ones point at absmax."""
    if qs.nested:
        s2 = qs.state2
        offset = qs.offset
        if not isinstance(offset, torch.Tensor):
            offset = torch.tensor(float(offset), dtype=torch.float32, device=weight.device)
        return qs.absmax, s2.absmax, s2.code, offset, int(s2.blocksize)
    return qs.absmax, qs.absmax, qs.absmax, qs.absmax, 256


def dequantize_4bit(weight: torch.Tensor, quant_state, out: torch.Tensor | None = None, *,
                    hw_bf16: bool | None = None, ftz: bool | None = None, bytes_per_program: int | None = None,
                    num_warps: int | None = None, element_tile: bool | None = None,
                    table_gather: bool | None = None, block_rows: bool | None = None) -> torch.Tensor:
    """Dense `quant_state.shape` tensor of `quant_state.dtype`, equal bit for bit to
    bitsandbytes.functional.dequantize_4bit(weight, quant_state) (flat [N, 1] packed layout).

    `weight` holds the packed bytes in any storage dtype (uint8, or bf16/fp16/fp32 quant storage).
    hw_bf16: use the hardware fp32 -> bf16 conversion (default: yes when compiled, no under the interpreter,
    whose cast truncates). ftz: flush subnormal products like bitsandbytes' CUDA library (default: on for CUDA
    tensors, off elsewhere, as bitsandbytes' CPU library). bytes_per_program / num_warps / element_tile /
    table_gather: tuning knobs for tools/nf4_probe.py. block_rows (an `out` with a row stride): address the store
    per quantization block with a constant divisor (needs a row length that is a multiple of the block size; the
    default, BLOCK_ROWS, where it is) or per element (False)."""
    if not _load_triton():
        raise RuntimeError("tunelab's NF4 Triton kernel needs the 'triton' package, which cannot be imported")
    qs = quant_state
    absmax, absmax2, code2, offset, bs2 = _state_tensors(weight, qs)
    if out is None:
        out = torch.empty(tuple(qs.shape), dtype=qs.dtype, device=weight.device)
    elif (out.dtype != qs.dtype or tuple(out.shape) != tuple(qs.shape)
          or not (out.is_contiguous() or (out.dim() == 2 and out.stride(1) == 1))):
        raise ValueError(f"out must be a {qs.dtype} tensor of shape {tuple(qs.shape)}, contiguous or rows of a "
                         "wider one")
    _launch(weight, absmax, absmax2, code2, offset, int(qs.blocksize), bs2, bool(qs.nested), qs.quant_type, out,
            hw_bf16, ftz, bytes_per_program, num_warps, element_tile, table_gather, block_rows)
    return out


def _launch(weight, absmax, absmax2, code2, offset, bs, bs2, nested, quant_type, out, hw_bf16=None, ftz=None,
            bytes_per_program=None, num_warps=None, element_tile=None, table_gather=None, block_rows=None):
    n = out.numel()
    q = weight.reshape(-1).view(torch.uint8) if weight.dtype != torch.uint8 else weight.reshape(-1)
    if q.numel() < (n + 1) // 2:
        raise ValueError(f"packed weight has {q.numel()} bytes, {(n + 1) // 2} needed for {n} values")
    if n == 0:
        return
    if hw_bf16 is None:
        hw_bf16 = not interpreting()
    rows = max(1, (bytes_per_program or BYTES_PER_PROGRAM) // (bs // 2))
    n_blocks = -(-n // bs)
    grid = (-(-n_blocks // rows),)
    out_kind = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[out.dtype]
    if out_kind == 2 and hw_bf16:
        out_kind = 3
    strided = not out.is_contiguous()  # a 2-D view with unit column stride (dequantize_4bit checks it)
    # strided rows whose length is a multiple of the block: each block lies inside one row; its row is its index
    # (int32: n_blocks < 2**31) over the blocks per row, a compile-time constant (one compile per row width)
    can = strided and out.shape[-1] % bs == 0 and n_blocks < 2 ** 31
    if block_rows and not can:
        raise ValueError(f"block_rows needs a strided out whose row length ({out.shape[-1]}) is a multiple of the "
                         f"block size {bs}")
    per_block = can and (BLOCK_ROWS if block_rows is None else bool(block_rows))
    args = (q, absmax, absmax2, code2, offset, _table(quant_type, weight.device), out if strided else out.view(-1),
            n, n_blocks, out.shape[-1], out.stride(0) if strided else out.shape[-1])
    kw = dict(BS=bs, BS2=bs2, ROWS=rows, NESTED=nested, OUT_KIND=out_kind, STRIDED=strided,
              BPR=out.shape[-1] // bs if per_block else 0,
              FTZ=bool(weight.is_cuda if ftz is None else ftz),
              ELEM=bool(ELEMENT_TILE if element_tile is None else element_tile),
              GATHER=bool(TABLE_GATHER if table_gather is None else table_gather),
              num_warps=num_warps or NUM_WARPS, enable_fp_fusion=False)
    if weight.is_cuda and weight.device.index != torch.cuda.current_device():
        with torch.cuda.device(weight.device):
            nf4_dequant_kernel[grid](*args, **kw)
    else:
        nf4_dequant_kernel[grid](*args, **kw)


def _dequantize_impl(weight, absmax, absmax2, code2, offset, blocksize, blocksize2, nested, quant_type, shape, dtype):
    out = torch.empty(shape, dtype=dtype, device=weight.device)
    _launch(weight, absmax, absmax2, code2, offset, blocksize, blocksize2, nested, quant_type, out)
    return out


def _dequantize_fake(weight, absmax, absmax2, code2, offset, blocksize, blocksize2, nested, quant_type, shape, dtype):
    return weight.new_empty(shape, dtype=dtype)


_dequantize_op = ops.define(
    "dequantize_4bit", "(Tensor weight, Tensor absmax, Tensor absmax2, Tensor code2, Tensor offset, int blocksize, "
    "int blocksize2, bool nested, str quant_type, int[] shape, ScalarType dtype) -> Tensor",
    _dequantize_impl, _dequantize_fake)


def _stack_into(parts, tail, cols, dtype, device):
    """[sum of rows, cols (+ tail's columns)] of `dtype`: parts stacked, `tail` to their right. parts: (rows, dense,
    state) each, state (weight, absmax, absmax2, code2, offset, blocksize, blocksize2, nested, quant_type) for a 4-bit
    part (dequantized straight into its rows) or None for a dense one (`dense`, copied and cast into its rows)."""
    total = sum(r for r, _, _ in parts)
    extra = 0 if tail is None else tail.shape[1]
    out = torch.empty((total, cols + extra), dtype=dtype, device=device)
    r0 = 0
    for r, dense, state in parts:
        rows = out[r0:r0 + r, :cols] if extra else out[r0:r0 + r]  # no tail: contiguous rows (the plain store)
        if state is None:
            rows.copy_(dense)
        else:
            _launch(*state, rows)
        r0 += r
    if tail is not None:
        out[:, cols:].copy_(tail)
    return out


def _stack_impl(weights, absmax, absmax2, code2, offset, dense, tail, is_dense, rows, blocksize, blocksize2, nested,
                quant_type, cols, dtype):
    parts, iq, idn = [], 0, 0
    for r, d in zip(rows, is_dense):
        if d:
            parts.append((r, dense[idn], None))
            idn += 1
        else:
            parts.append((r, None, (weights[iq], absmax[iq], absmax2[iq], code2[iq], offset[iq], blocksize[iq],
                                    blocksize2[iq], nested[iq], quant_type[iq])))
            iq += 1
    device = (weights[0] if weights else dense[0]).device
    return _stack_into(parts, tail, cols, dtype, device)


def _stack_fake(weights, absmax, absmax2, code2, offset, dense, tail, is_dense, rows, blocksize, blocksize2, nested,
                quant_type, cols, dtype):
    ref = weights[0] if weights else dense[0]
    return ref.new_empty((sum(rows), cols + (0 if tail is None else tail.shape[1])), dtype=dtype)


# one opaque op for any number of parts: the 4-bit parts' tensors as parallel lists (in part order), the dense parts
# as one list, is_dense saying which list each part (rows[i] rows) comes from
_stack_op = ops.define(
    "dequantize_4bit_stack", "(Tensor[] weights, Tensor[] absmax, Tensor[] absmax2, Tensor[] code2, Tensor[] offset, "
    "Tensor[] dense, Tensor? tail, bool[] is_dense, int[] rows, int[] blocksize, int[] blocksize2, bool[] nested, "
    "str[] quant_type, int cols, ScalarType dtype) -> Tensor",
    _stack_impl, _stack_fake)


def dense_stack(parts, tail: torch.Tensor | None = None) -> torch.Tensor:
    """Weights of one input width stacked into one [sum of rows, cols] tensor (lora.dense_group: q over k over v,
    gate over up; lora.dense_below: down's weight over LoRA A's rows). parts: (weight, quant_state) pairs, each a
    packed 4-bit weight with its bitsandbytes QuantState (dequantized by the kernel straight into its rows: no copy)
    or (dense [rows, cols] tensor, None) (copied into its rows, cast to the result's dtype). The dtype is the 4-bit
    parts' common one, or the first part's when all are dense. tail [sum of rows, t] of that dtype: written to their
    right, a [sum of rows, cols + t] result (the LoRA B columns beside the base weight: one GEMM adds the rank-r
    product). Eager: the launches inline; inside torch.compile: one opaque op (tunelab::dequantize_4bit_stack)."""
    parts = list(parts)
    if not parts:
        raise ValueError("dense_stack needs at least one part")
    shapes, qdtypes = [], []
    for i, (w, qs) in enumerate(parts):
        shape = tuple(int(d) for d in (w.shape if qs is None else qs.shape))
        if len(shape) != 2:
            raise ValueError(f"dense_stack's part {i} is not 2-D: {shape}")
        shapes.append(shape)
        if qs is not None:
            if qs.dtype not in OUT_DTYPES:
                raise ValueError(f"dense_stack's part {i} dequantizes to {qs.dtype}, not one of {OUT_DTYPES}")
            qdtypes.append(qs.dtype)
    cols = shapes[0][1]
    if any(c != cols for _, c in shapes):
        raise ValueError(f"dense_stack needs one column count, not {shapes}")
    if any(d != qdtypes[0] for d in qdtypes):
        raise ValueError(f"dense_stack's 4-bit parts need one dtype, not {qdtypes}")
    dtype = qdtypes[0] if qdtypes else parts[0][0].dtype
    total = sum(r for r, _ in shapes)
    if tail is not None and (tail.dim() != 2 or tail.shape[0] != total or tail.dtype != dtype):
        raise ValueError(f"dense_stack's tail must be [{total}, t] of {dtype}, not {tuple(tail.shape)} {tail.dtype}")
    states = [None if qs is None else (w, *_state_tensors(w, qs)) for w, qs in parts]
    if not torch.compiler.is_compiling():
        stack = [(r, w if qs is None else None,
                  None if qs is None else (*st[:5], int(qs.blocksize), st[5], bool(qs.nested), qs.quant_type))
                 for (r, _), (w, qs), st in zip(shapes, parts, states)]
        return _stack_into(stack, tail, cols, dtype, parts[0][0].device)
    quant = [(st, qs) for (_, qs), st in zip(parts, states) if qs is not None]
    return _stack_op([st[0] for st, _ in quant], [st[1] for st, _ in quant], [st[2] for st, _ in quant],
                     [st[3] for st, _ in quant], [st[4] for st, _ in quant], [w for w, qs in parts if qs is None],
                     tail, [qs is None for _, qs in parts], [r for r, _ in shapes],
                     [int(qs.blocksize) for _, qs in quant], [st[5] for st, _ in quant],
                     [bool(qs.nested) for _, qs in quant], [qs.quant_type for _, qs in quant], cols, dtype)


def dense_cat(w1: torch.Tensor, qs1, w2: torch.Tensor, qs2, tail: torch.Tensor | None = None) -> torch.Tensor:
    """dense_stack of two 4-bit weights (gate over up), `tail` to their right."""
    return dense_stack(((w1, qs1), (w2, qs2)), tail)


def dense(weight: torch.Tensor, quant_state) -> torch.Tensor:
    """dequantize_4bit for lora.dense_weight: inline when eager (a custom op's dispatch costs CPU time the
    launch-bound eager step cannot spare), one opaque op (tunelab::dequantize_4bit) inside torch.compile, as
    bitsandbytes' own ops are there."""
    if not torch.compiler.is_compiling():
        return dequantize_4bit(weight, quant_state)
    qs = quant_state
    absmax, absmax2, code2, offset, bs2 = _state_tensors(weight, qs)
    return _dequantize_op(weight, absmax, absmax2, code2, offset, int(qs.blocksize), bs2, bool(qs.nested),
                          qs.quant_type, [int(d) for d in qs.shape], qs.dtype)


if triton is not None:  # the kernels are module globals: Triton resolves the helper by global name

    @triton.jit
    def rne_to_bf16(v):
        """fp32 -> bf16 bits, round to nearest even, in integer ops (NaN -> 0x7FFF, as the hardware gives)."""
        bits = v.to(tl.uint32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        r = tl.where(v != v, 0x7FFF, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def flush_subnormal(v):
        """A subnormal fp32 value becomes a zero of its sign (what a mul.ftz result is)."""
        bits = v.to(tl.uint32, bitcast=True)
        return tl.where((bits & 0x7F800000) == 0, bits & 0x80000000, bits).to(tl.float32, bitcast=True)

    @triton.jit
    def to_out(vals, OUT_KIND: tl.constexpr):
        """fp32 products -> the out dtype, rounded to nearest even (0 fp32, 1 fp16, 2 bf16 in integer ops, 3 bf16
        by the hardware's cvt.rn)."""
        if OUT_KIND == 0:
            res = vals
        elif OUT_KIND == 1:
            res = vals.to(tl.float16)  # RTNE (numpy's conversion under the interpreter is RTNE as well)
        elif OUT_KIND == 2:
            res = rne_to_bf16(vals)
        else:
            res = vals.to(tl.bfloat16)  # hardware cvt.rn: RTNE
        return res

    @triton.jit
    def nf4_dequant_kernel(q_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, table_ptr, out_ptr,
                           n_elems, n_blocks, out_cols, out_stride,
                           BS: tl.constexpr, BS2: tl.constexpr, ROWS: tl.constexpr,
                           NESTED: tl.constexpr, OUT_KIND: tl.constexpr, FTZ: tl.constexpr,
                           ELEM: tl.constexpr, STRIDED: tl.constexpr, BPR: tl.constexpr,
                           GATHER: tl.constexpr):
        # One program: ROWS quantization blocks = a [ROWS, BS/2] tile of packed bytes -> [ROWS, BS] outputs.
        HALF: tl.constexpr = BS // 2
        pid = tl.program_id(0).to(tl.int64)
        blk0 = pid * ROWS  # first block (int64: the flat offsets below can pass 2**31 on large weights)
        rows = tl.arange(0, ROWS)
        blk_ok = rows < n_blocks - blk0
        blk = blk0 + rows
        if NESTED:
            qa = tl.load(absmax_ptr + blk, mask=blk_ok, other=0).to(tl.int32)
            a2 = tl.load(absmax2_ptr + blk // BS2, mask=blk_ok, other=0.0)
            c = tl.load(code2_ptr + qa, mask=blk_ok, other=0.0)
            prod = c * a2
            if FTZ:
                prod = flush_subnormal(prod)
            scale = prod + tl.load(offset_ptr)  # two roundings, as bitsandbytes (no FMA: see launch)
        else:
            scale = tl.load(absmax_ptr + blk, mask=blk_ok, other=0.0)
        # packed bytes of this tile; offsets inside the tile are int32, the tile base is int64
        e0 = blk0 * BS
        # what is left of the tensor from this tile on, clamped to the tile so the masks compare int32
        byte_left = tl.minimum((n_elems + 1) // 2 - blk0 * HALF, ROWS * HALF).to(tl.int32)
        e_left = tl.minimum(n_elems - e0, ROWS * BS).to(tl.int32)
        local_e = rows[:, None] * BS + tl.arange(0, BS)[None, :]
        e_mask = local_e < e_left
        if GATHER:  # per block the 16 products, flushed and rounded once: [ROWS, 16] of the out dtype
            prods = tl.load(table_ptr + tl.arange(0, 16))[None, :] * scale[:, None]
            if FTZ:
                prods = flush_subnormal(prods)
            prods = to_out(prods, OUT_KIND)
        if ELEM:  # element tile: byte e // 2, high nibble for even e
            byte = tl.load(q_ptr + blk0 * HALF + local_e // 2, mask=e_mask, other=0).to(tl.int32)
            nib = (byte >> (4 - (local_e & 1) * 4)) & 15
            if GATHER:
                res = tl.gather(prods, nib, 1)
            else:
                vals = tl.load(table_ptr + nib) * scale[:, None]
        else:  # byte tile: element 2i = high nibble of byte i, 2i+1 = its low nibble
            local_b = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
            byte = tl.load(q_ptr + blk0 * HALF + local_b, mask=local_b < byte_left, other=0)
            if GATHER:
                hi = tl.gather(prods, (byte >> 4).to(tl.int32), 1)
                lo = tl.gather(prods, (byte & 15).to(tl.int32), 1)
                res = tl.reshape(tl.join(hi, lo), (ROWS, BS))
            else:
                hi = tl.load(table_ptr + (byte >> 4).to(tl.int32)) * scale[:, None]
                lo = tl.load(table_ptr + (byte & 15).to(tl.int32)) * scale[:, None]
                vals = tl.reshape(tl.join(hi, lo), (ROWS, BS))
        if not GATHER:
            if FTZ:
                vals = flush_subnormal(vals)
            res = to_out(vals, OUT_KIND)
        if STRIDED:  # rows of out_cols values, out_stride apart (a wider buffer's left columns)
            if BPR > 0:  # out_cols == BPR * BS: block b is columns [(b % BPR) BS, ...) of row b // BPR
                b32 = blk.to(tl.int32)  # a constant divisor: a multiply-high and a shift, no division
                row = b32 // BPR
                base = out_ptr + row.to(tl.int64) * out_stride + (b32 - row * BPR) * BS
                tl.store(base[:, None] + tl.arange(0, BS)[None, :], res, mask=e_mask)
            else:  # a block may cross a row end: the row and column of every element (a 64-bit division)
                flat = e0 + local_e
                tl.store(out_ptr + (flat // out_cols) * out_stride + flat % out_cols, res, mask=e_mask)
        else:
            tl.store(out_ptr + e0 + local_e, res, mask=e_mask)
