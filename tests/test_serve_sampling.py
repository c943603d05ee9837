"""choose_batch (one argmax for every greedy row of a step, min_tokens masking included) picks exactly the tokens
that choose() picks row by row, and the scheduler's pending logits drop retired rows."""
from __future__ import annotations

import torch

from tunelab.infer.sampling import RowState, SamplingParams, choose, choose_all, choose_batch
from tunelab.serve.scheduler import _Pending

STOPS = [5, 9]


def _logits(n: int, vocab: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn((n, vocab), generator=g)
    x[:, STOPS[0]] += 10.0  # the stop token is every row's argmax unless masked
    return x


def _rows(specs):
    rows = {}
    for slot, (params, outputs) in specs.items():
        rows[slot] = RowState(params, prompt=[1, 2, 3], output=[7] * outputs)
    return rows


def test_choose_batch_equals_choose_row_by_row():
    greedy = SamplingParams()
    held = SamplingParams(min_tokens=4)
    sampled = SamplingParams(do_sample=True, temperature=0.7, top_k=5, seed=3)
    penalised = SamplingParams(presence_penalty=1.5, min_tokens=2)
    specs = {0: (greedy, 0), 2: (held, 1), 3: (held, 4), 5: (sampled, 0), 6: (penalised, 0), 7: (greedy, 2)}
    slots = sorted(specs)
    logits = _logits(len(slots))
    before = logits.clone()
    got = choose_batch(slots, logits, _rows(specs), STOPS)
    rows = _rows(specs)
    want = {s: choose(logits[i], rows[s], STOPS) for i, s in enumerate(slots)}
    assert got == want
    assert list(got) == slots
    assert torch.equal(logits, before)  # not modified
    assert got[0] == STOPS[0] and got[7] == STOPS[0] and got[3] == STOPS[0]  # free to stop
    assert got[2] not in STOPS  # still under min_tokens: the stop tokens are masked


def test_choose_batch_all_rows_held_and_none_held():
    held = SamplingParams(min_tokens=10)
    logits = _logits(4)
    rows = _rows({s: (held, 3) for s in range(4)})
    got = choose_batch(list(range(4)), logits, rows, STOPS)
    masked = logits.clone()
    masked[:, STOPS] = float("-inf")
    assert list(got.values()) == masked.argmax(-1).tolist()
    assert all(t not in STOPS for t in got.values())
    rows = _rows({s: (SamplingParams(), 0) for s in range(4)})
    assert list(choose_batch(list(range(4)), logits, rows, STOPS).values()) == [STOPS[0]] * 4
    # no stop ids at all: min_tokens has nothing to mask
    rows = _rows({s: (held, 0) for s in range(4)})
    assert list(choose_batch(list(range(4)), logits, rows, []).values()) == [STOPS[0]] * 4


def test_choose_all_is_choose_batch_over_a_dict():
    logits = _logits(3)
    rows = _rows({4: (SamplingParams(min_tokens=1), 0), 1: (SamplingParams(), 0), 8: (SamplingParams(), 0)})
    got = choose_all({4: logits[0], 1: logits[1], 8: logits[2]}, rows, STOPS)
    assert got == choose_batch([4, 1, 8], logits, rows, STOPS)
    assert got[1] == got[8] == STOPS[0] and got[4] not in STOPS


def test_pending_drops_retired_rows():
    logits = torch.arange(12.0).view(3, 4)
    p = _Pending([0, 1, 2], logits)
    p.drop(1)
    assert bool(p)
    slots, kept = p.take()
    assert slots == [0, 2] and torch.equal(kept, logits[[0, 2]])
    assert not p  # emptied
    q = _Pending()
    q.add(3, logits[0])
    q.add(5, logits[2])
    q.drop(3)
    slots, kept = q.take()
    assert slots == [5] and torch.equal(kept, logits[[2]])
    r = _Pending([4], logits[:1])
    r.drop(4)
    assert not r
    assert r.take() == ([], None)
