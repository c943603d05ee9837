"""tunelab.model.fast.decode_attn (split-K decode attention, the TUNELAB_DECODE_ATTN lever) against its references.

CPU: the kernels run under Triton's interpreter in a subprocess (TRITON_INTERPRET must be set before triton is
imported; the subprocess keeps it from the rest of this pytest process), over grouped-query shapes, strided cache
views (the slot decoder's `[:rows, :, :width]` slices), per-row masks, no mask, head_dim not a power of two,
splits that do not divide the positions, a batch-1 broadcast mask; and the slot decoder on a tiny bf16 model with
the lever on against the same decoder with SDPA's attention: the same greedy tokens, logits within bf16 noise.
Tolerances: with a float32 output the kernel is the float32 reference to 2e-6 with fp16 inputs and 3e-5 with
bf16 (P V uses P split into two 16-bit parts: 22 of its bits kept in fp16, 16 in bf16, whose interpreted casts
truncate); in 16 bits within one unit in the last place of the reference plus that (the interpreter's float32 ->
16-bit cast truncates, the GPU's rounds to nearest; values near zero are sums that cancel, where the float32
tolerance is many units).
GPU (marked gpu): Qwen2.5-7B's attention shapes (28 query / 4 key-value heads, head_dim 128) at batch 1 and 32
over 256 / 512 / 4096 cached positions, bf16 and fp16, inside a captured CUDA graph and through torch.compile.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# (rows, query heads, kv heads, width, head_dim, dtype, mask kind)
CASES = [
    (1, 28, 4, 64, 128, torch.bfloat16, "rows"),   # Qwen2.5-7B's grouping, one row
    (3, 8, 2, 100, 64, torch.float16, "rows"),     # 100 positions: a partial last block
    (2, 4, 4, 40, 32, torch.bfloat16, None),       # no grouping, no mask
    (2, 6, 2, 33, 80, torch.bfloat16, "rows"),     # head_dim 80 (padded to 128 in the kernel)
    (4, 16, 2, 200, 64, torch.float16, "holes"),   # an arbitrary boolean mask (holes inside the attended range)
    (3, 4, 1, 50, 16, torch.bfloat16, "one"),      # a [1, 1, 1, w] mask broadcast over the rows
]

_RUNNER = r"""
import sys, torch
from tunelab.model.fast import decode_attn as K
assert K.interpreting(), "TRITON_INTERPRET did not reach triton"
items = torch.load(sys.argv[1], weights_only=False)
outs = []
for q, k, v, mask, scale in items:
    outs.append((K.decode_attention(q, k, v, mask, scale), K._run(q, k, v, mask, scale, out_dtype=torch.float32)))
