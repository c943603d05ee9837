"""tunelab.model.fast.nf4_triton (one-launch 4-bit dequantize) against bitsandbytes' own dequantize, bit for bit.

CPU: weights are quantized by real bitsandbytes (CPU backend; NF4 and FP4, double quantization on and off,
block sizes 64/128/4096, shapes whose rows or sizes are not multiples of the block, odd sizes), the kernel runs
under Triton's interpreter in a subprocess (TRITON_INTERPRET must be set before triton is imported, and a
subprocess keeps it away from every other test in this pytest process), and its outputs come back here to be
compared with bitsandbytes' dequantize: equal bits in bf16, fp16 and fp32.

Reference on the CPU: bitsandbytes.functional.dequantize_4bit (its C++ CPU kernel), except where that kernel
indexes the absmax per row instead of per flat block (its AVX512 path, rows a multiple of 16 but not of the
block size: it then disagrees with bitsandbytes' own quantizer and CUDA kernel) or where bitsandbytes itself
falls back to its torch implementation (odd row length); there the reference is that torch implementation
(bitsandbytes.backends.default.ops._dequantize_4bit_compute, run eagerly instead of through torch.compile, which
would take minutes here); block sizes >= 2048 likewise (bitsandbytes sends them to that torch code on AVX512
CPUs). That torch code's FP4 table has +0.0 where the CUDA and C++ tables have -0.0, so for
those cases only, a zero may differ in sign.

GPU (marked gpu): the same at Qwen2.5-7B projection shapes against bitsandbytes' CUDA kernels (strictly equal
bits, every output element written), both bf16 conversions, and the fast path's dense_weight with the kernel.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

_INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}

# (shape, nested, quant_type, blocksize, dtype, quant_storage, bytes_per_program, mod)
# mod "ties": the absmax rewritten so that products with the exact table entries (+-1, 0.5, 0.25 ...) fall
# exactly halfway between two bf16/fp16 values, which random data almost never does: checks round-half-to-even.
# mod "tiny": some blocks' absmax (or second-level absmax) so small that products are subnormal: bitsandbytes'
# CUDA library flushes them to zero (GPU test); "tiny-ftz" runs the kernel's flush on the CPU too, against
# bitsandbytes' CPU ops with the CUDA library's flushes applied (_reference_cpu).
_SHAPES = [(40, 64), (33, 130), (7, 31), (64, 96), (120, 320)]  # 120x320 at bs 64: three 2nd-level blocks
CASES = []
for _shape in _SHAPES:
    for _nested in (True, False):
        for _qt in ("nf4", "fp4"):
            for _dt in (torch.bfloat16, torch.float16, torch.float32):
                _bs = 64 if _nested != (_qt == "fp4") else 128  # each block size with and without nesting
                CASES.append((_shape, _nested, _qt, _bs, _dt, torch.uint8, None, None))
CASES += [
    ((96, 64), True, "nf4", 64, torch.bfloat16, torch.bfloat16, None, None),  # tunelab's: bf16 quant storage
    ((40, 64), True, "nf4", 64, torch.bfloat16, torch.uint8, 32, None),  # one block per program, many programs
    ((120, 320), True, "fp4", 128, torch.float16, torch.uint8, 512, None),  # partial last tile
    ((5, 1000), True, "nf4", 4096, torch.bfloat16, torch.uint8, None, None),  # block larger than the tensor
    ((129, 2048), True, "nf4", 4096, torch.float32, torch.uint8, None, None),
]
CASES += [((64, 128), False, qt, 64, dt, torch.uint8, None, "ties")
          for qt in ("nf4", "fp4") for dt in (torch.bfloat16, torch.float16)]
CASES += [((320, 128), nested, "nf4", 64, dt, torch.uint8, None, mod)
          for mod in ("tiny", "tiny-ftz") for nested in (False, True) for dt in (torch.bfloat16, torch.float32)]

_RUNNER = r"""
import sys, torch
from tunelab.model.fast import nf4_triton as K
assert K.interpreting(), "TRITON_INTERPRET did not reach triton"
items = torch.load(sys.argv[1], weights_only=False)
outs = [K.dequantize_4bit(p, qs, bytes_per_program=bpp, ftz=ftz, element_tile=bool(i % 2))
        for i, (p, qs, bpp, ftz) in enumerate(items)]  # odd cases: the element-tile form of the kernel
