"""The fused linear cross-entropy equals torch's cross_entropy on full logits: loss and gradients."""
from __future__ import annotations

import torch

from tunelab.model import kernels
from tunelab.model.kernels import fused_linear_cross_entropy


def _reference(hidden, weight, labels, divisor=None):
    logits = hidden @ weight.t()  # float64 inputs: an exact reference
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    loss = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    return loss / (divisor if divisor is not None else (shift_labels != -100).sum())


def _inputs(seed, weight_grad=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 17, 32, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(301, 32, generator=g, dtype=torch.float64, requires_grad=weight_grad)
    labels = torch.randint(0, 301, (3, 17), generator=g)
    labels[0, :5] = -100  # a masked prompt
    labels[2, 10:] = -100
    return hidden, weight, labels


def test_loss_and_hidden_gradient_match_cross_entropy(monkeypatch):
    monkeypatch.setattr(kernels, "_chunk_rows", lambda vocab, **kw: 7)  # several chunks, one partial
    hidden, weight, labels = _inputs(0)
    loss = fused_linear_cross_entropy(hidden, weight, labels)
    (grad,) = torch.autograd.grad(loss * 3.0, hidden)
    h2 = hidden.detach().clone().requires_grad_(True)
    ref = _reference(h2, weight, labels)
    (ref_grad,) = torch.autograd.grad(ref * 3.0, h2)
    assert torch.allclose(loss, ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_num_items_in_batch_and_weight_gradient():
    hidden, weight, labels = _inputs(1, weight_grad=True)
    loss = fused_linear_cross_entropy(hidden, weight, labels, num_items_in_batch=torch.tensor(100))
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    h2, w2 = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    ref = _reference(h2, w2, labels, divisor=100.0)
    rh, rw = torch.autograd.grad(ref, (h2, w2))
    assert torch.allclose(loss, ref, rtol=1e-12)
    assert torch.allclose(gh, rh, rtol=1e-10, atol=1e-12)
    assert torch.allclose(gw, rw, rtol=1e-10, atol=1e-12)


def test_all_labels_masked_gives_zero_loss_with_a_graph():
    hidden, weight, labels = _inputs(2)
    labels[:] = -100
    loss = fused_linear_cross_entropy(hidden, weight, labels)
    assert loss.item() == 0.0 and loss.requires_grad
