"""Selective recomputation (tunelab.model.fast.split) under the checkpoint offload: the decoder layer's backward
without the o and down products recomputed.

The first pass must be each covered layer class's own forward (exactly), and a training step with the split must
give the full recompute's loss and gradients: exactly on the CPU in eager (the same products on the same rows in
the same order), within the compiled-vs-eager bounds under a compiling backend. GPU forms are marked.
"""
from __future__ import annotations

import collections

import pytest
import torch

from tunelab.model.fast import patch_lora_layers
from tunelab.model.fast import lora as lora_mod
from tunelab.model.fast.offload import offload_checkpoints, split_layers
from tunelab.model.fast.split import first_pass, split_plan

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _base(model_type: str, dtype=torch.float32, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    shapes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512)
    cls, config = {"qwen2": (Qwen2ForCausalLM, Qwen2Config), "llama": (LlamaForCausalLM, LlamaConfig),
                   "qwen3": (Qwen3ForCausalLM, Qwen3Config)}[model_type]
    extra = dict(head_dim=32) if model_type == "qwen3" else {}  # q/k/v width 128 != hidden 64: o is not square
    return cls(config(**shapes, **extra)).to(dtype)


def _peft(model_type: str, device="cpu", quantized=False, dtype=torch.bfloat16, layers=2, grouped=False):
    from peft import LoraConfig, get_peft_model

    model = _base(model_type, dtype, layers)
    if quantized:
        from tunelab.model.tiny import quantize_decoder_linears_nf4

        quantize_decoder_linears_nf4(model)
    model = model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    for n, p in model.named_parameters():
        if "lora_" in n:  # B nonzero: every gradient is live
            p.data = torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))).mul(0.05).to(device)
    patch_lora_layers(model)
    if grouped:  # gate and up as one function (4-bit bases), as the fast path installs them
        from tunelab.model.fast.group import group_gate_up

        assert group_gate_up(model) == layers
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.base_model.model.enable_input_require_grads()
    model.train()
    return model


def _stepper(model, device, seed=3):
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(seed)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():  # .backward() as the Trainer does: the offload's backward fills .grad
        for p in params:
            p.grad = None
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in params]

    return step


