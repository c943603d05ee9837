"""CUDA graphs over the offloaded layers' compiled calls (tunelab.model.fast.graphs).

On the CPU the capture is emulated (graphs.EMULATE: "capture" and "replay" run the body again), so the data flow
is the real one: static inputs and keyword buffers, the outputs copied out, the LoRA gradients handed to .grad
(aliased when it is None, added otherwise); the steps must equal the uncaptured offload's bit for bit (the same
compiled functions on the same values). On the GPU (marked) the capture is real.
"""
from __future__ import annotations

import pytest
import torch

from test_fast_split import _peft, _stepper
from tunelab.model.fast import graphs as graphs_mod
from tunelab.model.fast import offload
from tunelab.model.fast.offload import offload_checkpoints

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def compiled_backend():
    """The offload's compiled calls through AOTAutograd with its graphs run eagerly (no code generation)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    compiler = lambda gm, _: make_boxed_func(gm.forward)  # noqa: E731
    torch._dynamo.reset()
    saved = offload._Compiled.fns, offload._Compiled.backend
    offload._Compiled.fns, offload._Compiled.backend = {}, aot_autograd(fw_compiler=compiler, bw_compiler=compiler)
    yield
    offload._Compiled.fns, offload._Compiled.backend = saved
    torch._dynamo.reset()


def _pair(device="cpu", quantized=False):
    plain, graphed = _peft("qwen2", device, quantized=quantized), _peft("qwen2", device, quantized=quantized)
    assert offload_checkpoints(plain, compiled=True, split=False, layer_graphs=False) == 2
    assert offload_checkpoints(graphed, compiled=True, split=False, layer_graphs=True) == 2
    assert plain._tunelab_layer_graphs is None and graphed._tunelab_layer_graphs is not None
    return plain, graphed


def _tables(model):
    return [layer.__dict__.get("_tunelab_graphs", {}) for layer in model.base_model.model.model.layers]


def _varying_stepper(model):
    """Steps on new ids and a new padding mask each time (the static inputs and the mask's buffer must follow)."""
    params = [p for p in model.parameters() if p.requires_grad]
    count = [0]

    def step():
        count[0] += 1
        gen = torch.Generator().manual_seed(count[0])
        ids = torch.randint(0, 512, (2, 24), generator=gen)
        mask = torch.ones(2, 24, dtype=torch.long)
        mask[count[0] % 2, : 3 + count[0]] = 0  # left padding, a different row and width each step
        for p in params:
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in params]

    return step


def test_replayed_steps_equal_the_uncaptured_offload_bit_for_bit(compiled_backend, monkeypatch):
    monkeypatch.setattr(graphs_mod, "EMULATE", True)
    plain, graphed = _pair()
    step_plain, step_graphed = _varying_stepper(plain), _varying_stepper(graphed)
    graphs = graphed._tunelab_layer_graphs
    for n in range(4):  # step 1: the signatures seen (the compile); step 2: captured; steps 3-4: replayed
        loss_p, grads_p = step_plain()
        loss_g, grads_g = step_graphed()
        assert loss_g == loss_p
        assert all(torch.equal(a, b) for a, b in zip(grads_g, grads_p))
        assert graphs.captures == (0 if n == 0 else 4)  # two layers x (first pass, recompute + backward)
    assert graphs_mod.graphed_layers(graphed) == 2 and graphs_mod.graphed_layers(plain) == 0
    for table in _tables(graphed):
        assert len(table) == 2 and all(entry not in ("seen", "uncaptured") for entry in table.values())
    # the static buffers are shared by both layers: hidden states, output, gradient in and out (one shape each)
    assert sorted(key[0] for key in graphs.static) == ["grad_out", "grad_x", "out0", "x"]