p, qs = items[0][:2]  # the custom op that torch.compile sees (fullgraph: no graph break)
compiled = torch.compile(lambda w: K.dense(w, qs), backend="aot_eager", fullgraph=True)(p)
(p1, qs1), (p2, qs2) = items[0][:2], items[3][:2]  # NF4 40x64 and FP4 40x64, bf16: stacked by dense_cat
cat = K.dense_cat(p1, qs1, p2, qs2)
cat_compiled = torch.compile(lambda a, b: K.dense_cat(a, qs1, b, qs2), backend="aot_eager", fullgraph=True)(p1, p2)
tail = torch.arange(80 * 16, dtype=torch.float32).reshape(80, 16).to(torch.bfloat16)  # LoraPair's scale-B columns
aug = K.dense_cat(p1, qs1, p2, qs2, tail)  # the strided form of the kernel: rows of 64 values, 80 apart
aug_compiled = torch.compile(lambda a, b, t: K.dense_cat(a, qs1, b, qs2, t), backend="aot_eager", fullgraph=True)(p1, p2, tail)
torch.save((outs, compiled, cat, cat_compiled, tail, aug, aug_compiled), sys.argv[2])
"""


def _case_id(c):
    shape, nested, qt, bs, dt, storage, bpp, mod = c
    return (f"{shape[0]}x{shape[1]}-{qt}-{'dq' if nested else 'nodq'}-bs{bs}-{str(dt)[6:]}"
            f"{'-st' + str(storage)[6:] if storage != torch.uint8 else ''}{'-bpp' + str(bpp) if bpp else ''}"
            f"{'-' + mod if mod else ''}")


def _quantize(case, seed, device="cpu"):
    import bitsandbytes.functional as F

    shape, nested, qt, bs, dt, storage, _, mod = case
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.05)
    w[0, :3] = torch.tensor([0.0, 1e-30, -3.0])  # a zero, a tiny and a large value in the first block
    w = w.to(device=device, dtype=dt)
    packed, qs = F.quantize_4bit(w, blocksize=bs, compress_statistics=nested, quant_type=qt, quant_storage=storage)
    if mod == "ties":  # low bits 0x8000 (bf16 tie) or 0x1000 (fp16 tie), the bit above alternating by block
        low = 0x8000 if dt == torch.bfloat16 else 0x1000
        bits = qs.absmax.view(torch.int32) & ~(4 * low - 1)
        alt = (torch.arange(bits.numel(), device=bits.device, dtype=torch.int32) % 2) * (2 * low)
        qs.absmax = (bits | low | alt).view(torch.float32)
    elif mod and mod.startswith("tiny"):  # every other block (or 2nd-level block) tiny: subnormal products
        target = qs.state2 if nested else qs
        tiny = torch.tensor([1e-39, 1e-37, 3e-38, 2e-36], device=target.absmax.device)
        idx = torch.arange(0, target.absmax.numel(), 2, device=target.absmax.device)
        target.absmax[idx] = tiny[torch.arange(idx.numel(), device=idx.device) % 4]
        if nested:
            qs.offset = torch.zeros_like(qs.offset)  # so that the flushed zero reaches the 4-bit products
    return packed, qs


def _bnb_cpu_kernel_is_flat(shape, blocksize):
    """Whether bitsandbytes runs its C++ CPU kernel here and that kernel indexes blocks over the flat element
    index (block sizes >= 2048 go to its torch.compile fallback on AVX512 CPUs: run that eagerly instead)."""
    n = shape[-1]
    return n % 2 == 0 and (n % 16 != 0 or n % blocksize == 0) and blocksize < 2048


def _reference_cpu(packed, qs, ftz=False):
    """bitsandbytes' own CPU dequantize (see the module docstring for when it is its torch implementation).
    ftz: bitsandbytes' CUDA arithmetic instead, built from its CPU ops: the absmax product and the 4-bit
    products flushed when subnormal, the offset added unflushed (the CUDA library flushes, torch's add not)."""
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    flat = _bnb_cpu_kernel_is_flat(qs.shape, qs.blocksize)
    if flat and not ftz:
        return F.dequantize_4bit(packed, qs), False
    absmax = qs.absmax
    if qs.nested:  # what functional.dequantize_4bit does before its kernel
        absmax = F.dequantize_blockwise(qs.absmax, qs.state2)
        absmax = (_flush_subnormals(absmax) if ftz else absmax) + qs.offset
    # with ftz: the fp32 products (no conversion of the CPU library's own), flushed, then rounded by torch
    dtype = torch.float32 if ftz else qs.dtype
    if flat:
        out = torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax, qs.blocksize, qs.quant_type,
                                                              qs.shape, dtype)
    else:
        code = F.get_4bit_type(qs.quant_type, device="cpu")
        eager = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
        out = eager(packed.reshape(-1).view(torch.uint8), absmax, code, qs.blocksize, qs.shape, dtype)
    return (_flush_subnormals(out).to(qs.dtype) if ftz else out), not flat


