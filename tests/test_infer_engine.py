"""The inference engine on a tiny Qwen2 model with a LoRA adapter trained by the real trainer (CPU, offline)."""
from __future__ import annotations

import os

import pytest

from helpers_infer import TOOL_ADAPTER, lora_run, plain_engine, tiny_run as _tiny_run  # noqa: F401 (fixture)

from tunelab.data.conversation import Conversation

QUESTIONS = ["Hello!", "What is the capital of France? Please answer in one short sentence.", "Hi"]


@pytest.fixture(scope="session")
def engine(lora_run):
    from tunelab.config import load_config
    from tunelab.infer import Engine

    model, run = lora_run
    return Engine.from_config(load_config({"model_name_or_path": model, "adapter_name_or_path": run, "do_sample": False, "max_new_tokens": 12}))


def _conv(text: str) -> Conversation:
    return Conversation(messages=[{"role": "user", "content": text}])


def test_engine_loads_adapter_and_template(engine, lora_run):
    assert engine.adapters == [lora_run[1]]
    assert engine.has_adapter
    assert engine.template.name == "qwen"  # from the run's tunelab_config.yaml
    assert engine.template.stop_token_ids == [151645, 151643]
    assert str(engine.device) == "cpu"
    assert engine.settings.do_sample is False and engine.settings.max_new_tokens == 12


def test_generate_equals_plain_model_generate(engine):
    import torch

    conv = _conv(QUESTIONS[1])
    ids = engine.encode(conv)
    assert ids == engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTIONS[1]}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    out = engine.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12, eos_token_id=engine.template.stop_token_ids)
    new = out[0, len(ids):].tolist()
    new = new[: next((i for i, t in enumerate(new) if t in engine.template.stop_token_ids), len(new))]
    expected = engine.tokenizer.decode(new, skip_special_tokens=True)
    assert engine.generate([conv]) == [expected]
    assert engine.generate([conv]) == [expected]  # greedy: deterministic


def test_batched_generate_equals_one_by_one(engine):
    convs = [_conv(q) for q in QUESTIONS]
    singles = [engine.generate([c])[0] for c in convs]
    assert engine.generate(convs) == singles
    engine.max_batch_size = 2  # sorted by length, two batches, results back in order
    try:
        assert engine.generate(convs) == singles
    finally:
        engine.max_batch_size = 8


def test_stream_pieces_join_to_the_generated_text(engine):
    conv = _conv(QUESTIONS[0])
    pieces = list(engine.stream(conv))
    assert len(pieces) >= 2
    assert "".join(pieces) == engine.generate([conv])[0]


def test_stream_closed_early_stops_the_decode_thread(engine):
    import threading

    stream = engine.stream(_conv(QUESTIONS[0]), max_new_tokens=500, stop_token_ids=())
    next(stream)
    stream.close()
    assert not any(t.name == "tunelab-decode" for t in threading.enumerate())


def test_generate_ids_stop_tokens_and_lengths(engine):
    prompt = engine.encode(_conv(QUESTIONS[2]))
    [ids] = engine.generate_ids([prompt], stop_token_ids=(), min_new_tokens=7, max_new_tokens=7)
    assert len(ids) == 7
    [ids] = engine.generate_ids([prompt], max_new_tokens=30)
    assert not set(ids) & set(engine.template.stop_token_ids)


def test_unknown_generation_setting_is_an_error(engine):
    from tunelab.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown generation setting 'temprature'"):
        engine.generate([_conv("Hi")], temprature=0.3)


def test_adapter_disabled_answers_like_the_base_model(engine, lora_run):
    from tunelab.config import load_config
    from tunelab.infer import Engine

    convs = [_conv(q) for q in QUESTIONS[:2]]
    base = Engine.from_config(load_config({"model_name_or_path": lora_run[0], "template": "qwen", "do_sample": False, "max_new_tokens": 12}))
    assert not base.has_adapter
    expected = base.generate(convs)
    base.unload()
    assert base.model is None
    with engine.adapter_disabled():
        assert engine.generate(convs) == expected
    assert engine.generate(convs) != expected  # the adapter is back on (and changes the answers)