def _accumulate(model, batches):
    """Three rounds (the third replays) of one backward per batch into the same .grad, zeroed to None between
    rounds only; the final gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(3):
        for p in params:
            p.grad = None
        for batch in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(input_ids=batch, labels=batch).loss.backward()
    return [p.grad.clone() for p in params]


def test_gradients_accumulate_across_replays_without_zeroing(compiled_backend, monkeypatch):
    """Two backwards into the same .grad (gradient accumulation, or zero_grad(set_to_none=False)): the first
    replay's .grad aliases the graph's tensor, which the second replay rewrites: it must be kept, then added to."""
    monkeypatch.setattr(graphs_mod, "EMULATE", True)
    plain, graphed = _pair()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    other = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))
    want, got = _accumulate(plain, (ids, other)), _accumulate(graphed, (ids, other))
    assert graphed._tunelab_layer_graphs.captures == 4
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_a_new_shape_is_seen_then_captured_up_to_the_limit(compiled_backend, monkeypatch):
    monkeypatch.setattr(graphs_mod, "EMULATE", True)
    monkeypatch.setattr(graphs_mod, "MAX_SIGNATURES", 1)  # one shape per kind of call (forward, backward)
    _, graphed = _pair()
    for seq in (24, 24, 16, 16):
        ids = torch.randint(0, 512, (2, seq), generator=torch.Generator().manual_seed(seq))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            graphed(input_ids=ids, labels=ids).loss.backward()
    assert graphed._tunelab_layer_graphs.captures == 4  # length 24 only: length 16 ran uncaptured
    assert all(len(table) == 2 for table in _tables(graphed))


def test_shapes_share_the_layers_gradient_buffers(compiled_backend, monkeypatch):
    """Two shapes captured (the default limit holds both): each layer's backward graphs copy their LoRA gradients
    into one set of buffers per layer, and steps alternating the shapes equal the uncaptured offload's."""
    monkeypatch.setattr(graphs_mod, "EMULATE", True)
    plain, graphed = _pair()
    params = {m: [p for p in m.parameters() if p.requires_grad] for m in (plain, graphed)}

    def step(model, seq):
        for p in params[model]:
            p.grad = None
        ids = torch.randint(0, 512, (2, seq), generator=torch.Generator().manual_seed(seq))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in params[model]]

    for seq in (24, 16, 24, 16, 24, 16):
        loss_p, grads_p = step(plain, seq)
        loss_g, grads_g = step(graphed, seq)
        assert loss_g == loss_p and all(torch.equal(a, b) for a, b in zip(grads_g, grads_p))
    graphs = graphed._tunelab_layer_graphs
    assert graphs.captures == 8  # 2 layers x 2 shapes x (first pass, backward)
    layers = graphed.base_model.model.model.layers
    assert len(graphs.grads) == 2 and all(len(graphs.grads[id(m)]) == 14 for m in layers)  # 7 x (A, B) a layer


def _split_pair(min_tokens=0):
    plain, graphed = _peft("qwen2", grouped=False), _peft("qwen2", grouped=False)
    for model, on in ((plain, False), (graphed, True)):
        assert offload_checkpoints(model, compiled=True, split=True, fused_first=True, split_min_tokens=min_tokens,
                                   layer_graphs=on, split_graphs=on) == 2
        assert offload.split_layers(model) == 2
    return plain, graphed


def test_split_calls_replayed_equal_the_uncaptured_split_bit_for_bit(compiled_backend, monkeypatch):
    """TUNELAB_SPLIT_GRAPHS: the split recompute's first pass (out and h2) and its backward (split_backward, whose
    LoRA gradients go to .grad) captured per layer and shape, with new ids and padding each step; the stash brings
    both of a layer's slots back ahead (HostStash.pop with ahead=2)."""
    monkeypatch.setattr(graphs_mod, "EMULATE", True)
    plain, graphed = _split_pair()
    step_plain, step_graphed = _varying_stepper(plain), _varying_stepper(graphed)
    graphs = graphed._tunelab_layer_graphs
    for n in range(4):
        loss_p, grads_p = step_plain()
        loss_g, grads_g = step_graphed()
        assert loss_g == loss_p
        assert all(torch.equal(a, b) for a, b in zip(grads_g, grads_p))
        assert graphs.captures == (0 if n == 0 else 4)
    kinds = sorted(sig[-1][0] for table in _tables(graphed) for sig in table)
    assert kinds == ["split-backward"] * 2 + ["split-forward"] * 2
    assert sorted({key[0] for key in graphs.static}) == ["grad_out", "grad_x", "h2", "out0", "out1", "x"]