def _flush_subnormals(t):
    """fp32 subnormals -> zeros of their sign (what mul.ftz gives)."""
    return torch.where(t.abs() < torch.finfo(torch.float32).tiny, torch.copysign(torch.zeros_like(t), t), t)


def _bit_mismatches(got, ref, signed_zero_ok=False):
    diff = got.view(_INT[ref.dtype]) != ref.view(_INT[ref.dtype])
    if signed_zero_ok:
        diff &= ~((got == 0) & (ref == 0))
    return int(diff.sum())


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Every CASE quantized here, dequantized by the kernel under the interpreter (one subprocess)."""
    pytest.importorskip("triton")
    tmp = tmp_path_factory.mktemp("nf4")
    items = [(*_quantize(c, seed=i), c[6], c[7] == "tiny-ftz") for i, c in enumerate(CASES)]  # all: indices
    return items, run_interpreted(_RUNNER, items, tmp)


def run_interpreted(runner: str, inputs, tmp, unset=()):
    """Run `runner` (Python source reading argv[1], writing argv[2] with torch.save) in a subprocess under Triton's
    interpreter (TRITON_INTERPRET must be set before Triton is imported: a subprocess keeps it from the other tests),
    on the CPU, with `inputs` saved for it and the environment variables in `unset` removed; returns what it saved.
    Shared by tests/test_ce_triton.py."""
    torch.save(inputs, tmp / "in.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    for name in unset:
        env.pop(name, None)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", runner, str(tmp / "in.pt"), str(tmp / "out.pt")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(tmp / "out.pt")


# "tiny" (subnormal products, no flush) is GPU-only: bitsandbytes' CPU library rounds subnormals differently by
# CPU feature (its AVX512-BF16 conversion treats them as zero), and CUDA tensors always take the flush.
CPU_CASES = [i for i, c in enumerate(CASES) if c[7] != "tiny"]


@pytest.mark.parametrize("index", CPU_CASES, ids=[_case_id(CASES[i]) for i in CPU_CASES])
def test_interpreted_kernel_equals_bitsandbytes_bit_for_bit(interpreted, index):
    items, (outs, *_) = interpreted
    packed, qs, _, ftz = items[index]
    ref, _ = _reference_cpu(packed, qs, ftz=ftz)
    got = outs[index]
    assert got.shape == ref.shape == tuple(qs.shape) and got.dtype == ref.dtype == qs.dtype
    assert torch.isfinite(ref).all() and ref.abs().max() > 0  # a real weight, not zeros
    assert torch.equal(got, ref)
    assert _bit_mismatches(got, ref, signed_zero_ok=qs.quant_type == "fp4") == 0


def test_compiled_custom_op_equals_eager(interpreted):
    items, (outs, compiled, *_) = interpreted
    assert items[0][1].nested and torch.equal(compiled.view(torch.int16), outs[0].view(torch.int16))


def test_dense_cat_stacks_two_weights_bit_for_bit_eager_and_compiled(interpreted):
    """lora.dense_pair's kernel path: two 4-bit weights (here NF4 over FP4) dequantized into one tensor's rows,
    equal to each one's own dequantize; the compiled form is one op (tunelab::dequantize_4bit_stack), no break."""
    items, (outs, _, cat, cat_compiled, *_) = interpreted
    assert CASES[0][2] == "nf4" and CASES[3][2] == "fp4" and CASES[0][0] == CASES[3][0]
    want = torch.cat([outs[0], outs[3]])
    assert cat.shape == (80, 64) and torch.equal(cat.view(torch.int16), want.view(torch.int16))
    assert torch.equal(cat_compiled.view(torch.int16), want.view(torch.int16))