def test_chat_session_history(engine):
    from tunelab.infer import ChatSession

    session = ChatSession(system="Be brief.")
    first = session.conversation("Hello!")
    reply = engine.generate([first])[0]
    session.add("Hello!", reply)
    second = engine.render(session.conversation("And again?"))
    assert second.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n")
    assert f"<|im_start|>assistant\n{reply}<|im_end|>\n<|im_start|>user\nAnd again?<|im_end|>" in second
    session.clear()
    assert session.messages == []
    assert "Hello!" not in engine.render(session.conversation("New topic"))


def test_quantized_engine_is_deterministic(lora_run):
    from tunelab.config import load_config
    from tunelab.infer import Engine

    model, run = lora_run
    eng = Engine.from_config(load_config({"model_name_or_path": model, "adapter_name_or_path": run, "quantization_bit": 4, "do_sample": False, "max_new_tokens": 8}))
    assert type(eng.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    first = eng.generate([_conv(q) for q in QUESTIONS])
    assert eng.generate([_conv(q) for q in QUESTIONS]) == first
    eng.unload()


def test_missing_adapter_folder_is_a_clear_error(lora_run, tmp_path):
    from tunelab.config import load_config
    from tunelab.errors import ModelError
    from tunelab.infer import Engine

    missing = os.path.join(tmp_path, "nope")
    with pytest.raises(ModelError) as err:
        Engine.from_config(load_config({"model_name_or_path": lora_run[0], "adapter_name_or_path": missing}))
    assert str(err.value) == (
        f"adapter folder '{missing}' does not exist: expected a folder with adapter_config.json and "
        "adapter_model.safetensors (a training output_dir or one of its checkpoint-N folders)."
    )


# ----------------------------------------------------------------------------------- the static-cache decode path
def _hf_and_static(engine):
    from tunelab.infer.engine import HFDecodeBackend, StaticDecodeBackend

    return HFDecodeBackend(), StaticDecodeBackend()


def test_static_backend_equals_plain_generate_token_for_token(engine):
    hf, static = _hf_and_static(engine)
    prompts = [engine.encode(_conv(q)) for q in QUESTIONS]
    saved = engine.backend
    try:
        engine.backend = hf
        expected = engine.generate_ids(prompts, stop_token_ids=(), max_new_tokens=12)
        expected_stopping = engine.generate_ids(prompts, max_new_tokens=12)
        engine.backend = static
        assert engine.generate_ids(prompts, stop_token_ids=(), max_new_tokens=12) == expected  # batch of 3, left-padded
        assert engine.generate_ids(prompts[1:2], stop_token_ids=(), max_new_tokens=12) == expected[1:2]  # alone
        assert engine.generate_ids(prompts, max_new_tokens=12) == expected_stopping
        assert all(len(x) == 12 for x in expected)
        assert static.decoder.max_len == 256 and static.decoder.graphs == {}  # CPU: eager steps
        pieces = list(engine.stream(_conv(QUESTIONS[0])))
        assert "".join(pieces) == engine.generate([_conv(QUESTIONS[0])])[0]
        with engine.adapter_disabled():
            base_static = engine.generate_ids(prompts[:2], max_new_tokens=12)
        engine.backend = hf
        with engine.adapter_disabled():
            assert engine.generate_ids(prompts[:2], max_new_tokens=12) == base_static
    finally:
        engine.backend = saved


def test_static_backend_decoding_ahead_equals_plain_generate(engine, monkeypatch):
    """TUNELAB_DECODE_AHEAD=k: k greedy steps per host sync, the picks on the device (step_ahead); the tokens are
    plain generate's: a batch whose rows stop early, inside a chunk (the steps after a row's end discarded),
    min_new_tokens (the stop ids masked on the device), a chunk that does not divide the length, one prompt alone."""
    from tunelab.infer.engine import HFDecodeBackend, StaticDecodeBackend

    prompts = [engine.encode(_conv(q)) for q in QUESTIONS]
    saved = engine.backend
    try:
        engine.backend = HFDecodeBackend()
        free = engine.generate_ids(prompts, max_new_tokens=20, stop_token_ids=())
        stop = (free[0][1],)  # row 0's second token as a stop id: the rows end early, inside a chunk of steps
        cases = [dict(max_new_tokens=20, stop_token_ids=stop), dict(max_new_tokens=13, stop_token_ids=()),
                 dict(max_new_tokens=9, min_new_tokens=7, stop_token_ids=stop)]
        expected = [engine.generate_ids(prompts, **c) for c in cases]
        assert all(len(x) < 20 for x in expected[0]), expected[0]  # stopped early: the steps after their end are discarded
        assert all(len(x) >= 7 for x in expected[2]), expected[2]  # min_new_tokens held the stop back
        alone = engine.generate_ids(prompts[2:], max_new_tokens=20, stop_token_ids=stop)
        for steps in ("3", "8"):
            monkeypatch.setenv("TUNELAB_DECODE_AHEAD", steps)
            engine.backend = StaticDecodeBackend()
            calls = []
            for case, want in zip(cases, expected):
                got = engine.generate_ids(prompts, **case)
                dec = engine.backend.decoder
                if not calls:
                    assert dec.ahead
                    real = dec.step_ahead
                    dec.step_ahead = lambda *a, **kw: calls.append(a[1]) or real(*a, **kw)
                assert got == want, (steps, case)
            assert engine.generate_ids(prompts[2:], max_new_tokens=20, stop_token_ids=stop) == alone
            assert calls and max(calls) == int(steps), calls
    finally:
        engine.backend = saved


def test_static_backend_closed_stream_stops_and_frees_its_slots(engine):
    import threading

    from tunelab.infer.engine import StaticDecodeBackend

    saved, engine.backend = engine.backend, StaticDecodeBackend()
    try:
        stream = engine.stream(_conv(QUESTIONS[0]), max_new_tokens=200, stop_token_ids=())
        next(stream)
        stream.close()
        assert not any(t.name == "tunelab-decode" for t in threading.enumerate())
        assert engine.backend.decoder.lengths == {}
    finally:
        engine.backend = saved


@pytest.fixture(scope="module")
def two_adapters(lora_run):
    """An engine (plain generate) with two adapters, 'default' (the lora run) and 'second' (trained apart), and
    `solo(adapter, prompt)`: that adapter's greedy 10 tokens alone (None: the base)."""
    eng = plain_engine(lora_run, max_new_tokens=10)
    eng.add_adapter("second", TOOL_ADAPTER)

    def solo(adapter, prompt):
        if adapter is None:
            with eng.adapter_disabled():
                return eng.generate_ids([prompt], stop_token_ids=())[0]
        eng.model.set_adapter(adapter)
        return eng.generate_ids([prompt], stop_token_ids=())[0]

    eng.solo = solo
    yield eng
    eng.unload()


def _run_plan(dec, plan, steps: int = 40, batched: bool = False) -> list[list[int]]:
    """Drive a slot decoder: plan[i] = (adapter, prompt, join step) -> row i's 10 greedy tokens. batched: the rows
    joining at one step are prefilled together (prefill_many)."""
    import torch

    got: dict[int, list[int]] = {}
    logits: dict = {}
    with torch.inference_mode():
        for step in range(steps):
            joining = [(slot, prompt, adapter) for slot, (adapter, prompt, join) in enumerate(plan) if join == step]
            if batched and joining:
                logits.update(dec.prefill_many(joining))
            for slot, prompt, adapter in ([] if batched else joining):
                logits[slot] = dec.prefill(slot, prompt, adapter)  # joins the running batch
            for s, lg in logits.items():
                got.setdefault(s, []).append(int(torch.argmax(lg)))
                if len(got[s]) == 10:
                    dec.release(s)  # leaves the batch
            logits = dec.step({s: got[s][-1] for s in dec.lengths})
    return [got[s] for s in range(len(plan))]


def test_slot_decoder_rows_with_different_adapters_equal_each_adapter_alone(two_adapters):
    """Continuous batching with per-row adapters: rows join at different steps, each with its own adapter (or none),
    and every row's greedy tokens equal plain generate with that adapter alone."""
    from tunelab.infer.decoder import SlotDecoder

    eng = two_adapters
    prompts = [eng.encode(_conv(q)) for q in QUESTIONS]
    plan = [("default", prompts[0], 0), ("second", prompts[1], 0), (None, prompts[2], 3), ("second", prompts[0], 5)]  # adapter, prompt, join step
    expected = [eng.solo(adapter, prompt) for adapter, prompt, _ in plan]
    assert expected[0] != expected[3] and expected[2] not in (expected[0], expected[1], expected[3])  # they really differ
    dec = SlotDecoder(eng.model, max_slots=4, max_len=128, adapters=["default", "second"])
    assert _run_plan(dec, plan) == expected


def test_batched_prefill_equals_one_prompt_prefills(two_adapters):
    """prefill_many: prompts of different lengths with mixed adapters (two stacked adapters and the base; then one
    adapter routed alone and the base) go through ONE forward per call, give the one-prompt prefill's logits and
    cache rows, and every row's greedy tokens (a second group joining the running batch) equal plain generate alone."""
    import torch

    from tunelab.infer.decoder import SlotDecoder

    eng = two_adapters
    texts = QUESTIONS + ["Count from 1 to 9, slowly.", "Say nothing at all."]
    prompts = [eng.encode(_conv(q)) for q in texts]
    assert len({len(p) for p in prompts}) == len(prompts)  # all lengths differ
    forwards = []
    hook = eng.model.get_base_model().register_forward_pre_hook(lambda *a: forwards.append(1))
    try:
        for adapters in (["default", "second"], ["default"]):
            names = adapters + [None]
            plan = [(names[i % len(names)], p, 0 if i < 3 else 2) for i, p in enumerate(prompts)]  # 3 at step 0, 2 join at step 2
            expected = [eng.solo(adapter, prompt) for adapter, prompt, _ in plan]
            solo_dec = SlotDecoder(eng.model, max_slots=5, max_len=128, adapters=adapters)
            packed_dec = SlotDecoder(eng.model, max_slots=5, max_len=128, adapters=adapters)
            solo_dec.warmup()
            packed_dec.warmup()  # the first prefill allocates the cache; prefill_many writes into it
            items = [(slot, prompt, adapter) for slot, (adapter, prompt, _) in enumerate(plan)]
            with torch.inference_mode():
                one = {slot: solo_dec.prefill(slot, prompt, adapter) for slot, prompt, adapter in items}
                del forwards[:]
                together = packed_dec.prefill_many(items)
            assert len(forwards) == 1  # one forward for all five prompts
            assert sorted(together) == list(range(5)) and packed_dec.lengths == solo_dec.lengths
            for slot, (_, prompt, _) in enumerate(plan):
                assert torch.allclose(together[slot], one[slot], rtol=0, atol=1e-4), (adapters, slot)
                for k_solo, k_packed in ((solo_dec.keys[0], packed_dec.keys[0]), (solo_dec.values[-1], packed_dec.values[-1])):
                    assert torch.allclose(k_packed[slot, :, : len(prompt)], k_solo[slot, :, : len(prompt)], rtol=0, atol=1e-5)
            for slot in range(5):
                packed_dec.release(slot)
            del forwards[:]
            assert _run_plan(packed_dec, plan, batched=True) == expected, adapters
            assert len(forwards) == 2 + 11  # two prefill forwards (3 prompts, then 2) + a decode step per token until the last row's 10th
    finally:
        hook.remove()


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [{"infer_dtype": "float32"}, {"infer_dtype": "bfloat16"}, {"quantization_bit": 4},
                                   {"infer_dtype": "bfloat16", "env": {"TUNELAB_LORA_FOLD": "0", "TUNELAB_DECODE_ATTN": "0"}}],
                         ids=["fp32", "bf16", "nf4", "bf16-no-fold-sdpa"])