q, k, v, mask, scale = items[0]  # the custom op that torch.compile sees (fullgraph: no graph break)
compiled = torch.compile(lambda a, b, c, m: K.decode_attention(a, b, c, m, scale), backend="aot_eager", fullgraph=True)(q, k, v, mask)
torch.save((outs, compiled), sys.argv[2])
"""


def _inputs(case, seed):
    b, h, kv, w, d, dt, kind = case
    g = torch.Generator().manual_seed(seed)
    # cache buffers with more rows and positions than the step uses: the kernel reads strided slices of them
    ck = torch.randn(b + 2, kv, w + 9, d, generator=g).to(dt)
    cv = torch.randn(b + 2, kv, w + 9, d, generator=g).to(dt)
    q = (torch.randn(b, h, 1, d, generator=g) * 2).to(dt)
    mask = None
    if kind == "rows":  # the decoder's mask: each row attends to its positions 0..pos
        pos = torch.randint(0, w, (b, 1), generator=g)
        pos[0] = w - 1
        mask = (torch.arange(w).view(1, w) <= pos).view(b, 1, 1, w)
    elif kind == "holes":
        mask = torch.rand(b, 1, 1, w, generator=g) < 0.6
        mask[..., 0] = True
    elif kind == "one":
        mask = (torch.arange(w) < w // 2).view(1, 1, 1, w)
    return q, ck[:b, :, :w], cv[:b, :, :w], mask, 1.0 / (d ** 0.5)


_TOL = {torch.float16: 2e-6, torch.bfloat16: 3e-5}  # the float32 output's tolerance (module docstring)


def _ulp(t):
    """One unit in the last place of each value of t (its dtype)."""
    bits = {torch.bfloat16: 8, torch.float16: 11}[t.dtype]
    a = t.float().abs().clamp_min(torch.finfo(t.dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(a)) - (bits - 1))


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    pytest.importorskip("triton")
    tmp = tmp_path_factory.mktemp("dattn")
    items = [_inputs(c, i) for i, c in enumerate(CASES)]
    torch.save(items, tmp / "in.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _RUNNER, str(tmp / "in.pt"), str(tmp / "out.pt")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return items, torch.load(tmp / "out.pt")


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"b{c[0]}-h{c[1]}-kv{c[2]}-w{c[3]}-d{c[4]}-{str(c[5])[6:]}-{c[6]}" for c in CASES])
def test_interpreted_kernel_equals_the_reference(interpreted, index):
    from tunelab.model.fast.decode_attn import reference

    items, (outs, _) = interpreted
    q, k, v, mask, scale = items[index]
    got, got32 = outs[index]
    b, h, _, d = q.shape
    assert got.shape == got32.shape == (b, 1, h, d) and got.dtype == q.dtype and got32.dtype == torch.float32
    want32 = reference(q.float(), k.float(), v.float(), mask, scale)  # float32 all through
    assert torch.isfinite(want32).all() and want32.abs().max() > 0.05
    tol = _TOL[q.dtype]
    torch.testing.assert_close(got32, want32, rtol=tol, atol=tol)
    assert ((got.float() - want32).abs() <= _ulp(want32.to(q.dtype)) + tol).all()
    # the SDPA the decoder used before (keys/values repeated per query head): the same function
    rep = h // k.shape[1]
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1),
                                                            attn_mask=mask, scale=scale).transpose(1, 2)
    torch.testing.assert_close(got32, sdpa, rtol=2 * tol + 1e-5, atol=2 * tol + 1e-5)


def test_compiled_custom_op_equals_eager(interpreted):
    items, (outs, compiled) = interpreted
    assert torch.equal(compiled, outs[0][0])


def test_splits_fill_the_gpu_and_cover_every_position():
    from tunelab.model.fast.decode_attn import BLOCK_N, splits_for

    assert splits_for(1, 4, 512) == (16, 1)  # batch 1: every 32-position block its own program (64 programs)
    assert splits_for(32, 4, 512) == (3, 6)  # batch 32: 128 programs x 3 splits of 6 blocks (the last one 4)
    assert splits_for(1, 4, 4096) == (64, 2)  # capped at 64 splits
    for rows, kv, width in [(1, 4, 33), (2, 8, 4096), (7, 2, 1000), (256, 8, 256)]:
        splits, per = splits_for(rows, kv, width)
        assert splits * per * BLOCK_N >= width > (splits - 1) * per * BLOCK_N  # every position, no empty split


def test_unsupported_inputs_are_refused():
    from tunelab.model.fast import decode_attn as K

    q, k = torch.zeros(1, 8, 1, 16, dtype=torch.bfloat16), torch.zeros(1, 2, 4, 16, dtype=torch.bfloat16)
    assert not K.supported(q, k)  # CPU tensors outside the interpreter: the decoder keeps SDPA
    with pytest.raises(TypeError, match="boolean mask"):
        K.decode_attention(q, k, k, torch.zeros(1, 1, 1, 4), 0.25)


_DECODER_RUNNER = r"""
import os, sys, torch
from tunelab.model.tiny import build_tiny_model
from transformers import AutoModelForCausalLM
from tunelab.infer.decoder import SlotDecoder
from tunelab.model.fast import decode_attn
assert decode_attn.interpreting()
model = AutoModelForCausalLM.from_pretrained(build_tiny_model(sys.argv[1]), dtype=torch.bfloat16, attn_implementation="sdpa")
prompts = [[100 + i for i in range(7)], [300 + i for i in range(11)], [5, 6, 7]]
calls = []
real = decode_attn.decode_attention
def counted(*a, **k):
    calls.append(a[1].shape[2])
    return real(*a, **k)