def test_dense_cat_with_a_tail_writes_the_rows_strided_bit_for_bit(interpreted):
    """LoraPair's augmented weight: the two dequantized weights in the left columns of a wider buffer (the kernel's
    strided store), the tail to their right, eager and as the compiled op."""
    items, (outs, _, _, _, tail, aug, aug_compiled) = interpreted
    want = torch.cat([torch.cat([outs[0], outs[3]]), tail], dim=1)
    assert aug.shape == (80, 80) and aug.is_contiguous()
    assert torch.equal(aug.view(torch.int16), want.view(torch.int16))
    assert torch.equal(aug_compiled.view(torch.int16), want.view(torch.int16))


# ---------------------------------------------- strided stores (per block / per element), table gather, dense_stack

# (case, bytes_per_program, left, right, kwargs, the launch's BPR: blocks per row for the per-block store, 0 for the
# per-element one): the kernel writes into columns [left, left + cols) of a NaN-filled [rows, left + cols + right]
# buffer
_Q = lambda shape, nested, qt, bs, dt, mod=None: (shape, nested, qt, bs, dt, torch.uint8, None, mod)  # noqa: E731
STRIDED = [
    (_Q((99, 128), True, "nf4", 64, torch.bfloat16), 256, 0, 16, dict(block_rows=True), 2),  # 25 tiles of 8
    # blocks, the last one 6
    (_Q((99, 128), True, "nf4", 64, torch.float16), 256, 8, 8, dict(element_tile=True, block_rows=True), 2),  # a
    # column offset
    (_Q((5, 12288), True, "nf4", 4096, torch.bfloat16), 4096, 0, 32, dict(block_rows=True), 3),  # 2-block tiles,
    # the last one 1 block
    (_Q((99, 128), True, "nf4", 64, torch.bfloat16), 256, 0, 16, dict(block_rows=False), 0),  # per element
    (_Q((99, 128), False, "fp4", 128, torch.float32), 512, 4, 12, dict(table_gather=True), 1),  # the default: per
    # block (128 % 128 == 0), one block a row
    (_Q((33, 96), False, "fp4", 64, torch.float32), None, 0, 16, {}, 0),  # 96 % 64: blocks cross rows
    (_Q((40, 160), True, "nf4", 64, torch.bfloat16), 128, 4, 4, dict(table_gather=True), 0),
    (_Q((40, 160), True, "nf4", 64, torch.float16), 128, 0, 8, dict(element_tile=True, table_gather=True), 0),
    (_Q((99, 192), True, "nf4", 64, torch.bfloat16), 512, 0, 8, {}, 3),  # the default: per block, 3 blocks a row,
    # tiles of 8 blocks crossing rows
]

# dense_stack: (parts as ("q", case) or ("d", shape, dtype), tail columns or 0)
STACKS = [
    ([("q", _Q((64, 128), True, "nf4", 64, torch.bfloat16)), ("q", _Q((16, 128), True, "nf4", 64, torch.bfloat16)),
      ("q", _Q((16, 128), False, "fp4", 128, torch.bfloat16))], 8),  # q, k, v with a tail (strided, per block)
    ([("q", _Q((24, 192), True, "nf4", 64, torch.bfloat16)), ("d", (8, 192), torch.float32)], 0),  # down over A
    ([("q", _Q((20, 96), True, "nf4", 64, torch.float16)), ("d", (4, 96), torch.bfloat16)], 16),  # per element
    ([("d", (5, 16), torch.bfloat16), ("d", (3, 16), torch.float32)], 4),  # all dense: the first part's dtype
]

