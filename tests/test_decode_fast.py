"""The slot decoder's fast-step pieces on the CPU: the compiled decoder layer (torch.compile, one graph shared by
every layer), the grouped LoRA products (q/k/v, gate/up) and the flat 4-bit scales; each must leave the greedy
tokens exactly as they were. (On CUDA the same code runs under CUDA graphs: tests/test_infer_engine.py, GPU-marked.)"""
from __future__ import annotations

import collections
import os

import pytest

from helpers_infer import TOOL_ADAPTER, lora_run, plain_engine  # noqa: F401 (fixture)

PROMPTS = [[100 + i for i in range(7)], [300 + i for i in range(11)], [5, 6, 7]]


def _engine(lora_run, **extra):
    return plain_engine(lora_run, template="qwen", **extra)


def _decode(dec, plan, steps: int = 8) -> list[list[int]]:
    """Greedy tokens of each (prompt, adapter) row, all decoded together."""
    import torch

    got: dict[int, list[int]] = {}
    with torch.inference_mode():
        logits = {i: dec.prefill(i, p, a) for i, (p, a) in enumerate(plan)}
        while logits:
            for s, lg in logits.items():
                got.setdefault(s, []).append(int(torch.argmax(lg)))
                if len(got[s]) == steps:
                    dec.release(s)
            logits = dec.step({s: got[s][-1] for s in dec.lengths})
    return [got[i] for i in range(len(plan))]