decode_attn.decode_attention = counted
def run(kernel):
    os.environ["TUNELAB_DECODE_ATTN"] = "1" if kernel else "0"
    dec = SlotDecoder(model, max_slots=4, max_len=64)
    assert dec.pack_gqa and dec.decode_kernel == kernel
    toks, logs = {}, {}
    with torch.inference_mode():
        logits = {i: dec.prefill(i, p) for i, p in enumerate(prompts)}
        while logits:
            for s, lg in logits.items():
                toks.setdefault(s, []).append(int(lg.argmax()))
                logs.setdefault(s, []).append(lg)
                if len(toks[s]) == 6:
                    dec.release(s)
            logits = dec.step({s: toks[s][-1] for s in dec.lengths})
    return toks, logs
base = run(False)
n_base = len(calls)
fast = run(True)
torch.save((base, fast, n_base, calls), sys.argv[2])
"""


def test_slot_decoder_with_the_kernel_keeps_the_greedy_tokens(tmp_path):
    """The lever on a tiny bf16 Qwen2 (2 layers, 4 query / 2 key-value heads), three prompts decoded together:
    the kernel runs in every decode step's attention (2 layers x 5 steps) and the tokens stay SDPA's."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", "TUNELAB_PACK_GQA": "1"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _DECODER_RUNNER, str(tmp_path / "tiny"), str(tmp_path / "out.pt")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (base_toks, base_logs), (fast_toks, fast_logs), n_base, calls = torch.load(tmp_path / "out.pt")
    assert n_base == 0 and len(calls) == 2 * 5  # 5 decode steps after the prefills, 2 layers each
    assert fast_toks == base_toks and all(len(t) == 6 for t in fast_toks.values())
    for s in base_logs:
        for a, b in zip(base_logs[s], fast_logs[s]):
            assert (a - b).abs().max() < 0.05 * a.abs().max() + 1e-3


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_kernel_at_7b_shapes_in_graphs_and_compiled(dtype):
    from tunelab.model.fast.decode_attn import decode_attention, reference

    g = torch.Generator(device="cuda").manual_seed(0)
    for rows, width in [(1, 256), (1, 512), (32, 512), (4, 4096)]:
        ck = torch.randn(rows + 1, 4, width + 64, 128, device="cuda", dtype=dtype, generator=g)
        cv = torch.randn(rows + 1, 4, width + 64, 128, device="cuda", dtype=dtype, generator=g)
        k, v = ck[:rows, :, :width], cv[:rows, :, :width]
        q = torch.randn(rows, 28, 1, 128, device="cuda", dtype=dtype, generator=g)
        pos = torch.randint(0, width, (rows, 1), device="cuda", generator=g)
        mask = (torch.arange(width, device="cuda").view(1, width) <= pos).view(rows, 1, 1, width)
        want = reference(q.float(), k.float(), v.float(), mask, 128 ** -0.5)
        got = decode_attention(q, k, v, mask, 128 ** -0.5)
        assert ((got.float() - want).abs() <= _ulp(want.to(dtype)) + _TOL[dtype]).all(), (rows, width)
        graph = torch.cuda.CUDAGraph()  # captured, then replayed on new queries written in place
        decode_attention(q, k, v, mask, 128 ** -0.5)
        with torch.cuda.graph(graph):
            out = decode_attention(q, k, v, mask, 128 ** -0.5)
        q.copy_(torch.randn(q.shape, device="cuda", dtype=dtype, generator=g))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, decode_attention(q, k, v, mask, 128 ** -0.5))
        compiled = torch.compile(lambda a, b, c, m: decode_attention(a, b, c, m, 128 ** -0.5), fullgraph=True, dynamic=True)
        assert torch.equal(compiled(q, k, v, mask), out)