def test_gpu_static_graph_decode_equals_plain_generate(lora_run, extra, monkeypatch):
    """On CUDA the static backend replays captured CUDA graphs of the compiled decode step (torch.compile of the
    decoder layer, grouped LoRA products, flat 4-bit scales); greedy tokens equal plain generate (fp32 and bf16
    tiny model with its LoRA adapter, and the 4-bit NF4 base) with the CUDA defaults (every decode lever on: the
    LoRA fold, the Triton decode attention, 8 steps per sync, the compiled prefill), and bf16 with the fold and the
    Triton attention off (the SDPA path and the A products as reductions)."""
    import torch

    from tunelab.infer.engine import HFDecodeBackend, StaticDecodeBackend

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    extra = dict(extra)
    for k, v in extra.pop("env", {}).items():
        monkeypatch.setenv(k, v)
    eng = plain_engine(lora_run, **extra)
    prompts = [eng.encode(_conv(q)) for q in QUESTIONS]
    eng.backend = HFDecodeBackend()
    expected = eng.generate_ids(prompts, stop_token_ids=(), max_new_tokens=40)
    solo = [eng.generate_ids([p], stop_token_ids=(), max_new_tokens=40)[0] for p in prompts]
    eng.backend = StaticDecodeBackend()
    fast = [eng.generate_ids([p], stop_token_ids=(), max_new_tokens=40)[0] for p in prompts]
    batched = eng.generate_ids(prompts, stop_token_ids=(), max_new_tokens=40)
    dec = eng.backend.decoder
    report = {
        "solo_equal": fast == solo,
        "first_difference": [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None) for x, y in zip(fast, solo)],
        "batched_equal": batched == expected,
        "graphs": (len(dec.graphs), len(dec.batch_buckets) * len(dec.len_buckets), dec.graph_error),
        "compiled": (dec.compiled is not None, dec.compile_error, dec.warmup_seconds), "lora_groups": dec.router.groups,
        "decode_kernel": dec.decode_kernel, "compile_prefill": dec.compile_prefill, "folded": dec.router.folded_layers,
    }
    eng.unload()
    print(report)
    assert report["graphs"][0] == report["graphs"][1] and report["graphs"][2] is None, report
    assert report["compiled"][:2] == (True, None) and report["lora_groups"] == 4, report
    assert report["solo_equal"], report
    from tunelab.infer.adapters import lever
    from tunelab.infer.decoder import DECODE_ATTN_DEFAULT

    folds = lever("TUNELAB_LORA_FOLD", "cuda") and "quantization_bit" not in extra  # 16-bit bases only
    assert report["folded"] == (4 * 2 if folds else 0), report  # q/k/v, o, gate/up, down in the 2 layers

    assert report["decode_kernel"] == lever("TUNELAB_DECODE_ATTN", "cuda", cuda_default=DECODE_ATTN_DEFAULT), report
    if "infer_dtype" in extra and extra["infer_dtype"] == "float32":
        assert report["batched_equal"], report