def _train_compiled(make, loss_eager, grads_eager, compiler=None):
    """Two steps of the stepper make() returns, its offloaded layers compiled with AOTAutograd's graphs run eagerly
    (compiler: the graphs' compiler, to read their ops), each within the compiled-vs-eager bounds of the eager
    step's (loss_eager, grads_eager); returns what dynamo counted meanwhile (distinct graphs, graph breaks)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from tunelab.model.fast import offload
    from tunelab.model.fast.compile import compile_counters

    compiler = compiler or (lambda gm, _: make_boxed_func(gm.forward))
    torch._dynamo.reset()
    saved = offload._Compiled.fns, offload._Compiled.backend
    offload._Compiled.fns, offload._Compiled.backend = {}, aot_autograd(fw_compiler=compiler, bw_compiler=compiler)
    try:
        step = make()
        before = compile_counters()
        for _ in range(2):
            loss, grads = step()
            assert abs(loss - loss_eager) < 1e-3 * loss_eager
            for g, ge in zip(grads, grads_eager):  # AOTAutograd's decompositions round some bf16 steps apart
                assert (g.float() - ge.float()).norm() < 2e-2 * ge.float().norm()
        after = compile_counters()
    finally:
        offload._Compiled.fns, offload._Compiled.backend = saved
        torch._dynamo.reset()
    return {k: after[k] - before[k] for k in ("unique_graphs", "graph_breaks")}


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "llama"])
def test_first_pass_is_the_layers_own_forward(model_type):
    model = _base(model_type)
    layer = model.model.layers[0]
    seen = {}
    layer.register_forward_pre_hook(lambda m, args, kwargs: seen.update(args=args, kwargs=kwargs), with_kwargs=True)
    layer.post_attention_layernorm.register_forward_pre_hook(lambda m, args: seen.update(h2=args[0]))
    ids = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(input_ids=ids)  # the kwargs the model passes its layers (mask, positions, rotary embeddings, cache)
        x, kwargs = seen["args"][0], seen["kwargs"]
        layer._forward_pre_hooks.clear()
        want = layer(x, **kwargs)
        want_h2 = seen["h2"]
        out, h2 = first_pass(layer, kwargs, x)
    assert torch.equal(out, want) and torch.equal(h2, want_h2)


@pytest.mark.parametrize("model_type, quantized", [("qwen2", False), ("qwen2", True), ("qwen3", False),
                                                   ("llama", False)])
def test_split_recompute_gives_the_full_recomputes_gradients_exactly(model_type, quantized, monkeypatch):
    # fused_first on both: the h2 the split keeps from the first pass is then the one the full recompute remakes
    full, split = _peft(model_type, quantized=quantized), _peft(model_type, quantized=quantized)
    assert offload_checkpoints(full, split=False, fused_first=True) == 2 and split_layers(full) == 0
    assert offload_checkpoints(split, split=True, fused_first=True, split_min_tokens=48) == 2
    assert split_layers(split) == 2
    uses = collections.Counter()
    dense = lora_mod.dense_weight
    monkeypatch.setattr(lora_mod, "dense_weight", lambda w, qs, dt: uses.update([tuple(w.shape)]) or dense(w, qs, dt))
    step_full, step_split = _stepper(full, "cpu"), _stepper(split, "cpu")
    loss_full, grads_full = step_full()
    per_step_full = sum(uses.values())
    uses.clear()
    for _ in range(2):  # a second step reuses the stash
        loss, grads = step_split()
        assert loss == loss_full
        assert len(grads) == len(grads_full) == 2 * 7 * 2
        for g, gf in zip(grads, grads_full):  # the same products on the same rows in the same order
            assert torch.equal(g, gf)
    # weight uses a layer and step: the first pass 7, the recompute 7 (full) or 5 (split: no o, no down), grad x 7
    assert per_step_full == 2 * 21 and sum(uses.values()) == 2 * 2 * 19


def test_gradient_accumulation_and_fp16_give_the_full_recomputes_gradients_exactly():
    """Two micro-batches accumulated into .grad (the split adds its o/down LoRA gradients to what is there, as
    autograd does for the others), in fp16 autocast over an fp16 base (a T4's setting): equal to the full recompute."""
    def accumulate(model):
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.grad = None
        losses = []
        for seed in (5, 6):
            ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(seed))
            with torch.autocast("cpu", dtype=torch.float16):
                loss = model(input_ids=ids, labels=ids).loss / 2
            loss.backward()
            losses.append(loss.item())
        return losses, [p.grad.clone() for p in params]

    full, split = _peft("qwen2", dtype=torch.float16), _peft("qwen2", dtype=torch.float16)
    # fused_first: both first passes through the fused projections, so the h2 the split keeps is the one the full
    # recompute makes again (with PEFT's first pass they differ by the bf16/fp16 rounding of PEFT's separate add)
    offload_checkpoints(full, split=False, fused_first=True)
    offload_checkpoints(split, split=True, split_min_tokens=0, fused_first=True)
    losses_full, grads_full = accumulate(full)
    losses, grads = accumulate(split)
    assert losses == losses_full
    assert all(g.dtype == torch.float32 for g in grads)  # the LoRA parameters' own dtype
    for g, gf in zip(grads, grads_full):
        assert torch.equal(g, gf)
    # the defaults (PEFT's first pass): the split backpropagates through the h2 the forward made, the full recompute
    # through the one it remakes with the fused products: equal up to fp16 rounding
    full, split = _peft("qwen2", dtype=torch.float16), _peft("qwen2", dtype=torch.float16)
    offload_checkpoints(full, split=False)
    offload_checkpoints(split, split=True, split_min_tokens=0)
    (losses_full, grads_full), (losses, grads) = accumulate(full), accumulate(split)
    assert losses == losses_full  # the forward is the same PEFT pass in both
    for g, gf in zip(grads, grads_full):
        assert (g - gf).norm() < 2e-2 * gf.norm()


