"""tunelab.model.fast.ce_triton (each row's cross-entropy and its gradient in one Triton kernel) against torch.

CPU: the kernel runs under Triton's interpreter in a subprocess (TRITON_INTERPRET must be set before Triton is
imported; a subprocess keeps it from the other tests), both directly (each row's loss against
F.cross_entropy(reduction="none"), the gradient written in place against softmax - onehot) and inside the fused
linear cross-entropy (loss, grad hidden and grad weight against the torch path of the same function, several
chunks with a partial one). Vocabularies of 301 (one partial block) and 9,000 (three blocks, the last partial).
Tolerances: fp32 loss 1e-6 relative, fp32 gradients 1e-6 absolute (softmax entries are <= 1); bf16 gradients
one bf16 rounding (the interpreter's float -> bf16 cast truncates where the GPU rounds to nearest).
GPU (marked gpu): the same at Qwen2.5's vocabulary in bf16 against the torch path.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_nf4_triton import run_interpreted

from tunelab.model import kernels

_RUNNER = r"""
import sys, torch
from tunelab.model import kernels
from tunelab.model.fast import ce_triton
assert ce_triton.interpreting(), "TRITON_INTERPRET did not reach triton"
cases = torch.load(sys.argv[1])
out = []
kernels._chunk_rows = lambda vocab, **kw: 7  # several chunks, the last one partial
for logits, targets, hidden, weight, labels in cases:
    lg = logits.clone()
    assert ce_triton.enabled_for(lg)
    rows = ce_triton.cross_entropy_rows(lg, targets, write_grad=True)
    rows_only = ce_triton.cross_entropy_rows(logits.clone(), targets, write_grad=False)
    h = hidden.clone().requires_grad_(True); w = weight.clone().requires_grad_(True)
    loss = kernels.fused_linear_cross_entropy(h, w, labels)
    gh, gw = torch.autograd.grad(loss * 3.0, (h, w))
    out.append((rows, lg, rows_only, loss.detach(), gh, gw))
torch.save(out, sys.argv[2])
"""

CASES = [(torch.float32, 301), (torch.float32, 9000), (torch.bfloat16, 301), (torch.bfloat16, 9000)]


def _case(dtype, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(11, vocab, generator=g) * 4).to(dtype)
    targets = torch.randint(0, vocab, (11,), generator=g)
    targets[0] = vocab - 1  # the last entry of the last, partial block
    hidden = torch.randn(3, 17, 32, generator=g).to(dtype)
    weight = (torch.randn(vocab, 32, generator=g) / 4).to(dtype)
    labels = torch.randint(0, vocab, (3, 17), generator=g)
    labels[0, :5] = -100  # a masked prompt
    labels[2, 10:] = -100
    return logits, targets, hidden, weight, labels


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    pytest.importorskip("triton")
    tmp = tmp_path_factory.mktemp("ce")
    cases = [_case(d, v, i) for i, (d, v) in enumerate(CASES)]
    return cases, run_interpreted(_RUNNER, cases, tmp, unset=("TUNELAB_CE_TRITON",))


def _ulp_bound(ref):  # one rounding of ref's dtype (bf16: 8 bits of mantissa), plus the smallest normal
    eps = 2.0 ** -7 if ref.dtype == torch.bfloat16 else 1e-6
    return eps * ref.float().abs() + (1e-30 if ref.dtype == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{str(d)[6:]}-V{v}" for d, v in CASES])
def test_rows_kernel_equals_torch_cross_entropy(interpreted, index):
    cases, outs = interpreted
    logits, targets, *_ = cases[index]
    rows, grad, rows_only, *_ = outs[index]
    ref = F.cross_entropy(logits.float(), targets, reduction="none")
    assert rows.dtype == torch.float32 and rows.shape == (11,)
    assert torch.allclose(rows, ref, rtol=1e-6, atol=0) and torch.equal(rows, rows_only)
    want = torch.softmax(logits.float(), dim=-1)
    want[torch.arange(11), targets] -= 1.0
    assert grad.dtype == logits.dtype
    assert ((grad.float() - want).abs() <= _ulp_bound(want.to(logits.dtype))).all()
    assert (grad.float()[torch.arange(11), targets] < 0).all()  # the -1 landed on each target


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{str(d)[6:]}-V{v}" for d, v in CASES])
def test_fused_loss_with_the_kernel_equals_the_torch_path(interpreted, index, monkeypatch):
    cases, outs = interpreted
    _, _, hidden, weight, labels = cases[index]
    *_, loss, gh, gw = outs[index]
    monkeypatch.setattr(kernels, "_chunk_rows", lambda vocab, **kw: 7)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref = kernels.fused_linear_cross_entropy(h, w, labels)  # no CUDA, not interpreted here: the torch path
    rh, rw = torch.autograd.grad(ref * 3.0, (h, w))
    assert torch.allclose(loss.float(), ref.float(), rtol=1e-6 if hidden.dtype == torch.float32 else 1e-5)
    tol = 1e-5 if hidden.dtype == torch.float32 else 2e-2  # bf16 GEMMs over probabilities rounded apart
    assert (gh.float() - rh.float()).norm() <= tol * rh.float().norm()
    assert (gw.float() - rw.float()).norm() <= tol * rw.float().norm()


def test_switch_and_selection(monkeypatch):
    from tunelab.model.fast import ce_triton

    monkeypatch.setenv("TUNELAB_CE_TRITON", "0")
    assert not ce_triton.switched_on() and not ce_triton.enabled_for(torch.zeros(2, 3))
    monkeypatch.delenv("TUNELAB_CE_TRITON")
    assert ce_triton.switched_on()
    assert not ce_triton.enabled_for(torch.zeros(2, 3, dtype=torch.float64))
    if not ce_triton.interpreting():
        assert not ce_triton.enabled_for(torch.zeros(2, 3))  # a CPU tensor takes the torch path


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@pytest.mark.gpu
def test_gpu_qwen_vocabulary_bf16_equals_the_torch_path(monkeypatch):
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(2, 700, 896, device="cuda", generator=g).bfloat16()
    weight = (torch.randn(152064, 896, device="cuda", generator=g) / 30).bfloat16()
    labels = torch.randint(0, 152064, (2, 700), device="cuda", generator=g)
    labels[0, :100] = -100
    out = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("TUNELAB_CE_TRITON", flag)
        h = hidden.clone().requires_grad_(True)
        loss = kernels.fused_linear_cross_entropy(h, weight, labels)
        (gh,) = torch.autograd.grad(loss, h)
        out[flag] = (loss.float(), gh.float())
    assert torch.allclose(out["1"][0], out["0"][0], rtol=1e-5)
    assert (out["1"][1] - out["0"][1]).norm() <= 1e-2 * out["0"][1].norm()
