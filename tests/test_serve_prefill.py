"""Batched prefill in the API server's scheduler (tunelab.serve.scheduler), in-process on the tiny Qwen2 model with
two LoRA adapters: waiting prompts are prefilled together, up to the token budget per forward, and every answer
equals plain generate with its adapter alone; a prompt the decoder refuses fails alone; budget 0 is one prompt per
forward. The HTTP side (32 concurrent streams through a real server, prefilled in batches) is in test_serve_api.py."""
from __future__ import annotations

import asyncio
import time

import pytest

from helpers_infer import TOOL_ADAPTER, lora_run, plain_engine  # noqa: F401 (fixture)

from tunelab.data.conversation import Conversation

TEXTS = ["Hello!", "Count from 1 to 5.", "What is the capital of France? Please answer in one short sentence.",
         "Hi", "Count from 1 to 9, slowly.", "Say nothing at all.", "Name three colours."]
NEW = 8


def test_prefill_groups_keep_order_within_the_budget():
    from tunelab.serve.scheduler import DEFAULT_MAX_PREFILL_TOKENS, prefill_groups

    assert DEFAULT_MAX_PREFILL_TOKENS == 8192
    assert prefill_groups([100, 200, 300], 8192) == [[0, 1, 2]]
    assert prefill_groups([5000, 4000, 100, 9000, 1], 8192) == [[0], [1, 2], [3], [4]]  # a too-long prompt goes alone
    assert prefill_groups([10, 10, 10], 20) == [[0, 1], [2]]
    assert prefill_groups([3, 3], 0) == [[0], [1]]  # 0: one prompt per forward
    assert prefill_groups([], 10) == []


@pytest.fixture(scope="module")
def engine(lora_run):
    eng = plain_engine(lora_run, template="qwen", max_new_tokens=NEW)
    eng.add_adapter("tools", TOOL_ADAPTER)
    yield eng
    eng.unload()


def _solo(eng, adapter, prompt) -> list[int]:
    if adapter is None:
        with eng.adapter_disabled():
            return eng.generate_ids([prompt])[0]
    eng.model.set_adapter(adapter)
    return eng.generate_ids([prompt])[0]


def _serve_all(eng, jobs_spec, budget: int, slow_reader: bool = False):
    """Submit every job before the scheduler starts (so they all wait together), run them, return (token lists,
    jobs, scheduler stats + 'wakeups': the scheduler's call_soon_threadsafe calls, 'batches': what each
    next_tokens call returned). slow_reader: the first job's reader blocks the event loop for 1 s after its
    first token (the decode thread runs on meanwhile)."""
    from tunelab.infer.decoder import SlotDecoder
    from tunelab.infer.sampling import SamplingParams
    from tunelab.serve.scheduler import Job, Scheduler

    dec = SlotDecoder(eng.model, max_slots=len(jobs_spec), max_len=128, adapters=["default", "tools"], pad_token_id=eng.pad_token_id)
    dec.warmup([eng.pad_token_id] * 2)
    sched = Scheduler(dec, eng.template.stop_token_ids, max_queue=len(jobs_spec), max_prefill_tokens=budget)

    wakeups, batches = [], []

    async def run():
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a, **k: (wakeups.append(1), real(*a, **k))[1]
        jobs = [Job(prompt, adapter, SamplingParams(), NEW) for adapter, prompt in jobs_spec]
        for job in jobs:
            job.bind()
            sched.submit(job)
        sched.start()

        async def collect(i, job):
            out = []
            try:
                while toks := await job.next_tokens():
                    batches.append((i, len(toks)))
                    if slow_reader and i == 0 and not out:
                        time.sleep(1.0)
                    out.extend(toks)
            except Exception as exc:  # the refused prompt
                return exc
            return out

        return await asyncio.wait_for(asyncio.gather(*(collect(i, j) for i, j in enumerate(jobs))), 120), jobs

    try:
        got, jobs = asyncio.run(run())
    finally:
        sched.stop()
    return got, jobs, dict(sched.stats(), wakeups=len(wakeups), batches=batches)


def test_waiting_prompts_are_prefilled_together_and_answer_as_alone(engine):
    from tunelab.serve.scheduler import prefill_groups

    names = ["default", "tools", None]
    prompts = [engine.encode(Conversation(messages=[{"role": "user", "content": t}])) for t in TEXTS]
    spec = [(names[i % 3], p) for i, p in enumerate(prompts)]
    spec.insert(2, ("tools", [engine.pad_token_id] * 200))  # longer than the decoder's 128 positions: refused
    lengths = [len(p) for _, p in spec]
    budget = sum(lengths[:4])  # the first forward takes 4 prompts (the refused one among them), the second the rest
    assert prefill_groups(lengths, budget) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    expected = [_solo(engine, a, p) if len(p) < 128 else None for a, p in spec]
    assert len({tuple(e) for e in expected if e}) >= 3  # the base and the two adapters answer differently
    got, jobs, stats = _serve_all(engine, spec, budget)
    assert "does not fit the decoder's context" in str(got[2]) and jobs[2].finish_reason == "error"
    assert [g for i, g in enumerate(got) if i != 2] == [e for i, e in enumerate(expected) if i != 2]
    # the first group's batched prefill refused the long prompt, so its 3 good prompts were prefilled one by one
    # (3 forwards); the second group's 4 prompts went in one forward
    assert (stats["prefills"], stats["peak_prefill"], stats["max_prefill_tokens"]) == (4, 4, budget)
    assert (stats["running"], stats["waiting"]) == (0, 0)


def test_budget_zero_prefills_one_prompt_per_forward(engine):
    prompts = [engine.encode(Conversation(messages=[{"role": "user", "content": t}])) for t in TEXTS[:3]]
    spec = [("default", prompts[0]), (None, prompts[1]), ("tools", prompts[2])]
    got, _, stats = _serve_all(engine, spec, 0)
    assert got == [_solo(engine, a, p) for a, p in spec]
    assert (stats["prefills"], stats["peak_prefill"]) == (3, 1)


def test_one_wakeup_per_step_and_a_slow_reader_takes_its_tokens_at_once(engine):
    """The decode thread hands each step's tokens (and the ends) to the event loop in one call, not one per
    stream; a reader that fell behind gets every waiting token in one next_tokens call; the answers stay exact."""
    prompts = [engine.encode(Conversation(messages=[{"role": "user", "content": t}])) for t in TEXTS[:4]]
    spec = [("default", prompts[0]), ("tools", prompts[1]), (None, prompts[2]), ("default", prompts[3])]
    got, jobs, stats = _serve_all(engine, spec, 8192, slow_reader=True)
    assert got == [_solo(engine, a, p) for a, p in spec]
    items = sum(len(g) for g in got) + len(jobs)  # every token and every end
    assert stats["wakeups"] <= stats["steps"] + stats["prefills"] + 1 < items  # at most one per step (+ prefills)
    first_reader = [n for i, n in stats["batches"] if i == 0]
    assert first_reader[0] == 1 and max(first_reader[1:]) >= 2  # behind after the pause: several tokens at once
    assert sum(first_reader) == len(got[0])
