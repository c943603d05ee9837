"""Continuous batching of requests onto the engine's slot decoder (tunelab.infer.decoder), in one thread.

    sched = Scheduler(decoder, stop_ids, max_queue=64); sched.start()
    job = Job(prompt_ids, adapter, SamplingParams(), max_tokens=256); sched.submit(job)   # QueueFull -> 429
    async for token_id in job: ...                                                        # from an asyncio task

The loop: admit waiting jobs into free slots (prefilled together: the waiting prompts, in arrival order, packed
into one forward up to `max_prefill_tokens` tokens per forward, see `prefill_groups`; each job's first token comes
from its prefill and is sent as soon as that forward is done), drop
cancelled jobs (a client that went away, a stop string found), pick the next token of every live slot, retire the
finished ones (stop token or max_tokens), then decode one step for all live slots together. So a new request
joins the running batch at the next step and a finished one leaves it at once; the decode step's batch is
whatever is live. Admission is first come, first served; `max_queue` bounds the jobs waiting for a slot, and
`submit` refuses beyond it (QueueFull, with a Retry-After estimate) and after `drain()` (ShuttingDown).

The model runs only in this thread; jobs receive their token ids (not text: detokenization, stop strings and
event building happen on the asyncio side, tunelab.serve.serving) through their asyncio loop, all of one step's
tokens in ONE call_soon_threadsafe per loop (one wake-up of the event loop per step, not one per stream); a
reader that fell behind takes every token waiting for it at once (`Job.next_tokens`).
An error inside a step fails the jobs in that step, never the loop: the server keeps serving.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import Any, Sequence

from tunelab.infer.sampling import RowState, SamplingParams, choose_batch

logger = logging.getLogger(__name__)


DEFAULT_MAX_PREFILL_TOKENS = 8192


def prefill_groups(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Split prompts (their lengths, in admission order) into prefill forwards: consecutive prompts while their
    total stays within `budget` tokens; a prompt longer than the budget goes alone; budget 0: one prompt each.
    Order is kept (first come, first served), so an early long prompt is never overtaken."""
    groups: list[list[int]] = []
    total = 0
    for i, n in enumerate(lengths):
        if groups and budget > 0 and total + n <= budget:
            groups[-1].append(i)
            total += n
        else:
            groups.append([i])
            total = n
    return groups


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the request queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    pass


_END = object()


class Job:
    """One generation request; iterate it (async) for its token ids. `finish_reason` is set at the end."""

    def __init__(self, prompt: Sequence[int], adapter: str | None, params: SamplingParams, max_tokens: int) -> None:
        self.prompt = list(prompt)
        self.adapter = adapter
        self.params = params
        self.max_tokens = int(max_tokens)
        self.output: list[int] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None
        self.stop_at: int | None = None  # tokens through the one that completed a stop string (set by the reader)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._ended = False

    def bind(self) -> None:
        """Attach to the running asyncio loop (call from the request's task before submit)."""
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()

    def cancel(self) -> None:
        """Stop generating (the slot is freed at the scheduler's next iteration)."""
        self.cancelled = True

    def __aiter__(self):
        return self

    async def __anext__(self) -> int:
        item = _END if self._ended else await self._queue.get()
        if item is _END:
            self._ended = True
            if self.error is not None:
                raise self.error
            raise StopAsyncIteration
        return item

    async def next_tokens(self) -> list[int]:
        """Every token that arrived since the last call (waits for at least one); [] at the end (or the job's
        error raised). Don't mix with iterating the job."""
        items = [] if self._ended else [await self._queue.get()]
        while items and items[-1] is not _END and not self._queue.empty():
            items.append(self._queue.get_nowait())
        if items and items[-1] is _END:
            items.pop()
            self._ended = True
        if not items and self._ended and self.error is not None:
            raise self.error
        return items