_STACK_RUNNER = r"""
import sys, torch
from tunelab.model.fast import nf4_triton as K
assert K.interpreting(), "TRITON_INTERPRET did not reach triton"
d = torch.load(sys.argv[1], weights_only=False)
res = {}
# the table-gather form on every CASE (odd ones with the element tile)
res["gather"] = [K.dequantize_4bit(p, qs, bytes_per_program=bpp, ftz=ftz, element_tile=bool(i % 2), table_gather=True)
                 for i, (p, qs, bpp, ftz) in enumerate(d["cases"])]
kernel, flags = K.nf4_dequant_kernel, []
class Recorder:  # records each launch's BPR (hw_bf16 given: interpreting() looks at the kernel's type)
    def __getitem__(self, grid):
        def launch(*a, **kw):
            flags.append(kw["BPR"])
            return kernel[grid](*a, **kw)
        return launch
K.nf4_dequant_kernel = Recorder()
bufs = []
for p, qs, bpp, left, right, kw in d["strided"]:
    r, c = qs.shape
    buf = torch.full((r, left + c + right), float("nan"), dtype=qs.dtype)
    K.dequantize_4bit(p, qs, out=buf[:, left:left + c], bytes_per_program=bpp, hw_bf16=False, **kw)
    bufs.append(buf)
res["strided"], res["flags"] = bufs, flags
p, qs = d["strided"][5][:2]
try:  # the per-block store asked for where a block crosses a row end
    K.dequantize_4bit(p, qs, out=torch.empty(qs.shape[0], qs.shape[1] + 16, dtype=qs.dtype)[:, :qs.shape[1]],
                      block_rows=True)
    res["forced"] = None
except ValueError as e:
    res["forced"] = str(e)
K.nf4_dequant_kernel = kernel

def compiled(parts, tail):
    graphs = []
    def backend(gm, example_inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    qss = [qs for _, qs in parts]
    def fn(*ts):
        return K.dense_stack(list(zip(ts[:len(qss)], qss)), ts[len(qss)] if len(ts) > len(qss) else None)
    args = [w for w, _ in parts] + ([] if tail is None else [tail])
    return torch.compile(fn, backend=backend, fullgraph=True)(*args), graphs
res["stacks"] = [(K.dense_stack(parts, tail), *compiled(parts, tail)) for parts, tail in d["stacks"]]
torch.save(res, sys.argv[2])
"""


def _stack_inputs(spec, seed, device="cpu"):
    """(parts, tail) of dense_stack for a STACKS entry: 4-bit parts quantized by bitsandbytes, dense ones random."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for k, part in enumerate(spec[0]):
        if part[0] == "q":
            parts.append(_quantize(part[1], seed=seed + k, device=device))
        else:
            parts.append(((torch.randn(part[1], generator=g) * 0.1).to(device=device, dtype=part[2]), None))
    rows = sum((qs.shape if qs is not None else w.shape)[0] for w, qs in parts)
    dtype = next((qs.dtype for _, qs in parts if qs is not None), parts[0][0].dtype)
    tail = (torch.randn(rows, spec[1], generator=g).to(device=device, dtype=dtype) if spec[1] else None)
    return parts, tail


def _assert_reference_bits(got, packed, qs, ftz=False):
    """got: bit for bit bitsandbytes' CPU dequantize (for FP4 a zero's sign may differ, as in
    test_interpreted_kernel_equals_bitsandbytes_bit_for_bit: the CPU references' FP4 zero is +0.0)."""
    ref, _ = _reference_cpu(packed, qs, ftz=ftz)
    assert got.shape == ref.shape and got.dtype == ref.dtype and torch.isfinite(got).all() and torch.equal(got, ref)
    assert _bit_mismatches(got, ref, signed_zero_ok=qs.quant_type == "fp4") == 0


@pytest.fixture(scope="module")
def stacked(interpreted, tmp_path_factory):
    """The table-gather form on every CASE, the STRIDED stores and the STACKS (eager and compiled), one subprocess."""
    items, _ = interpreted
    strided = [(*_quantize(c, seed=200 + i), bpp, left, right, kw) for i, (c, bpp, left, right, kw, _) in
               enumerate(STRIDED)]
    stacks = [_stack_inputs(spec, seed=300 + 10 * i) for i, spec in enumerate(STACKS)]
    inputs = {"cases": items, "strided": strided, "stacks": stacks}
    return inputs, run_interpreted(_STACK_RUNNER, inputs, tmp_path_factory.mktemp("nf4stack"))