def test_split_graphs_accumulate_and_follow_the_threshold(compiled_backend, monkeypatch):
    """Accumulation over two micro-batches of two shapes: one at the split (48 tokens), one below (32: the full
    recompute's graphs); the third round replays both."""
    monkeypatch.setattr(graphs_mod, "EMULATE", True)
    plain, graphed = _split_pair(min_tokens=40)
    long = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    short = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    want, got = _accumulate(plain, (long, short)), _accumulate(graphed, (long, short))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    kinds = sorted(sig[-1][0] for table in _tables(graphed) for sig in table)
    assert kinds == ["backward"] * 2 + ["forward"] * 2 + ["split-backward"] * 2 + ["split-forward"] * 2
    assert graphed._tunelab_layer_graphs.captures == 8


def test_split_graphs_on_by_default_below_their_token_limit(compiled_backend, monkeypatch):
    """The split calls are graphed by default below TUNELAB_SPLIT_GRAPH_MAX_TOKENS (4,096); TUNELAB_SPLIT_GRAPHS=0
    leaves them uncaptured; other values are ConfigErrors."""
    from tunelab.errors import ConfigError

    monkeypatch.setattr(graphs_mod, "EMULATE", True)
    for env, captures in (({}, 4), ({"TUNELAB_SPLIT_GRAPHS": "0"}, 0), ({"TUNELAB_SPLIT_GRAPH_MAX_TOKENS": "48"}, 0),
                          ({"TUNELAB_SPLIT_GRAPH_MAX_TOKENS": "49"}, 4)):  # 2 x 24 = 48 tokens a call
        for name in ("TUNELAB_SPLIT_GRAPHS", "TUNELAB_SPLIT_GRAPH_MAX_TOKENS"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        model = _peft("qwen2")
        assert offload_checkpoints(model, compiled=True, split=True, fused_first=True, split_min_tokens=0,
                                   layer_graphs=True) == 2
        step = _stepper(model, "cpu")
        for _ in range(3):
            step()
        assert model._tunelab_layer_graphs.captures == captures, env
    assert graphs_mod.split_max_tokens() == 49
    monkeypatch.setenv("TUNELAB_SPLIT_GRAPHS", "2")
    with pytest.raises(ConfigError, match="TUNELAB_SPLIT_GRAPHS='2'"):
        graphs_mod.split_enabled()
    monkeypatch.setenv("TUNELAB_SPLIT_GRAPH_MAX_TOKENS", "many")
    with pytest.raises(ConfigError, match="TUNELAB_SPLIT_GRAPH_MAX_TOKENS='many'"):
        graphs_mod.split_max_tokens()


def test_graphs_only_below_the_split_threshold(compiled_backend, monkeypatch):
    """With the split graphs off, calls from split_min_tokens tokens take the split uncaptured; below, the full
    recompute replays graphs."""
    monkeypatch.setattr(graphs_mod, "EMULATE", True)
    model = _peft("qwen2")
    assert offload_checkpoints(model, compiled=True, split=True, fused_first=True, split_min_tokens=40,
                               layer_graphs=True, split_graphs=False) == 2
    for seq in (24, 24, 24):  # 2 x 24 = 48 tokens: the split
        ids = torch.randint(0, 512, (2, seq), generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()
    assert model._tunelab_layer_graphs.captures == 0 and all(t == {} for t in _tables(model))
    for _ in range(2):  # 2 x 16 = 32 tokens: the full recompute, captured at the second step
        ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()
    assert model._tunelab_layer_graphs.captures == 4


def test_no_capture_off_cuda_without_emulation(compiled_backend):
    _, graphed = _pair()
    step = _stepper(graphed, "cpu")
    for _ in range(2):
        step()
    assert graphed._tunelab_layer_graphs.captures == 0 and all(t == {} for t in _tables(graphed))


def test_a_failed_capture_leaves_the_layer_uncaptured(compiled_backend, monkeypatch, caplog):
    import logging

    monkeypatch.setattr(graphs_mod, "EMULATE", True)

    def broken(self, body, pool, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs_mod._Replay, "__init__", broken)
    plain, graphed = _pair()
    step_plain, step_graphed = _stepper(plain, "cpu", seed=4), _stepper(graphed, "cpu", seed=4)
    with caplog.at_level(logging.WARNING, logger="tunelab.model.fast.graphs"):
        for _ in range(3):
            loss_p, grads_p = step_plain()
            loss_g, grads_g = step_graphed()
            assert loss_g == loss_p and all(torch.equal(a, b) for a, b in zip(grads_g, grads_p))
    assert graphed._tunelab_layer_graphs.captures == 0
    assert "could not be captured as a CUDA graph (RuntimeError: operation not permitted" in caplog.text


@pytest.mark.parametrize("raw, on", [(None, True), ("0", False), ("1", True)])
def test_enabled_reads_the_environment(monkeypatch, raw, on):
    if raw is None:
        monkeypatch.delenv("TUNELAB_LAYER_GRAPHS", raising=False)
    else:
        monkeypatch.setenv("TUNELAB_LAYER_GRAPHS", raw)
    assert graphs_mod.enabled() is on


def test_enabled_rejects_other_values(monkeypatch):
    from tunelab.errors import ConfigError

    monkeypatch.setenv("TUNELAB_LAYER_GRAPHS", "yes")
    with pytest.raises(ConfigError, match=r"TUNELAB_LAYER_GRAPHS='yes': expected 0 \(off\) or 1"):
        graphs_mod.enabled()


@gpu
@pytest.mark.gpu
def test_captured_layers_train_like_the_uncaptured_offload_on_gpu():
    """Real CUDA graphs over inductor's compiled layers (NF4, the Triton dequantize inside): three steps, the
    third replayed, against the same compiled offload uncaptured."""
    torch._dynamo.reset()
    offload._Compiled.fns = {}
    plain, graphed = _pair("cuda", quantized=True)
    step_plain, step_graphed = _stepper(plain, "cuda", seed=6), _stepper(graphed, "cuda", seed=6)
    for _ in range(3):
        loss_p, grads_p = step_plain()
        loss_g, grads_g = step_graphed()
        # the same kernels, but cuBLAS may pick other GEMM algorithms on the capture stream (its workspace there):
        # bf16 results one rounding apart (run 29: a LoRA gradient 0.8% apart in norm, the loss within 1e-5)
        assert abs(loss_g - loss_p) <= 1e-3 * abs(loss_p)
        for a, b in zip(grads_g, grads_p):
            assert (a.float() - b.float()).norm() <= 3e-2 * b.float().norm()
    graphs = graphed._tunelab_layer_graphs
    assert graphs.captures == 4 and graphs.pool_bytes() > 0


@gpu
@pytest.mark.gpu
def test_split_graphs_train_like_the_uncaptured_split_on_gpu(monkeypatch):
    """TUNELAB_SPLIT_GRAPHS on the GPU: real captures of the split first pass and split_backward (NF4, inductor),
    three steps, the third replayed, against the same split offload uncaptured."""
    torch._dynamo.reset()
    offload._Compiled.fns = {}
    plain, graphed = _peft("qwen2", "cuda", quantized=True), _peft("qwen2", "cuda", quantized=True)
    for model, on in ((plain, False), (graphed, True)):
        assert offload_checkpoints(model, compiled=True, split=True, fused_first=True, split_min_tokens=0,
                                   layer_graphs=on, split_graphs=on) == 2
    step_plain, step_graphed = _stepper(plain, "cuda", seed=7), _stepper(graphed, "cuda", seed=7)
    for _ in range(3):
        loss_p, grads_p = step_plain()
        loss_g, grads_g = step_graphed()
        assert abs(loss_g - loss_p) <= 1e-3 * abs(loss_p)  # the bounds of the test above (capture stream's cuBLAS)
        for a, b in zip(grads_g, grads_p):
            assert (a.float() - b.float()).norm() <= 3e-2 * b.float().norm()
    graphs = graphed._tunelab_layer_graphs
    assert graphs.captures == 4 and graphs.pool_bytes() > 0
    kinds = sorted(sig[-1][0] for table in _tables(graphed) for sig in table)
    assert kinds == ["split-backward"] * 2 + ["split-forward"] * 2