def test_below_the_token_threshold_the_whole_layer_is_recomputed(monkeypatch):
    """2 x 24 = 48 tokens a step: with the threshold at 49 the split is not taken (the recompute uses all seven
    weights again), at 48 it is; the default threshold and a bad TUNELAB_SPLIT_MIN_TOKENS."""
    from tunelab.errors import ConfigError
    from tunelab.model.fast import split

    counts = {}
    for keep in (False, True):  # lora.keep_dense (TUNELAB_KEEP_DENSE=1, opt-in)
        monkeypatch.setattr(lora_mod, "KEEP_DENSE", keep)
        for threshold in (49, 48):
            model = _peft("qwen2")
            offload_checkpoints(model, split_min_tokens=threshold)
            uses = []
            dense = lora_mod.dense_weight
            monkeypatch.setattr(lora_mod, "dense_weight", lambda w, qs, dt: uses.append(1) or dense(w, qs, dt))
            _stepper(model, "cpu")()
            monkeypatch.setattr(lora_mod, "dense_weight", dense)
            counts[keep, threshold] = len(uses)
    # the first pass through the fused projections (the default) 7, recompute 7 or 5, grad x 7, a layer; with the
    # recompute's weights kept, grad x dequantizes only what the recompute skipped: 0 (full) or 2 (split: o, down)
    assert counts == {(False, 49): 2 * 21, (False, 48): 2 * 19, (True, 49): 2 * 14, (True, 48): 2 * 14}
    monkeypatch.delenv("TUNELAB_SPLIT_MIN_TOKENS", raising=False)
    assert split.min_tokens() == split.MIN_TOKENS == 2048
    monkeypatch.setenv("TUNELAB_SPLIT_MIN_TOKENS", "4096")
    assert split.min_tokens() == 4096
    monkeypatch.setenv("TUNELAB_SPLIT_MIN_TOKENS", "4k")
    with pytest.raises(ConfigError, match="TUNELAB_SPLIT_MIN_TOKENS='4k': expected a whole number"):
        split.min_tokens()


def test_the_first_pass_through_the_fused_projections_trains_like_peft_s():
    peft_first, fused_first = _peft("qwen2"), _peft("qwen2")
    offload_checkpoints(peft_first, fused_first=False)
    offload_checkpoints(fused_first, fused_first=True)
    loss_peft, grads_peft = _stepper(peft_first, "cpu")()
    loss, grads = _stepper(fused_first, "cpu")()
    # bf16: PEFT rounds the base product and adds its separately rounded LoRA term; the fused one adds in the GEMM
    assert abs(loss - loss_peft) < 1e-3 * loss_peft
    for g, gp in zip(grads, grads_peft):
        assert (g.float() - gp.float()).norm() < 3e-2 * gp.float().norm()


def test_no_grad_calls_outside_the_first_pass_keep_peft_s_path():
    model = _peft("qwen2")
    offload_checkpoints(model, fused_first=True)
    o = model.base_model.model.model.layers[0].self_attn.o_proj
    calls = []
    plain = o._tunelab_plain_forward
    o._tunelab_plain_forward = lambda *a, **k: calls.append(1) or plain(*a, **k)
    _stepper(model, "cpu")()
    assert calls == []  # training, first pass included: the fused function
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert calls == [1]  # evaluation / generation: PEFT's (bitsandbytes' inference kernels)


def test_layers_the_split_does_not_cover_keep_the_full_recompute(monkeypatch):
    model = _peft("qwen2")
    layers = model.base_model.model.model.layers
    assert split_plan(layers[0])
    handle = layers[0].register_forward_hook(lambda *a: None)
    assert not split_plan(layers[0])  # a hook on the layer: the first pass would skip it
    handle.remove()
    del layers[1].mlp.down_proj._tunelab_plain_forward  # down not patched (as for a layer PEFT left unfused)
    assert not split_plan(layers[1])
    from tunelab.model.fast import split

    monkeypatch.setattr(split, "LAYERS", ("LlamaDecoderLayer",))
    assert not split_plan(layers[0])  # another class: its forward's wiring is not known here