class Scheduler:
    def __init__(self, decoder: Any, stop_ids: Sequence[int], *, max_queue: int = 64, max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS) -> None:
        self.decoder = decoder
        self.max_prefill_tokens = max(0, int(max_prefill_tokens))  # 0: one prompt per prefill forward
        self.stop_ids = list(stop_ids)
        self.max_queue = max(0, int(max_queue))
        self.waiting: collections.deque[Job] = collections.deque()
        self.active: dict[int, Job] = {}
        self.rows: dict[int, RowState] = {}
        self.cv = threading.Condition()
        self.draining = False
        self.stopped = False
        self.thread: threading.Thread | None = None
        self.step_seconds = 0.05  # moving average, for Retry-After
        self.steps = 0
        self.peak_running = 0  # the largest batch so far (/health shows it)
        self._outbox: dict[Any, list[tuple[Any, Any]]] = {}  # asyncio loop -> [(job queue, item)] not yet sent
        self.prefills = 0  # prefill forwards run
        self.peak_prefill = 0  # the most prompts prefilled in one forward so far
        # where the loop's time goes (seconds, cumulative): prefill forwards (+ their first tokens), the decode
        # step's call (host work: the GPU runs on), picking and sending the tokens (waits for the GPU's step)
        self.timing = {"prefill_s": 0.0, "step_s": 0.0, "pick_s": 0.0}

    # ----- outside API ----------------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="tunelab-scheduler", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.cv:
            if self.draining or self.stopped:
                raise ShuttingDown("the server is shutting down and accepts no new requests")
            free = self.decoder.max_slots - len(self.active)
            if len(self.waiting) >= self.max_queue + max(0, free):
                raise QueueFull(self._retry_after())
            self.waiting.append(job)
            self.cv.notify()

    def drain(self) -> None:
        """Accept nothing new; queued and running jobs finish."""
        with self.cv:
            self.draining = True
            self.cv.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """End the loop: every unfinished job ends (finish_reason 'cancelled')."""
        with self.cv:
            self.stopped = True
            self.cv.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    def stats(self) -> dict[str, int]:
        with self.cv:
            return {"running": len(self.active), "waiting": len(self.waiting), "slots": self.decoder.max_slots,
                    "max_queue": self.max_queue, "steps": self.steps, "peak_running": self.peak_running,
                    "prefills": self.prefills, "peak_prefill": self.peak_prefill, "max_prefill_tokens": self.max_prefill_tokens}

    def _retry_after(self) -> int:
        typical = max((j.max_tokens for j in self.active.values()), default=16)
        return max(1, min(60, int(self.step_seconds * typical / 2) + 1))

    # ----- the loop -------------------------------------------------------------------------------------------
    def _run(self) -> None:
        import torch

        pending = _Pending()
        while True:
            self._flush()  # e.g. the ends of the jobs a failed step retired
            with self.cv:
                while not self.stopped and not self.waiting and not self.active:
                    self.cv.wait(0.5)
                if self.stopped:
                    break
                admit = []
                free = self.decoder.free_slots
                while self.waiting and free:
                    job = self.waiting.popleft()
                    if not job.cancelled:
                        admit.append((free.pop(0), job))
                    else:
                        self._end(job, "cancelled")
            with torch.inference_mode():
                for group in prefill_groups([len(job.prompt) for _, job in admit], self.max_prefill_tokens):
                    t = time.perf_counter()
                    first = _Pending()
                    self._admit([admit[i] for i in group], first)
                    if first:  # these first tokens go out now, not after the other groups' prefills
                        self._advance(first)
                    self.timing["prefill_s"] += time.perf_counter() - t
                for slot, job in list(self.active.items()):
                    if job.cancelled:
                        self._retire(slot, "cancelled", pending)
                if pending:
                    t = time.perf_counter()
                    self._advance(pending)
                    now = time.perf_counter()
                    self.timing["pick_s"] += now - t
                    if pending.started:  # a decode step's tokens: the step took from its launch to here
                        self.step_seconds = 0.9 * self.step_seconds + 0.1 * (now - pending.started)
                self._flush()
                pending = self._step()
        for slot in list(self.active):
            self._retire(slot, "cancelled", pending)
        with self.cv:
            while self.waiting:
                self._end(self.waiting.popleft(), "cancelled")
        self._flush()

    def _admit(self, group: list[tuple[int, Job]], pending: "_Pending") -> None:
        """Prefill a group of (slot, job) in one forward; if that fails, each alone, so a prompt the decoder
        refuses fails that request alone."""
        if len(group) > 1:
            try:
                logits = self.decoder.prefill_many([(slot, job.prompt, job.adapter) for slot, job in group])
            except Exception as exc:
                logger.warning("batched prefill of %d prompts failed (%s); prefilling them one by one", len(group), exc)
            else:
                self._count_prefill(len(group))
                for slot, job in group:
                    self._activate(slot, job)
                    pending.add(slot, logits[slot])
                return
        for slot, job in group:
            try:
                pending.add(slot, self.decoder.prefill(slot, job.prompt, job.adapter))
            except Exception as exc:
                logger.warning("prefill failed: %s", exc)
                job.error = exc
                self._end(job, "error")
                continue
            self._count_prefill(1)
            self._activate(slot, job)

    def _count_prefill(self, prompts: int) -> None:
        self.prefills += 1
        self.peak_prefill = max(self.peak_prefill, prompts)

    def _activate(self, slot: int, job: Job) -> None:
        with self.cv:
            self.active[slot] = job
            self.peak_running = max(self.peak_running, len(self.active))
        self.rows[slot] = RowState(job.params, prompt=job.prompt, output=job.output)

    def _advance(self, pending: "_Pending") -> None:
        slots, logits = pending.take()
        picked = choose_batch(slots, logits, self.rows, self.stop_ids) if slots else {}
        now = time.monotonic()
        stops = set(self.stop_ids)
        for slot, tok in picked.items():
            job = self.active[slot]
            job.output.append(tok)
            if job.first_token_at is None:
                job.first_token_at = now
            if tok in stops:
                self._retire(slot, "stop", pending)
                continue
            self._send(job, tok)
            if len(job.output) >= job.max_tokens:
                self._retire(slot, "length", pending)
        self._flush()

    def _step(self) -> "_Pending":
        live = {s: self.active[s].output[-1] for s in self.decoder.lengths if s in self.active}
        if not live:
            return _Pending()
        started = time.perf_counter()
        try:
            slots, logits = self.decoder.step_batch(live)
        except Exception as exc:  # fail the jobs of this step; the loop (and the server) go on
            logger.error("decode step failed: %s", exc)
            for slot in list(self.active):
                self.active[slot].error = exc
                self._retire(slot, "error", _Pending())
            return _Pending()
        self.steps += 1
        self.timing["step_s"] += time.perf_counter() - started
        pending = _Pending(slots, logits)
        pending.started = started  # step_batch does not wait for the GPU: the step ends when its tokens are picked
        return pending

    def _retire(self, slot: int, reason: str, pending: "_Pending") -> None:
        self.decoder.release(slot)
        pending.drop(slot)
        self.rows.pop(slot, None)
        with self.cv:
            job = self.active.pop(slot, None)
        if job is not None:
            self._end(job, reason)

    def _end(self, job: Job, reason: str) -> None:
        job.finish_reason = reason
        self._send(job, _END)

    def _send(self, job: Job, item: Any) -> None:
        if job._loop is not None:
            self._outbox.setdefault(job._loop, []).append((job._queue, item))

    def _flush(self) -> None:
        """Hand the collected items to their loops: one call_soon_threadsafe per loop, in order."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            if not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(_deliver, items)
                except RuntimeError:  # the loop closed in between
                    pass


class _Pending:
    """Logits waiting for their tokens to be picked: (slot, [vocab]) pairs from prefills, or one step's
    (slots, [n, vocab]) from step_batch; rows whose job was retired meanwhile are dropped."""

    def __init__(self, slots: Sequence[int] = (), logits: Any = None) -> None:
        self.slots, self.logits = list(slots), logits
        self.single: list[tuple[int, Any]] = []
        self.dropped: set[int] = set()
        self.started = 0.0  # perf_counter() when a decode step was launched (0: prefill logits)

    def add(self, slot: int, logits: Any) -> None:
        self.single.append((slot, logits))

    def drop(self, slot: int) -> None:
        self.dropped.add(slot)

    def __bool__(self) -> bool:
        return any(s not in self.dropped for s in self.slots) or any(s not in self.dropped for s, _ in self.single)

    def take(self) -> tuple[list[int], Any]:
        """(slots, logits [n, vocab]) of the rows still wanted; empties this."""
        import torch

        slots, logits, single, dropped = self.slots, self.logits, self.single, self.dropped
        self.slots, self.logits, self.single, self.dropped = [], None, [], set()
        if single:
            slots, logits = [s for s, _ in single], torch.stack([x for _, x in single])
        keep = [i for i, s in enumerate(slots) if s not in dropped]
        if len(keep) < len(slots):
            slots = [slots[i] for i in keep]
            logits = logits[torch.tensor(keep, device=logits.device)] if keep else None
        return slots, logits


def _deliver(items: list[tuple[Any, Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