@pytest.mark.parametrize("index", CPU_CASES, ids=[_case_id(CASES[i]) for i in CPU_CASES])
def test_table_gather_form_equals_bitsandbytes_bit_for_bit(stacked, index):
    """TABLE_GATHER: the 16 products of a block rounded once and picked by nibble: the same bits (the ties and the
    flushed subnormal blocks included)."""
    inputs, res = stacked
    packed, qs, _, ftz = inputs["cases"][index]
    ref, _ = _reference_cpu(packed, qs, ftz=ftz)
    got = res["gather"][index]
    assert got.shape == ref.shape and torch.equal(got, ref)
    assert _bit_mismatches(got, ref, signed_zero_ok=qs.quant_type == "fp4") == 0


@pytest.mark.parametrize("index", range(len(STRIDED)), ids=[
    f"{_case_id(c)}-L{left}R{right}{''.join('-' + k for k in kw)}" for c, _, left, right, kw, _ in STRIDED])
def test_strided_store_into_a_wider_buffer_bit_for_bit(stacked, index):
    """The strided store (out = columns of a wider buffer): per block with the blocks per row as the kernel's
    constant where the row length is a multiple of the block size (by default or asked: several tiles, tiles across
    rows, a partial last one, blocks of 64, 128 and 4096), per element where it is not or block_rows=False;
    every value bit for bit bitsandbytes', the buffer's other columns untouched."""
    inputs, res = stacked
    packed, qs, _, left, right, _ = inputs["strided"][index]
    assert res["flags"][index] == STRIDED[index][5]  # the store form the launch chose
    buf = res["strided"][index]
    cols = qs.shape[1]
    _assert_reference_bits(buf[:, left:left + cols].contiguous(), packed, qs)
    assert torch.isnan(buf[:, :left]).all() and torch.isnan(buf[:, left + cols:]).all()


def test_per_block_store_refused_where_blocks_cross_rows(stacked):
    _, res = stacked
    assert res["forced"] and "multiple of the block size" in res["forced"]


def test_strided_forms_agree():
    """The per-block and the per-element stores of STRIDED's first case are the same case."""
    assert STRIDED[0][:4] == STRIDED[3][:4] and (STRIDED[0][4], STRIDED[3][4]) == (dict(block_rows=True), dict(block_rows=False))


@pytest.mark.parametrize("index", range(len(STACKS)), ids=["qkv-tail", "below", "below-tail-per-element", "dense"])
def test_dense_stack_eager_and_compiled_bit_for_bit(stacked, index):
    """dense_stack: each 4-bit part equal to bitsandbytes' dequantize in its rows, dense parts cast and copied,
    the tail to the right; compiled (aot_eager, fullgraph) it is one op, tunelab::dequantize_4bit_stack, with the
    same bits."""
    inputs, res = stacked
    parts, tail = inputs["stacks"][index]
    eager, comp, graphs = res["stacks"][index]
    dtype = next((qs.dtype for _, qs in parts if qs is not None), parts[0][0].dtype)
    rows = [(qs.shape if qs is not None else w.shape)[0] for w, qs in parts]
    cols = (parts[0][1].shape if parts[0][1] is not None else parts[0][0].shape)[1]
    assert eager.shape == (sum(rows), cols + (0 if tail is None else tail.shape[1])) and eager.dtype == dtype
    assert eager.is_contiguous()
    r0 = 0
    for (w, qs), r in zip(parts, rows):
        block = eager[r0:r0 + r, :cols].contiguous()
        if qs is None:
            assert torch.equal(block, w.to(dtype))
        else:
            _assert_reference_bits(block, w, qs)
        r0 += r
    if tail is not None:
        assert torch.equal(eager[:, cols:], tail)
    assert torch.equal(comp.view(_INT[dtype]), eager.view(_INT[dtype]))
    assert len(graphs) == 1 and graphs[0].count("tunelab.dequantize_4bit_stack.default") == 1, graphs
    assert all("tunelab" not in t or t == "tunelab.dequantize_4bit_stack.default" for t in graphs[0]), graphs