def test_with_the_adapter_disabled_the_backward_recomputes_the_whole_layer():
    """Outside the fused case (here: adapters disabled, as a DPO reference pass does) the split's backward finds o
    and down unfused and the layer is recomputed whole: the same input gradient as plain checkpointing."""
    plain, split = _peft("qwen2"), _peft("qwen2")
    offload_checkpoints(split, split=True, split_min_tokens=0)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(4))

    def grad_of_embeddings(model):
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        with model.disable_adapter():  # the backward (its recompute) inside too
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(inputs_embeds=emb, labels=ids).loss
            loss.backward()
        return loss.item(), emb.grad

    loss_plain, grad_plain = grad_of_embeddings(plain)
    loss, grad = grad_of_embeddings(split)
    assert loss == loss_plain and torch.equal(grad, grad_plain)


def test_the_split_parts_compile_as_graphs_without_breaks_cpu():
    """Under a compiling backend (AOTAutograd's graphs, run eagerly: no code generation on the CPU) the first pass
    and the two halves each trace as one graph for both layers, with no graph break (the skip flags and the
    first-pass switch are guarded, not breaks), and train like eager."""
    from functorch.compile import make_boxed_func

    ops = collections.Counter()

    def count(gm, _):
        ops.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    eager, compiled = _peft("qwen2"), _peft("qwen2")
    offload_checkpoints(eager)
    loss_eager, grads_eager = _stepper(eager, "cpu")()

    def make():
        assert offload_checkpoints(compiled, compiled=True, split_min_tokens=0, fused_first=True) == 2
        assert split_layers(compiled) == 2
        return _stepper(compiled, "cpu")

    made = _train_compiled(make, loss_eager, grads_eager, count)
    assert made == {"unique_graphs": 3, "graph_breaks": 0}  # first pass, attention half, MLP half
    # the products: first pass 7 (no grad, fused_first), attention half q/k/v (o skipped) and MLP half gate/up (down skipped),
    # each half's backward its own grad x; o's and down's backward run eager (lora_backward), outside the graphs
    assert ops["tunelab.two_products.default"] == 7 + 3 + 2 + 3 + 2


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("quantized", [True, False])
def test_split_with_compiled_parts_trains_like_the_full_recompute_on_gpu(quantized):
    full, split = _peft("qwen2", "cuda", quantized), _peft("qwen2", "cuda", quantized)
    offload_checkpoints(full, split=False, fused_first=False)  # the previous default, eager
    assert offload_checkpoints(split, compiled=True, split=True, split_min_tokens=0) == 2 and split_layers(split) == 2
    loss_full, grads_full = _stepper(full, "cuda")()
    for _ in range(2):  # the second step reuses the stash and the compiled graphs
        loss, grads = _stepper(split, "cuda")()
        assert abs(loss - loss_full) < 1e-3 * loss_full
        for g, gf in zip(grads, grads_full):  # inductor fuses the bf16 elementwise work differently
            assert (g.float() - gf.float()).norm() < 3e-2 * gf.float().norm()


@pytest.mark.parametrize("env, custom", [("1", True), ("0", False)])
def test_the_opaque_ops_form_switch(env, custom):
    """tunelab::two_products and ::dequantize_4bit are Library-defined ops (less host time a call); TUNELAB_CUSTOM_OP=1
    defines them through custom_op, the form before, for an A/B on the GPU: the same results either way."""
    import os
    import subprocess
    import sys

    code = ("import torch\nfrom tunelab.model.fast import lora, nf4_triton\n"
            "from torch._library.custom_ops import OPDEFS\n"
            "g = torch.Generator().manual_seed(0)\n"
            "a1, b1, a2, b2 = (torch.randn(s, generator=g) for s in ((4, 8), (8, 4), (4, 2), (2, 4)))\n"
            "y = torch.ops.tunelab.two_products.default(a1, b1, None, a2, b2, 0.5)\n"
            "assert torch.equal(y, lora._two_products_eager(a1, b1, None, a2, b2, 0.5))\n"
            "print(sorted(n for n in OPDEFS if n in ('tunelab::two_products', 'tunelab::dequantize_4bit')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TUNELAB_CUSTOM_OP": env})
    assert out.returncode == 0, out.stderr[-2000:]
    want = "['tunelab::dequantize_4bit', 'tunelab::two_products']" if custom else "[]"
    assert out.stdout.strip().splitlines()[-1] == want


