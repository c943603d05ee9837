"""gate and up as one fused function (tunelab.model.fast.lora.LoraPair, installed by model/fast/group.py; opt-in
TUNELAB_GROUP_GATE_UP=1) against the two projections' torch reference, forward and backward, and a whole training
step grouped against ungrouped (with and without the split recompute). CPU: bitsandbytes' CPU backend for NF4.
Tolerances as tests/test_fast_lora.py's: fp32 1e-5 relative, bf16 1e-2 (one fp32 accumulation over both branches
of grad x, where separate projections round each first)."""
from __future__ import annotations

import pytest
import torch

from test_fast_lora import _lora, _nf4_layer, _rel
from test_fast_split import _peft, _stepper
from tunelab.model.fast import patch_lora_layers, unpatch_lora_layers
from tunelab.model.fast.group import group_gate_up, group_qkv
from tunelab.model.fast.lora import lora_group, lora_linear_reference, lora_pair
from tunelab.model.fast.offload import offload_checkpoints


def _pair_check(quantized: bool, dtype, tol, device="cpu"):
    torch.manual_seed(0)
    if quantized:
        l1, l2 = _nf4_layer(64, 96, device, dtype=dtype, seed=1), _nf4_layer(64, 80, device, dtype=dtype, seed=2)
        w1, qs1, w2, qs2 = l1.weight, l1.weight.quant_state, l2.weight, l2.weight.quant_state
        if device == "cuda":  # the kernel path of dense_pair (patch_lora_layers decides it per layer)
            from tunelab.model.fast import nf4_triton

            qs1.tunelab_triton = qs2.tunelab_triton = nf4_triton.enabled_for(w1, qs1)
            assert qs1.tunelab_triton
    else:
        w1, w2 = (torch.randn(96, 64) * 0.05).to(device, dtype), (torch.randn(80, 64) * 0.05).to(device, dtype)
        qs1 = qs2 = None
    a1, b1 = _lora(64, 96, 8, device, seed=3)
    a2, b2 = _lora(64, 80, 8, device, seed=4)
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(5)).to(device, dtype)
    grad = torch.randn(3, 7, 176, generator=torch.Generator().manual_seed(6)).to(device, dtype)

    def run(fused: bool):
        xs = x.clone().requires_grad_(True)
        params = [t.detach().clone().requires_grad_(True) for t in (a1, b1, a2, b2)]
        if fused:
            y = lora_pair(xs, (w1, qs1, None, params[0], params[1], 2.0, dtype),
                          (w2, qs2, None, params[2], params[3], 2.0, dtype))
        else:
            y = torch.cat([lora_linear_reference(xs, w1, qs1, None, params[0], params[1], 2.0, dtype),
                           lora_linear_reference(xs, w2, qs2, None, params[2], params[3], 2.0, dtype)], dim=-1)
        y.backward(grad)
        return [y.detach(), xs.grad] + [p.grad for p in params]

    for got, want in zip(run(True), run(False)):
        assert got.shape == want.shape and _rel(got, want) < tol


@pytest.mark.parametrize("pad", [8, 64])
@pytest.mark.parametrize("quantized", [True, False])
def test_pair_matches_the_two_projections_fp32(quantized, pad, monkeypatch):
    """Also with the augmented width padded to a multiple of 64 (TUNELAB_AUGMENT_PAD=64)."""
    from tunelab.model.fast import lora

    monkeypatch.setattr(lora, "AUGMENT_PAD", pad)
    _pair_check(quantized, torch.float32, 1e-5)


def test_the_augmented_input_is_padded_to_the_multiple_asked(monkeypatch):
    from tunelab.model.fast import lora

    x2, xa, bd = torch.ones(5, 64), torch.full((5, 16), 2.0), torch.full((30, 16), 3.0)
    for pad, width in ((8, 16), (64, 64)):
        monkeypatch.setattr(lora, "AUGMENT_PAD", pad)
        x_aug, tail = lora._augment(x2, xa, bd, 0.5)
        assert x_aug.shape == (5, 64 + width) and tail.shape == (30, width)
        assert torch.equal(x_aug[:, :64], x2) and torch.equal(x_aug[:, 64:80], xa) and not x_aug[:, 80:].any()
        assert torch.equal(tail[:, :16], bd * 0.5) and not tail[:, 16:].any()


