"""Next-token choice for step-wise decoding (the slot decoder's rows): greedy, or sampling with temperature /
top-k / top-p, plus the penalties the engine supports.

Greedy is argmax over float32 logits, as transformers' `generate` does, so greedy output is the same token for
token. Sampling follows generate's order (repetition penalty, temperature, top-k, top-p, multinomial) but draws from
each request's own seeded torch.Generator, so a request with a `seed` repeats whatever else shares its batch.
Penalties: `repetition_penalty` (transformers' definition, over prompt + output) and OpenAI's `presence_penalty` /
`frequency_penalty` (over the generated tokens: logit - presence * [count > 0] - frequency * count).
`min_tokens` forbids the stop tokens until that many tokens were generated (generate's min_new_tokens).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    seed: int | None = None

    @property
    def plain_greedy(self) -> bool:
        return not self.do_sample and self.repetition_penalty == 1.0 and not self.presence_penalty and not self.frequency_penalty


@dataclass
class RowState:
    """What sampling needs to know about one request: its params, prompt and output so far, its generator."""

    params: SamplingParams
    prompt: Sequence[int] = ()
    output: list[int] = field(default_factory=list)
    generator: Any = None

    def gen(self, device: Any):
        if self.generator is None:
            import torch

            self.generator = torch.Generator(device=device)
            if self.params.seed is not None:
                self.generator.manual_seed(int(self.params.seed))
            else:
                self.generator.seed()
        return self.generator


def choose(logits: Any, row: RowState, stop_ids: Sequence[int]) -> int:
    """The next token for one row's float32 logits [vocab]."""
    import torch

    p = row.params
    if len(row.output) < p.min_tokens and stop_ids:
        logits = logits.clone()
        logits[list(stop_ids)] = float("-inf")
    if p.plain_greedy:
        return int(torch.argmax(logits))
    logits = logits.clone()
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(row.prompt) | set(row.output)), dtype=torch.long, device=logits.device)
        vals = logits[seen]
        logits[seen] = torch.where(vals < 0, vals * p.repetition_penalty, vals / p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and row.output:
        ids, counts = torch.tensor(row.output, dtype=torch.long, device=logits.device).unique(return_counts=True)
        logits[ids] -= p.presence_penalty + p.frequency_penalty * counts.to(logits.dtype)
    if not p.do_sample or p.temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) > p.top_p  # keep the smallest set reaching top_p
        logits = logits.index_fill(0, order[drop], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=row.gen(logits.device)))


def choose_all(logits: dict[int, Any], rows: dict[int, RowState], stop_ids: Sequence[int]) -> dict[int, int]:
    """Next tokens for several rows ({slot: float32 logits [vocab]}); see `choose_batch`."""
    import torch

    if not logits:
        return {}
    slots = list(logits)
    return choose_batch(slots, torch.stack([logits[s] for s in slots]), rows, stop_ids)


_STOP_COLUMNS: dict[tuple[str, tuple[int, ...]], Any] = {}


def _stop_columns(device: Any, stop_ids: Sequence[int]):
    """The stop ids as a long tensor on `device` (made once per device and set: no host copy per step)."""
    import torch

    key = (str(device), tuple(int(t) for t in stop_ids))
    cols = _STOP_COLUMNS.get(key)
    if cols is None:
        cols = _STOP_COLUMNS[key] = torch.tensor(key[1], dtype=torch.long, device=device)
    return cols


def choose_batch(slots: Sequence[int], logits: Any, rows: dict[int, RowState], stop_ids: Sequence[int]) -> dict[int, int]:
    """Next tokens for one step: `logits` [len(slots), vocab] float32, row i for slot slots[i]. Every plain-greedy
    row goes into ONE argmax (one device sync for the batch), those still under their `min_tokens` with the stop
    tokens set to -inf first, as `choose` does (so the same token); the other rows (sampling, penalties) go
    through `choose` one by one. `logits` is not modified."""
    import torch

    greedy = [i for i, s in enumerate(slots) if rows[s].params.plain_greedy]
    out: dict[int, int] = {}
    if greedy:
        sub = logits if len(greedy) == len(slots) else logits[torch.tensor(greedy, device=logits.device)]
        held = [len(rows[slots[i]].output) < rows[slots[i]].params.min_tokens for i in greedy] if len(stop_ids) else []
        if any(held):
            masked = sub.index_fill(1, _stop_columns(sub.device, stop_ids), float("-inf"))
            if all(held):
                sub = masked
            else:
                flags = torch.tensor(held, dtype=torch.bool).to(sub.device, non_blocking=True)
                sub = torch.where(flags.view(-1, 1), masked, sub)
        picked = torch.argmax(sub, dim=-1).tolist()
        out.update((slots[i], tok) for i, tok in zip(greedy, picked))
    for i, s in enumerate(slots):
        if s not in out:
            out[s] = choose(logits[i], rows[s], stop_ids)
    return {s: out[s] for s in slots}