def test_the_kept_gate_up_layers_and_their_setting(monkeypatch):
    from tunelab.errors import ConfigError
    from tunelab.model.fast import split

    assert split.keep_layers(28, 3) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]
    assert split.keep_layers(28, 2) == list(range(1, 28, 2)) and split.keep_layers(4, 1) == [0, 1, 2, 3]
    assert split.keep_layers(28, 0) == [] and split.keep_layers(2, 5) == [1]
    monkeypatch.delenv("TUNELAB_KEEP_GATE_UP", raising=False)
    assert split.keep_every() == 0
    monkeypatch.setenv("TUNELAB_KEEP_GATE_UP", "3")
    assert split.keep_every() == 3
    monkeypatch.setenv("TUNELAB_KEEP_GATE_UP", "yes")
    with pytest.raises(ConfigError, match="TUNELAB_KEEP_GATE_UP='yes': expected a whole number of layers"):
        split.keep_every()
    # the plan: the last K layers on the GPU, every Nth below the last in host memory
    assert split.keep_plan(8, 3, 0) == {1: "host", 4: "host", 7: "device"}
    assert split.keep_plan(8, 3, 2) == {1: "host", 4: "host", 6: "device", 7: "device"}
    assert split.keep_plan(8, 0, 2) == {6: "device", 7: "device"} and split.keep_plan(8, 0, 0) == {}
    monkeypatch.delenv("TUNELAB_KEEP_GATE_UP_ON_GPU", raising=False)
    assert split.keep_on_gpu() == 0
    monkeypatch.setenv("TUNELAB_KEEP_GATE_UP_ON_GPU", "-1")
    with pytest.raises(ConfigError, match="TUNELAB_KEEP_GATE_UP_ON_GPU='-1': expected a whole number of layers"):
        split.keep_on_gpu()


def _keep_pair(device, every, compiled=False, on_gpu=0):
    """A split model (4-bit, gate/up grouped, 4 layers) without kept outputs and one keeping them every `every`
    layers (and the last `on_gpu` on the GPU): (their steppers, how many layers keep, where each layer keeps)."""
    models = [_peft("qwen2", device, quantized=True, layers=4, grouped=True) for _ in range(2)]
    assert offload_checkpoints(models[0], compiled=compiled, split_min_tokens=0, fused_first=True, keep_every=0,
                               keep_on_gpu=0) == 4
    assert offload_checkpoints(models[1], compiled=compiled, split_min_tokens=0, fused_first=True,
                               keep_every=every, keep_on_gpu=on_gpu) == 4
    assert split_layers(models[1]) == 4
    from tunelab.model.fast.offload import kept_layers

    layers = models[1].base_model.model.model.layers
    return [_stepper(m, device) for m in models], kept_layers(models[1]), [m._tunelab_keep_gu for m in layers]


@pytest.mark.parametrize("every, on_gpu, want", [(2, 0, [None, "host", None, "device"]),
                                                  (0, 2, [None, None, "device", "device"])])