@pytest.mark.parametrize("quantized", [True, False])
def test_pair_matches_the_two_projections_bf16(quantized):
    _pair_check(quantized, torch.bfloat16, 1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quantized", [True, False])
def test_pair_matches_the_two_projections_on_gpu(quantized, dtype):
    _pair_check(quantized, dtype, 1e-2, "cuda")


@pytest.mark.parametrize("split", [False, True])
def test_a_grouped_step_trains_like_the_ungrouped_one(split):
    plain, grouped = _peft("qwen2", quantized=True), _peft("qwen2", quantized=True)
    assert group_gate_up(grouped) == 2 and group_gate_up(grouped) == 0  # once per MLP
    for model in (plain, grouped):
        offload_checkpoints(model, split=split, split_min_tokens=0)
    loss_plain, grads_plain = _stepper(plain, "cpu")()
    loss, grads = _stepper(grouped, "cpu")()
    assert abs(loss - loss_plain) < 1e-3 * loss_plain
    for g, gp in zip(grads, grads_plain):
        assert (g - gp).norm() < 2e-2 * gp.norm()


def test_a_16_bit_pair_stays_two_projections():
    assert group_gate_up(_peft("qwen2")) == 0  # stacking two dense weights would copy both at each use


def test_outside_the_fused_case_the_mlp_runs_its_own_forward_and_ungroup_restores_it():
    model = _peft("qwen2", quantized=True)
    mlp = model.base_model.model.model.layers[0].mlp
    own = mlp.forward
    assert group_gate_up(model) == 2 and mlp.forward != own
    calls = []
    saved = mlp._tunelab_mlp_forward
    mlp._tunelab_mlp_forward = lambda x: calls.append(1) or saved(x)
    x = torch.randn(1, 3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        mlp(x)  # no gradient (evaluation, generation): the MLP's own forward, PEFT's inference path under it
    assert calls == [1]
    mlp(x.requires_grad_(True))
    assert calls == [1]  # training: the pair
    mlp._tunelab_mlp_forward = saved
    unpatch_lora_layers(model)
    assert not hasattr(mlp, "_tunelab_mlp_forward") and mlp.forward == own
    assert patch_lora_layers(model) == 14  # and the model can be patched again


@pytest.mark.parametrize("qkv", [False, True])
def test_the_grouped_mlp_compiles_without_breaks_cpu(qkv):
    """Under the offload's compiled forwards (AOTAutograd's graphs run eagerly, a counting backend) the grouped MLP
    (and attention: group_qkv) traces without a graph break; the two-product op: the first pass through the fused
    projections (the default: q, k, v, o, down; a group's forward is one augmented GEMM, no such op), the attention
    half q/k/v, in backward q/k/v and the pair's grad x (o's and down's backward run eager in the split)."""
    import collections

    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from tunelab.model.fast import offload
    from tunelab.model.fast.compile import compile_counters

    ops = collections.Counter()

    def count(gm, _):
        ops.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    eager, compiled = _peft("qwen2", quantized=True), _peft("qwen2", quantized=True)
    for model in (eager, compiled):
        assert group_gate_up(model) == 2
        assert not qkv or group_qkv(model) == 2
    offload_checkpoints(eager, split_min_tokens=0)
    torch._dynamo.reset()
    saved = offload._Compiled.fns, offload._Compiled.backend
    offload._Compiled.fns, offload._Compiled.backend = {}, aot_autograd(fw_compiler=count, bw_compiler=count)
    try:
        offload_checkpoints(compiled, compiled=True, split_min_tokens=0)
        loss_eager, grads_eager = _stepper(eager, "cpu")()
        before = compile_counters()
        loss, grads = _stepper(compiled, "cpu")()
        after = compile_counters()
    finally:
        offload._Compiled.fns, offload._Compiled.backend = saved
        torch._dynamo.reset()
    assert after["graph_breaks"] == before["graph_breaks"] and after["unique_graphs"] - before["unique_graphs"] == 3
    # grouped q/k/v: the first pass o and down, the attention half none, the backward the group's grad x and the pair's
    assert ops["tunelab.two_products.default"] == (2 + 0 + 1 + 1 if qkv else 5 + 3 + 3 + 1)
    assert ops["aten.cat.default"] >= 2  # the pair's augmented input, in the first pass and the MLP half
    assert abs(loss - loss_eager) < 1e-3 * loss_eager
    for g, ge in zip(grads, grads_eager):
        assert (g.float() - ge.float()).norm() < 2e-2 * ge.float().norm()


def _qkv_check(quantized: bool, dtype, tol, device="cpu", bias=True):
    """lora_group over q, k and v (Qwen2's: biased; widths 64, 32, 32 over a 64-wide input) against the three
    projections' reference, forward and backward (x, the A's and B's)."""
    widths = (64, 32, 32)
    if quantized:
        layers = [_nf4_layer(64, n, device, dtype=dtype, seed=10 + i) for i, n in enumerate(widths)]
        weights = [(lay.weight, lay.weight.quant_state, lay.bias if bias else None) for lay in layers]
        if device == "cuda":
            from tunelab.model.fast import nf4_triton

            for w, qs, _ in weights:
                qs.tunelab_triton = nf4_triton.enabled_for(w, qs)
                assert qs.tunelab_triton
    else:
        g = torch.Generator().manual_seed(7)
        weights = [((torch.randn(n, 64, generator=g) * 0.05).to(device, dtype), None,
                    (torch.randn(n, generator=g) * 0.05).to(device, dtype) if bias else None) for n in widths]
    loras = [_lora(64, n, 8, device, seed=20 + i) for i, n in enumerate(widths)]
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(8)).to(device, dtype)
    grad = torch.randn(2, 9, sum(widths), generator=torch.Generator().manual_seed(9)).to(device, dtype)

    def run(fused: bool):
        xs = x.clone().requires_grad_(True)
        params = [t.detach().clone().requires_grad_(True) for ab in loras for t in ab]
        args = [(w, qs, bs, params[2 * i], params[2 * i + 1], 2.0, dtype) for i, (w, qs, bs) in enumerate(weights)]
        if fused:
            y = lora_group(xs, *args)
        else:
            y = torch.cat([lora_linear_reference(xs, *arg) for arg in args], dim=-1)
        y.backward(grad)
        return [y.detach(), xs.grad] + [p.grad for p in params]

    for got, want in zip(run(True), run(False)):
        assert got.shape == want.shape and _rel(got, want) < tol


@pytest.mark.parametrize("quantized", [True, False])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_qkv_group_matches_the_three_projections(quantized, dtype, tol):
    _qkv_check(quantized, dtype, tol)


def test_qkv_group_without_biases_and_its_arguments():
    _qkv_check(False, torch.float32, 1e-5, bias=False)
    with pytest.raises(ValueError, match="two or three projections"):
        lora_group(torch.zeros(1, 4), None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quantized", [True, False])
def test_qkv_group_matches_the_three_projections_on_gpu(quantized, dtype):
    _qkv_check(quantized, dtype, 1e-2, "cuda")


@pytest.mark.parametrize("model_type, quantized, split", [("qwen2", True, False), ("qwen2", True, True),
                                                          ("qwen2", False, True), ("llama", False, False),
                                                          ("qwen3", True, True)])
def test_a_qkv_grouped_step_trains_like_the_ungrouped_one(model_type, quantized, split, monkeypatch):
    """group_qkv on Qwen2 (biased q/k/v), Llama, Qwen3 (q/k norms after the projections, q wider than the hidden
    size): a training step under the offload (with and without the split) gives the ungrouped step's loss and
    LoRA gradients; k's and v's calls took q's outputs (their own fused function never ran)."""
    from tunelab.model.fast import lora as lora_mod

    plain, grouped = _peft(model_type, quantized=quantized), _peft(model_type, quantized=quantized)
    assert group_qkv(grouped) == 2 and group_qkv(grouped) == 0  # once per attention
    for model in (plain, grouped):
        offload_checkpoints(model, split=split, split_min_tokens=0)
    loss_plain, grads_plain = _stepper(plain, "cpu")()
    singles = []
    linear = lora_mod.lora_linear
    monkeypatch.setattr(lora_mod, "lora_linear", lambda x, w, *rest: singles.append(tuple(x.shape)) or linear(x, w, *rest))
    loss, grads = _stepper(grouped, "cpu")()
    # single projections left a layer: o, gate, up, down in the first pass, and in the recompute the same, or gate and
    # up (the split skips o's and down's products)
    assert len(singles) == 2 * (4 + (2 if split else 4))
    attn = grouped.base_model.model.model.layers[0].self_attn
    assert attn.k_proj._tunelab_pending is None and attn.v_proj._tunelab_pending is None  # nothing left behind
    assert abs(loss - loss_plain) < 1e-3 * loss_plain
    for g, gp in zip(grads, grads_plain):
        assert (g - gp).norm() < 2e-2 * gp.norm()