def test_dense_stack_refuses_mismatched_parts():
    from tunelab.model.fast import nf4_triton as K

    a = _quantize(_Q((16, 128), True, "nf4", 64, torch.bfloat16), seed=1)
    b = _quantize(_Q((8, 64), True, "nf4", 64, torch.bfloat16), seed=2)
    h = _quantize(_Q((8, 128), True, "nf4", 64, torch.float16), seed=3)
    cases = [
        (([a, b],), "one column count"),
        (([a, (torch.zeros(4, 64), None)],), "one column count"),
        (([a, h],), "need one dtype"),
        (([a, a], torch.zeros(31, 4, dtype=torch.bfloat16)), "tail must be [32, t]"),
        (([a], torch.zeros(16, 4, dtype=torch.float32)), "of torch.bfloat16"),
        (([a], torch.zeros(16, dtype=torch.bfloat16)), "tail must be"),
        (([(torch.zeros(4, 8), None)], torch.zeros(4, 2, dtype=torch.bfloat16)), "of torch.float32"),
        (([(torch.zeros(8), None)],), "not 2-D"),
        (([],), "at least one part"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=__import__("re").escape(msg)):
            K.dense_stack(*args)
    with pytest.raises(ValueError, match="one column count"):
        K.dense_cat(*a, *b)


def test_tables_are_bitsandbytes_code_tables():
    import bitsandbytes.functional as F

    from tunelab.model.fast import nf4_triton as K

    for qt, table in (("nf4", K.NF4_TABLE), ("fp4", K.FP4_TABLE)):
        ours = torch.tensor(table, dtype=torch.float32)
        theirs = F.get_4bit_type(qt, device="cpu")
        assert torch.equal(ours, theirs)  # FP4's -0.0 at index 8 equals its +0.0 as a value
    assert torch.tensor(K.FP4_TABLE)[8].item() == 0.0 and str(torch.tensor(K.FP4_TABLE)[8].item()) == "-0.0"


def test_bnb_cpu_kernel_row_indexing_is_why_the_reference_switches():
    """Documents the reason for _reference_cpu's switch: on an AVX512 CPU, bitsandbytes' C++ kernel reads a
    row-wise absmax for rows of 96 at block size 64, which is not what its quantizer wrote (flat blocks)."""
    import bitsandbytes.functional as F
    from bitsandbytes.backends.cpu.ops import _has_avx512

    case = ((64, 96), True, "nf4", 64, torch.bfloat16, torch.uint8, None, None)
    packed, qs = _quantize(case, seed=0)
    flat, _ = _reference_cpu(packed, qs)
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * 0.05
    w[0, :3] = torch.tensor([0.0, 1e-30, -3.0])
    flat_err = (flat.float() - w.bfloat16().float()).abs()[1:].mean().item()
    assert flat_err < 0.01  # the flat reading inverts the quantizer (rows 1.. : away from the -3.0 block)
    if _has_avx512:
        row_err = (F.dequantize_4bit(packed, qs).float() - w.bfloat16().float()).abs()[1:].mean().item()
        assert row_err > 2 * flat_err


def test_selection_flags(monkeypatch):
    from tunelab.model.fast import nf4_triton as K

    case = ((40, 64), True, "nf4", 64, torch.bfloat16, torch.uint8, None, None)
    packed, qs = _quantize(case, seed=0)
    monkeypatch.setenv("TUNELAB_NF4_TRITON", "1")
    assert not K.enabled_for(packed, qs)  # a CPU tensor: bitsandbytes' path
    fake_cuda = type("T", (), {"is_cuda": True})()
    assert K.enabled_for(fake_cuda, qs) == (K.triton is not None)
    monkeypatch.setenv("TUNELAB_NF4_TRITON", "0")
    assert not K.enabled_for(fake_cuda, qs)
    monkeypatch.delenv("TUNELAB_NF4_TRITON")
    assert K.enabled_for(fake_cuda, qs) == (K.DEFAULT_ON and K.triton is not None)
    monkeypatch.setenv("TUNELAB_NF4_TRITON", "1")
    qs_bad = type("Q", (), {"quant_type": "int4", "dtype": torch.bfloat16, "blocksize": 64, "nested": False})()
    assert not K.enabled_for(fake_cuda, qs_bad)


def test_dense_weight_on_cpu_keeps_bitsandbytes_path(monkeypatch):
    from tunelab.model.fast.lora import dense_weight, reference_dense_weight

    monkeypatch.setenv("TUNELAB_NF4_TRITON", "1")
    packed, qs = _quantize(((40, 64), True, "nf4", 64, torch.bfloat16, torch.bfloat16, None, None), seed=2)
    assert torch.equal(dense_weight(packed, qs, torch.bfloat16), reference_dense_weight(packed, qs, torch.bfloat16))


# ---------------------------------------------------------------- GPU (bitsandbytes' CUDA kernels as reference)

_GPU_7B = [(3584, 3584), (512, 3584), (18944, 3584), (3584, 18944)]  # q/o, k/v, gate/up, down ([out, in])


def _gpu_check(case, seed, **kw):
    import bitsandbytes.functional as F

    from tunelab.model.fast import nf4_triton as K

    packed, qs = _quantize(case, seed, device="cuda")
    ref = F.dequantize_4bit(packed, qs)
    out = torch.full(tuple(qs.shape), float("nan"), dtype=qs.dtype, device="cuda")  # poisoned: all written?
    got = K.dequantize_4bit(packed, qs, out=out, **kw)
    torch.cuda.synchronize()
    assert got.data_ptr() == out.data_ptr() and torch.isfinite(got).all()
    assert torch.equal(got, ref) and _bit_mismatches(got, ref) == 0, _case_id(case)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("form", [(True, False), (False, False), (True, True)], ids=["hw", "intround", "hw-elem"])
@pytest.mark.parametrize("shape", _GPU_7B, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gpu_7b_shapes_equal_bitsandbytes(shape, form):
    _gpu_check((shape, True, "nf4", 64, torch.bfloat16, torch.bfloat16, None, None), seed=shape[0],
               hw_bf16=form[0], element_tile=form[1])


# on the GPU: every special case, and the main grid on one shape (each new shape can be another compilation)
GPU_CASES = [i for i, c in enumerate(CASES) if c[0] == (7, 31) or i >= 12 * len(_SHAPES)]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("index", GPU_CASES, ids=[_case_id(CASES[i]) for i in GPU_CASES])
def test_gpu_small_cases_equal_bitsandbytes(index):
    _gpu_check(CASES[index], seed=100 + index, bytes_per_program=CASES[index][6], element_tile=bool(index % 2))


@gpu
@pytest.mark.gpu
def test_gpu_dense_weight_compiled_uses_custom_op(monkeypatch):
    import bitsandbytes.functional as F

    from tunelab.model.fast import lora

    packed, qs = _quantize(((512, 3584), True, "nf4", 64, torch.bfloat16, torch.bfloat16, None, None), 9, "cuda")
    monkeypatch.setenv("TUNELAB_NF4_TRITON", "1")
    fn = torch.compile(lambda w: lora.dense_weight(w, qs, torch.bfloat16), backend="aot_eager", fullgraph=True)
    got = fn(packed)
    assert torch.equal(got.view(torch.int16), F.dequantize_4bit(packed, qs).view(torch.int16))


@gpu
@pytest.mark.gpu
def test_gpu_dense_weight_uses_kernel_and_matches(monkeypatch):
    import bitsandbytes.functional as F

    from tunelab.model.fast import lora, nf4_triton as K

    packed, qs = _quantize(((3584, 3584), True, "nf4", 64, torch.bfloat16, torch.bfloat16, None, None), 7, "cuda")
    calls = []
    real = K.dequantize_4bit
    monkeypatch.setattr(K, "dequantize_4bit", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("TUNELAB_NF4_TRITON", "1")
    got = lora.dense_weight(packed, qs, torch.bfloat16)
    assert calls == [1]
    monkeypatch.setenv("TUNELAB_NF4_TRITON", "0")
    base = lora.dense_weight(packed, qs, torch.bfloat16)
    assert calls == [1]
    assert torch.equal(got.view(torch.int16), base.view(torch.int16))
    assert torch.equal(got.view(torch.int16), F.dequantize_4bit(packed, qs).view(torch.int16))