def test_kept_gate_up_outputs_give_the_recomputes_gradients_exactly(every, on_gpu, want, monkeypatch):
    """The backward of a layer that kept gate/up's output replays it (lora.LoraGroupReplay) instead of the pair's
    GEMM: the same loss and gradients bit for bit on the CPU (the first pass made it from the same rows), two
    dequantizes fewer a kept layer, and a model without the grouped pair (16-bit) keeps none."""
    (step_split, step_keep), kept, where = _keep_pair("cpu", every=every, on_gpu=on_gpu)
    assert kept == 2 and where == want  # every 2nd below the last (host), or the last two on the GPU
    uses = collections.Counter()
    dense = lora_mod.dense_weight
    monkeypatch.setattr(lora_mod, "dense_weight", lambda w, qs, dt: uses.update([tuple(w.shape)]) or dense(w, qs, dt))
    loss_split, grads_split = step_split()
    per_step_split = sum(uses.values())
    replays = collections.Counter()
    replay = lora_mod.LoraGroupReplay.forward
    monkeypatch.setattr(lora_mod.LoraGroupReplay, "forward",
                        staticmethod(lambda ctx, *a: replays.update(["replay"]) or replay(ctx, *a)))
    for _ in range(2):  # the second step reuses the stash
        uses.clear()
        loss, grads = step_keep()
        assert loss == loss_split
        assert len(grads) == len(grads_split) == 4 * 7 * 2
        for g, gs in zip(grads, grads_split):
            assert torch.equal(g, gs)
        # per layer and step: first pass 7, split recompute 5 (3 where gate/up's output was kept), grad x 7
        assert per_step_split == 4 * 19 and sum(uses.values()) == 4 * 19 - 2 * 2
    assert replays["replay"] == 2 * 2
    model16 = _peft("qwen2", layers=4)
    assert offload_checkpoints(model16, split_min_tokens=0, fused_first=True, keep_every=1) == 4
    from tunelab.model.fast.offload import kept_layers

    assert kept_layers(model16) == 0  # 16-bit gate and up stay two projections: no pair output to keep


def _recorded_stash(record):
    """A HostStash that behaves as on CUDA, driven on the CPU: each copy back is recorded (record(slot, stream))
    and "arrives" at once instead of running."""
    from tunelab.model.fast.offload import HostStash

    class Recorded(HostStash):
        def __init__(self):
            super().__init__()
            self.cuda, self.stream, self.big_stream = True, "small", "big"

        def _fetch(self, slot, device, stream):
            if slot < 0 or slot in self.back or self.host[slot] is None or slot in self.resident:
                return
            record(slot, stream)
            self.back[slot] = (self.host[slot], None)

        @staticmethod
        def _arrive(t, ready):
            pass

    return Recorded()


def test_the_stash_brings_every_slot_back_ahead_and_at_most_two_kept_outputs():
    """HostStash's order on CUDA, driven on the CPU with its copies recorded instead of run: the offload's pops of a
    6-layer backward (per layer h2, then gate/up's output, then the input), layers 1 and 3 keeping their outputs on
    the host, 4 and 5 on the GPU. Every slot but the first popped was on its way back before it was asked for (the
    h2 of a layer whose kept output lies between it and the layer above too: the form of runs 25-26 missed that),
    each kept output from the backward's first pop below the kept layer above it (at most two on the device: the one
    about to be used and the next), on the big stream, and the small copies never queue behind it."""
    from types import SimpleNamespace


    fetched = []  # (slot, stream) in the order the copies back were started
    stash, device = _recorded_stash(lambda slot, stream: fetched.append((slot, stream))), SimpleNamespace(type="cuda")
    slots = {}
    for layer, keep in enumerate((None, "host", None, "host", "device", "device")):
        slots[layer] = [stash.push(torch.full((1,), float(10 * layer + part))) for part in (0, 1)]
        if keep:
            slots[layer].append(stash.push(torch.full((1,), float(10 * layer + 2)), big=True))
            if keep == "device":
                stash.resident.add(slots[layer][2])  # (a CUDA tensor pushed with on_device=True)
    assert slots == {0: [0, 1], 1: [2, 3, 4], 2: [5, 6], 3: [7, 8, 9], 4: [10, 11, 12], 5: [13, 14, 15]}
    host_kept = {4, 9}
    waited, in_flight = [], []
    for layer in range(5, -1, -1):
        for part in (1, 2, 0):  # h2, gate/up's output, the input: the offload's backward order
            if part < len(slots[layer]):
                slot = slots[layer][part]
                waited.append(slot not in stash.back and slot not in stash.resident)
                assert stash.pop(slot, device).item() == 10 * layer + part
                in_flight.append(len(host_kept & set(stash.back)))
    assert waited == [True] + [False] * 15  # only the first slot popped waited for its copy
    assert fetched[:3] == [(14, "small"), (13, "small"), (9, "big")]  # layer 3's output from the first pop on
    # layer 1's output from layer 3's first pop (its h2, slot 8) on, while layer 3's output is about to be used
    assert fetched[3:8] == [(11, "small"), (10, "small"), (8, "small"), (7, "small"), (4, "big")]
    assert max(in_flight) == 2
    assert all(stream == ("big" if slot in host_kept else "small") for slot, stream in fetched)
    assert stash.host == [] and stash.big == [] and stash.back == {}  # reset after slot 0
    stash.push(torch.zeros(1)), stash.push(torch.ones(1))
    stash.pop(1, device)  # starts bringing slot 0 back; a step that never takes it: reset drops the copy
    assert list(stash.back) == [0]
    stash.reset()
    assert stash.back == {} and stash.host == []