def _recording_backend(graphs: list):
    """A torch.compile backend that runs the traced graph as it is (aot_eager: functionalized, so in-place cache
    writes on inference tensors are exercised) and records the ops of every graph it is given."""
    from torch._dynamo.backends.common import aot_autograd

    def backend(gm, inputs):
        graphs.append(collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function"))
        return aot_autograd(fw_compiler=lambda g, i: g.forward)(gm, inputs)

    return backend


def _matmuls(ops) -> int:
    return ops["<built-in function linear>"] + ops["<built-in function matmul>"]


def test_compiled_layers_and_grouped_lora_keep_the_greedy_tokens(lora_run):
    import torch

    from tunelab.infer.decoder import SlotDecoder

    eng = _engine(lora_run)
    eng.add_adapter("second", TOOL_ADAPTER)
    names = ["default", "second"]
    # the two-adapter plan only (one compile, ~10 s): it routes both adapters and the base; the one-adapter case is
    # the default engine path, covered by test_compiled_layers_and_grouped_lora_keep_the_greedy_tokens's plans
    plans = {"two adapters": [(p, names[i % 2]) for i, p in enumerate(PROMPTS)] + [(PROMPTS[0], None)]}
    torch._dynamo.reset()
    for label, plan in plans.items():
        routed = ["default"] if label == "one adapter" else names
        os.environ["TUNELAB_GROUP_LORA"] = "0"
        try:
            reference = _decode(SlotDecoder(eng.model, max_slots=4, max_len=64, adapters=routed), plan)
        finally:
            os.environ.pop("TUNELAB_GROUP_LORA")
        grouped = SlotDecoder(eng.model, max_slots=4, max_len=64, adapters=routed)
        assert grouped.router.groups == 4  # q/k/v and gate/up in each of the 2 layers
        assert _decode(grouped, plan) == reference, label
        graphs: list = []
        compiled = SlotDecoder(eng.model, max_slots=4, max_len=64, adapters=routed, compile=True, compile_backend=_recording_backend(graphs))
        assert _decode(compiled, plan) == reference, label
        # one graph per decoder layer call shape (batch 4 masked; then batch of 1 unmasked), shared by both layers
        assert 1 <= len(graphs) <= 3, (label, len(graphs))
        mm = graphs[0]["<built-in function linear>"] + graphs[0]["<built-in function matmul>"]
        # 7 base projections + 2 matmuls for each LoRA group (q/k/v, gate/up) and for o and down: 15, where one
        # pair per projection would be 21
        assert mm == 15, (label, graphs[0])
    eng.unload()


def test_flat_4bit_scales_give_the_same_projection(lora_run):
    import torch

    from tunelab.infer.decoder import _FlatAbsmax

    eng = _engine(lora_run, quantization_bit=4)
    lm = eng.model.get_base_model()
    proj = lm.model.layers[0].mlp.down_proj.base_layer
    assert proj.weight.quant_state.nested  # double quantization: 8-bit scales
    assert _FlatAbsmax(lm).swaps == []  # CUDA only by default
    for m in lm.modules():  # bitsandbytes' CPU layer would repack weight and scales at the first forward (not on CUDA)
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    flat = _FlatAbsmax(lm, devices=("cpu",))
    assert len(flat.swaps) == 2 * 7  # every 4-bit projection of the 2 layers, once
    x = torch.randn(3, 1, proj.in_features, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        with flat.active():
            assert not proj.weight.quant_state.nested
            fast = proj(x)
        assert proj.weight.quant_state.nested  # restored
        plain = proj(x)
    assert torch.equal(fast, plain)
    eng.unload()


def test_levers_fused_base_gemms_and_lora_reductions_keep_the_greedy_tokens(lora_run, monkeypatch):
    """TUNELAB_FUSE_PROJ (q/k/v and gate/up base GEMMs as one GEMM per group, the weights re-homed into one
    buffer as views), TUNELAB_LORA_REDUCE (the LoRA products as multiply + sum while compiling) and
    TUNELAB_PACK_GQA (decode attention over the query heads packed per key/value head, no repeat_kv): the
    compiled decoder's greedy tokens stay the reference's, and the re-homed weights are views holding the same
    values."""
    import torch

    from tunelab.infer.decoder import SlotDecoder

    eng = _engine(lora_run)
    eng.add_adapter("second", TOOL_ADAPTER)
    names = ["default", "second"]
    lm = eng.model.get_base_model()
    attn = lm.model.layers[0].self_attn
    before = {n: getattr(attn, n).base_layer.weight.detach().clone() for n in ("q_proj", "k_proj", "v_proj")}
    plain = eng.generate_ids([PROMPTS[0]], max_new_tokens=6)[0]
    # the two-adapter plan only (one compile, ~10 s): it routes both adapters and the base; the one-adapter case is
    # the default engine path, covered by test_compiled_layers_and_grouped_lora_keep_the_greedy_tokens's plans
    plans = {"two adapters": [(p, names[i % 2]) for i, p in enumerate(PROMPTS)] + [(PROMPTS[0], None)]}
    torch._dynamo.reset()
    for label, plan in plans.items():
        routed = ["default"] if label == "one adapter" else names
        reference = _decode(SlotDecoder(eng.model, max_slots=4, max_len=64, adapters=routed), plan)
        for env in ({"TUNELAB_FUSE_PROJ": "1", "TUNELAB_LORA_REDUCE": "1", "TUNELAB_PACK_GQA": "1"},):  # all at once (each compile costs seconds)
            for k in ("TUNELAB_FUSE_PROJ", "TUNELAB_LORA_REDUCE", "TUNELAB_PACK_GQA"):
                monkeypatch.delenv(k, raising=False)
            for k, v in env.items():
                monkeypatch.setenv(k, v)
            graphs: list = []
            dec = SlotDecoder(eng.model, max_slots=4, max_len=64, adapters=routed, compile=True, compile_backend=_recording_backend(graphs))
            assert dec.router.fused == (4 if "TUNELAB_FUSE_PROJ" in env else 0), (label, env)
            assert dec.pack_gqa == ("TUNELAB_PACK_GQA" in env)
            assert _decode(dec, plan) == reference, (label, env)
            assert _decode(dec, plan[:1]) == reference[:1], (label, env)  # one row: the batch-1 graph
            ops = graphs[0]
            counts = sorted({_matmuls(g) for g in graphs})
            base = 4 if "TUNELAB_FUSE_PROJ" in env else 7  # qkv, o, gate/up, down
            # the LoRA products (2 per group / projection: 8) are reductions in the one-row graph (TUNELAB_LORA_REDUCE),
            # GEMMs in the 4-row one (more than TUNELAB_LORA_REDUCE_ROWS=1 rows)
            assert counts == ([base, base + 8] if "TUNELAB_LORA_REDUCE" in env else [base + 8]), (label, env, graphs)
            if dec.pack_gqa:  # one SDPA over the packed query heads, no repeat_kv (expand + reshape of K and V)
                assert ops["<built-in function scaled_dot_product_attention>"] == 1 and not ops["aten.expand.default"], ops
    wcat = attn.q_proj._tl_wcat
    for n, w in before.items():  # views of the group's buffer, with the same values
        assert getattr(attn, n).base_layer.weight.untyped_storage().data_ptr() == wcat.untyped_storage().data_ptr()
        assert torch.equal(getattr(attn, n).base_layer.weight, w)
    assert eng.generate_ids([PROMPTS[0]], max_new_tokens=6)[0] == plain  # plain generate on the re-homed weights
    eng.unload()


@pytest.mark.parametrize("dtype, label", [("bfloat16", "one adapter"), ("auto", "two adapters")])
def test_lora_fold_lever_keeps_the_greedy_tokens_and_drops_the_a_products(lora_run, monkeypatch, dtype, label):
    """TUNELAB_LORA_FOLD (with the fused GEMMs and the reductions): each projection's or group's LoRA A rows are
    appended below its base weight, so the compiled layer runs 4 GEMMs (q/k/v, o, gate/up, down) and no LoRA A
    product; the greedy tokens stay the eager decoder's (bf16 with one adapter: the 16-bit A rows; the default
    dtype with two stacked adapters and the base); the base weights are views of the folded buffers holding the
    same values; a second router with the same adapters uses the folded rows, one with other adapters does not
    (the buffers hold the first one's A rows) and gives the unfolded decoder's tokens; plain generate on the re-homed weights is unchanged."""
    import torch

    from tunelab.infer.decoder import SlotDecoder

    eng = _engine(lora_run, infer_dtype=dtype)
    eng.add_adapter("second", TOOL_ADAPTER)
    routed = ["default"] if label == "one adapter" else ["default", "second"]
    plan = [(p, routed[i % len(routed)]) for i, p in enumerate(PROMPTS)] + [(PROMPTS[0], None)]
    lm = eng.model.get_base_model()
    mlp, attn = lm.model.layers[0].mlp, lm.model.layers[0].self_attn
    before = {n: getattr(mlp, n).base_layer.weight.detach().clone() for n in ("gate_proj", "up_proj", "down_proj")}
    before["o_proj"] = attn.o_proj.base_layer.weight.detach().clone()
    plain = eng.generate_ids([PROMPTS[0]], max_new_tokens=6)[0]
    torch._dynamo.reset()
    reference = _decode(SlotDecoder(eng.model, max_slots=4, max_len=64, adapters=routed), plan)
    for k, v in {"TUNELAB_FUSE_PROJ": "1", "TUNELAB_LORA_REDUCE": "1", "TUNELAB_PACK_GQA": "1", "TUNELAB_LORA_FOLD": "1"}.items():
        monkeypatch.setenv(k, v)
    graphs: list = []
    dec = SlotDecoder(eng.model, max_slots=4, max_len=64, adapters=routed, compile=True, compile_backend=_recording_backend(graphs))
    assert dec.router.folding and dec.router.folded_layers == 4 * 2, dec.router.folded_layers  # 4 GEMMs x 2 layers
    assert _decode(dec, plan) == reference, label
    assert _decode(dec, plan[:1]) == reference[:1], label  # one row: the batch-1 graph
    # the folded base GEMMs alone in the one-row graph (the B products are reductions: multiply + sum); in the
    # 4-row graph the 4 B products are GEMMs too
    assert sorted({_matmuls(g) for g in graphs}) == [4, 8], graphs
    width = sum(eng.model.peft_config[n].r for n in routed)  # the ranks stacked
    assert attn.q_proj._tl_wcat.shape[0] == sum(getattr(attn, n).base_layer.out_features for n in ("q_proj", "k_proj", "v_proj")) + 3 * width
    assert attn.o_proj._tl_wfold.shape == (attn.o_proj.base_layer.out_features + width, attn.o_proj.base_layer.in_features)
    a_o = dec.router._a_rows(attn.o_proj)
    assert a_o.shape[0] == width
    assert torch.equal(attn.o_proj._tl_wfold[attn.o_proj._tl_nbase :], a_o.to(attn.o_proj._tl_wfold.dtype))
    for n, w in before.items():
        layer = getattr(mlp, n, None) or attn.o_proj
        buf = mlp.gate_proj._tl_wcat if n in ("gate_proj", "up_proj") else layer._tl_wfold
        assert layer.base_layer.weight.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr(), n
        assert torch.equal(layer.base_layer.weight, w), n
    again = SlotDecoder(eng.model, max_slots=4, max_len=64, adapters=routed)  # (not decoded: it runs dec's code)
    assert again.router.folding and again.router.folded_layers == 8  # the same adapters: the folded rows are its own
    other = ["second"] if label == "one adapter" else ["second", "default"]  # other A rows: it must not use the fold
    monkeypatch.delenv("TUNELAB_LORA_FOLD")
    want = _decode(SlotDecoder(eng.model, max_slots=4, max_len=64, adapters=other), [(p, other[0]) for p, _ in plan])
    monkeypatch.setenv("TUNELAB_LORA_FOLD", "1")
    second = SlotDecoder(eng.model, max_slots=4, max_len=64, adapters=other, compile=True, compile_backend=_recording_backend([]))
    assert not second.router.folding and second.router.folded_layers == 0
    assert _decode(second, [(p, other[0]) for p, _ in plan]) == want, label
    assert eng.generate_ids([PROMPTS[0]], max_new_tokens=6)[0] == plain  # plain generate on the re-homed weights
    eng.unload()


def test_packed_gqa_attention_equals_sdpa_over_repeated_heads():
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from tunelab.infer.decoder import _packed_gqa_attention

    g = torch.Generator().manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 4, True
    q = torch.randn(3, 8, 1, 16, generator=g)
    k, v = torch.randn(3, 2, 10, 16, generator=g), torch.randn(3, 2, 10, 16, generator=g)
    mask = torch.arange(10).view(1, 1, 1, 10) <= torch.tensor([9, 4, 0]).view(3, 1, 1, 1)  # rows see 10, 5, 1 positions
    for m in (mask, None):
        want, _ = sdpa_attention_forward(module, q, k, v, m, scaling=0.25)
        got, _ = _packed_gqa_attention(module, q, k, v, m, scaling=0.25)
        assert got.shape == want.shape == (3, 1, 8, 16)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # more than one query position: transformers' own attention, unchanged
    q2 = torch.randn(3, 8, 2, 16, generator=g)
    assert torch.equal(_packed_gqa_attention(module, q2, k, v, None, scaling=0.25)[0], sdpa_attention_forward(module, q2, k, v, None, scaling=0.25)[0])


@pytest.mark.skipif(os.environ.get("TUNELAB_SLOW_TESTS") != "1",
                    reason="an off-by-default lever's compiled test (~20 s of compilation; the suite stays under 15 "
                           "minutes on CI's 2 cores); set TUNELAB_SLOW_TESTS=1")
def test_compiled_prefill_lever_keeps_logits_cache_rows_and_tokens(lora_run, monkeypatch):
    """TUNELAB_COMPILE_PREFILL (on by default on CUDA, forced on here): one-prompt prefills run through the compiled layer (no mask:
    causal attention, keys/values written straight into the slot's row); logits and cache rows equal the eager
    prefill's to rounding and the greedy tokens are the reference's, with one and two adapters."""
    import torch

    from tunelab.infer.decoder import SlotDecoder

    eng = _engine(lora_run)
    eng.add_adapter("second", TOOL_ADAPTER)
    names = ["default", "second"]
    plan = [(p, names[i % 2]) for i, p in enumerate(PROMPTS)] + [(PROMPTS[0], None)]
    torch._dynamo.reset()
    reference = SlotDecoder(eng.model, max_slots=4, max_len=64, adapters=names)
    tokens = _decode(reference, plan)
    monkeypatch.setenv("TUNELAB_COMPILE_PREFILL", "1")
    graphs: list = []
    dec = SlotDecoder(eng.model, max_slots=4, max_len=64, adapters=names, compile=True, compile_backend=_recording_backend(graphs))
    assert dec.compile_prefill
    dec.warmup()  # allocates the cache (eager prefill), then compiles the prefill on a dummy prompt
    assert dec.compile_prefill and graphs, "the prefill was not compiled"
    with torch.inference_mode():
        for slot, (prompt, adapter) in enumerate(plan):
            want = reference.prefill(slot, prompt, adapter)
            got = dec.prefill(slot, prompt, adapter)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            n = len(prompt)
            for k_ref, k_got in zip(reference.keys + reference.values, dec.keys + dec.values):
                torch.testing.assert_close(k_got[slot, :, :n], k_ref[slot, :, :n], rtol=1e-5, atol=1e-5)
            reference.release(slot)
            dec.release(slot)
    assert _decode(dec, plan) == tokens
    eng.unload()


def test_fold_and_fuse_leave_offloaded_or_meta_weights_alone():
    """A base weight on the meta device (or swapped in by an accelerate offload hook) is never re-homed: the fold
    and the fused GEMMs decline (0) and the layer keeps its own weight; a real one is folded below its rows."""
    import torch

    from tunelab.infer.adapters import _fold_base, _fuse_base

    def layer(device):
        m = torch.nn.Module()
        with torch.device(device):
            m.base_layer = torch.nn.Linear(8, 6, bias=True)
        return m

    a = torch.randn(2, 8)
    meta = layer("meta")
    assert _fold_base(meta, a) == 0 and not hasattr(meta, "_tl_wfold")
    hooked = layer("cpu")
    hooked.base_layer._hf_hook = object()
    assert _fold_base(hooked, a) == 0 and _fuse_base(hooked, [hooked]) == 0
    real = layer("cpu")
    w, b = real.base_layer.weight.detach().clone(), real.base_layer.bias.detach().clone()
    assert _fold_base(real, a) == 1 and real._tl_nbase == 6
    assert torch.equal(real._tl_wfold, torch.cat([w, a])) and torch.equal(real._tl_bfold, torch.cat([b, torch.zeros(2)]))
    assert real.base_layer.weight.untyped_storage().data_ptr() == real._tl_wfold.untyped_storage().data_ptr()
    assert _fold_base(layer("cpu"), torch.randn(2, 5)) == 0  # A of another input width


def test_compiled_prefill_is_compiled_at_warmup_not_at_the_first_prompts(lora_run, monkeypatch):
    """The warm-up compiles the one-prompt prefill for any prompt length (two lengths: the first is compiled as a
    constant, the second symbolic) with the slot index made as a request makes it (inference mode): real prompts
    of other lengths afterwards compile nothing (before: the first request recompiled, seconds on a GPU)."""
    import torch
    from torch._dynamo.utils import counters

    from tunelab.infer.decoder import SlotDecoder

    eng = _engine(lora_run)
    monkeypatch.setenv("TUNELAB_COMPILE_PREFILL", "1")
    torch._dynamo.reset()
    dec = SlotDecoder(eng.model, max_slots=2, max_len=64, adapters=["default"], compile=True, compile_backend="aot_eager")
    dec.warmup()
    assert dec.compile_prefill
    counters.clear()
    with torch.inference_mode():
        for n in (7, 11, 30):
            dec.prefill(0, list(range(100, 100 + n)), "default")
            dec.release(0)
    assert not counters["stats"].get("unique_graphs"), dict(counters["stats"])
    eng.unload()


def test_a_bad_reduce_rows_setting_is_a_sentence(lora_run, monkeypatch):
    from tunelab.errors import ModelError
    from tunelab.infer.decoder import SlotDecoder

    eng = _engine(lora_run)
    monkeypatch.setenv("TUNELAB_LORA_REDUCE_ROWS", "two")
    with pytest.raises(ModelError, match=r"TUNELAB_LORA_REDUCE_ROWS must be a whole number of rows, not 'two'\."):
        SlotDecoder(eng.model, max_slots=2, max_len=32, adapters=["default"])
    eng.unload()