def test_incremental_decoder_pieces_join_to_the_whole_decode(engine):
    """Streaming detokenization (tokenizers' DecodeStream for the Qwen tokenizer, and the whole-decode fallback):
    the pieces, fed token by token or several at a time, join to exactly the whole answer's decode, including
    characters split across tokens (Chinese, an emoji) and a stop token ending it."""
    from tunelab.infer.engine import IncrementalDecoder

    tok = engine.tokenizer
    ids = tok("Count: 1, 2, 3. 你好，世界！ 😀 龘靐 ꙮ naïve café\n  end", add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tok.decode(ids[:k]) for k in range(1, len(ids)))  # some prefix ends inside a character
    expected = tok.decode(ids, skip_special_tokens=True)
    stop = engine.template.stop_token_ids[0]
    for streamed in (True, False):
        for size in (1, 3):
            dec = IncrementalDecoder(tok, [stop])
            if not streamed:
                dec._stream = None
            feed = ids + [stop, 11]  # nothing after the stop token counts
            pieces = [dec.add(feed[i : i + size]) for i in range(0, len(feed), size)] + [dec.flush()]
            assert "\ufffd" not in "".join(pieces[:-1])
            assert "".join(pieces) == expected, (streamed, size)
    assert IncrementalDecoder(tok, [])._stream is not None  # the fast path is the one the server uses here