def test_kept_gate_up_outputs_compile_without_breaks_cpu():
    """Under a compiling backend the kept layers' first pass (first_pass_keep) is one graph returning gate/up's
    output too, no graph break, and training matches eager."""
    (step_split, _), _, _ = _keep_pair("cpu", every=2)
    loss_eager, grads_eager = step_split()

    def make():
        (_, step_keep), kept, _ = _keep_pair("cpu", every=2, compiled=True)
        assert kept == 2
        return step_keep

    # first pass with and without the kept output, the attention half, the MLP half (the layers not kept)
    assert _train_compiled(make, loss_eager, grads_eager) == {"unique_graphs": 4, "graph_breaks": 0}


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_kept_gate_up_outputs_on_gpu_train_like_the_recompute(compiled):
    """On CUDA the kept outputs go to pinned host memory on their own stream and come back prefetched past the
    ones kept on the GPU (the last two layers' here): eager, the same gradients bit for bit as recomputing them; compiled, within inductor's
    rounding."""
    (step_split, step_keep), kept, where = _keep_pair("cuda", every=2, compiled=compiled, on_gpu=2)
    assert kept == 3 and where == [None, "host", "device", "device"]
    loss_split, grads_split = step_split()
    for _ in range(3):  # later steps reuse the stash and its pinned buffers
        loss, grads = step_keep()
        for g, gs in zip(grads, grads_split):
            if compiled:
                assert (g.float() - gs.float()).norm() < 3e-2 * gs.float().norm()
            else:
                assert torch.equal(g, gs)
        assert loss == loss_split if not compiled else abs(loss - loss_split) < 1e-3 * loss_split


def test_the_graphed_split_backward_brings_both_slots_of_the_layer_below_back():
    """The split graphs' backward pops a layer's h2, then its input at once (the replay needs both up front), that
    pop with ahead=2: the layer below's h2 and input both start back then, a whole layer's replay before they are
    needed; with the default one-slot prefetch a layer's input would start back only at its h2's pop, right before
    the replay needs it."""
    from types import SimpleNamespace


    started = {}  # slot -> the pop during which its copy back started
    pops = []

    for ahead in (2, 1):
        started.clear()
        pops.clear()
        stash = _recorded_stash(lambda slot, stream: started.__setitem__(slot, pops[-1]))
        device = SimpleNamespace(type="cuda")
        for layer in range(4):  # per layer: its input (slot 2 L), then h2 (2 L + 1)
            stash.push(torch.full((1,), float(10 * layer))), stash.push(torch.full((1,), float(10 * layer + 1)))
        for layer in range(3, -1, -1):
            for part, kw in ((1, {}), (0, {"ahead": ahead})):
                pops.append(("h2" if part else "x", layer))
                assert stash.pop(2 * layer + part, device, **kw).item() == 10 * layer + part
        want = {2 * layer: ("x", layer + 1) if ahead == 2 else ("h2", layer) for layer in range(3)}
        assert {slot: started[slot] for slot in want} == want, ahead
        assert all(started[2 * layer + 1] == ("x", layer + 1) for layer in range(3))  # h2: the layer above's x
        assert stash.host == [] and stash.back == {}
