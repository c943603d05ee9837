"""Token counts of conversations through the one template layer, in worker processes (validate, stats).

    template, note = load_template("models/qwen", None)             # note says when the offline Qwen one is used
    for m in measure(conversations, template, cutoff_len=2048, workers=2):
        m.tokens, m.trained, m.dropped, m.error

Each sample is encoded with `ChatTemplate.encode_supervised` exactly as training does: once without truncation
(its full length, prompt and response tokens), and once more with cutoff_len only when it is longer (how many
tokens training keeps and trains, and whether the whole response is cut away: encode_supervised returns None).

Workers are forked (the template is inherited, not pickled) and fed chunks of conversations with a bounded number
in flight, so a large dataset is tokenized with bounded memory while its file is still being read. Results come back
in input order. Progress is a live line when stderr is a terminal and plain lines otherwise.
"""
from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from tunelab.data.conversation import Conversation
from tunelab.data.template import IGNORE_INDEX, ChatTemplate, get_template
from tunelab.errors import DataError

CHUNK = 64  # conversations per task: large enough to amortise pickling, small enough to keep workers busy


def load_template(model: str | None, template: str | None) -> tuple[ChatTemplate, str | None]:
    """The template bound to the model's tokenizer (template "auto" when not named), or without a model the
    offline Qwen2.5 tokenizer with template "qwen"; the second value is a note saying so, else None."""
    if model is None:
        from tunelab.model.tokenizer import build_qwen_tokenizer

        name = template or "qwen"
        note = f"No --model given: using the offline Qwen2.5 tokenizer and template {name!r}."
        return get_template(name, build_qwen_tokenizer()), note
    from tunelab.model.tokenizer import load_tokenizer

    return get_template(template or "auto", load_tokenizer(model)), None


@dataclass(frozen=True)
class Measure:
    """One sample's token counts. error: why the template cannot encode it (then the counts are 0)."""

    source: str
    tokens: int = 0  # the whole sample, before truncation
    response_tokens: int = 0  # trained tokens before truncation (assistant replies with their end markers)
    trained: int = 0  # trained tokens after truncation to cutoff_len (0 when dropped)
    dropped: bool = False  # truncation leaves no trained token: training drops the sample
    error: str | None = None

    @property
    def prompt_tokens(self) -> int:
        return self.tokens - self.response_tokens


def measure_one(conv: Conversation, template: ChatTemplate, cutoff_len: int | None) -> Measure:
    try:
        full = template.encode_supervised(conv)
        if full is None:
            return Measure(conv.source, dropped=True)
        ids, labels = full
        response = sum(1 for label in labels if label != IGNORE_INDEX)
        trained = response
        if cutoff_len is not None and len(ids) > cutoff_len:
            cut = template.encode_supervised(conv, cutoff_len)
            trained = 0 if cut is None else sum(1 for label in cut[1] if label != IGNORE_INDEX)
        return Measure(conv.source, len(ids), response, trained, dropped=trained == 0)
    except DataError as e:  # the template cannot render this conversation: a per-sample problem
        return Measure(conv.source, error=str(e))


def measure(
    conversations: Iterable[Conversation], template: ChatTemplate, cutoff_len: int | None = None,
    workers: int = 1, progress: Progress | None = None,
) -> Iterator[Measure]:
    """Measure every conversation, in input order; workers > 1 forks that many processes."""
    if workers <= 1:
        for conv in conversations:
            yield measure_one(conv, template, cutoff_len)
            if progress:
                progress.update()
        return
    yield from _measure_parallel(conversations, template, cutoff_len, workers, progress)


def default_workers() -> int:
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8))


# The forked workers read the template from here (set before the pool starts, so fork copies it).
_WORKER_ARGS: tuple[ChatTemplate, int | None] | None = None


def _measure_chunk(chunk: list[Conversation]) -> list[Measure]:
    assert _WORKER_ARGS is not None
    template, cutoff_len = _WORKER_ARGS
    return [measure_one(conv, template, cutoff_len) for conv in chunk]


def _measure_parallel(
    conversations: Iterable[Conversation], template: ChatTemplate, cutoff_len: int | None, workers: int,
    progress: Progress | None,
) -> Iterator[Measure]:
    global _WORKER_ARGS
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the Rust pool must not be used across fork
    _WORKER_ARGS = (template, cutoff_len)
    try:
        with mp.get_context("fork").Pool(workers) as pool:
            pending: deque[Any] = deque()
            source = iter(conversations)
            while chunk := list(itertools.islice(source, CHUNK)):
                pending.append(pool.apply_async(_measure_chunk, (chunk,)))
                while len(pending) > 2 * workers:  # backpressure: bounded memory whatever the file size
                    yield from _collect(pending.popleft().get(), progress)
            while pending:
                yield from _collect(pending.popleft().get(), progress)
    finally:
        _WORKER_ARGS = None


def _collect(results: list[Measure], progress: Progress | None) -> list[Measure]:
    if progress:
        progress.update(len(results))
    return results


class Progress:
    """A live line on a terminal (stderr), redrawn at most 5 times a second: "validate: 12,345 samples, 410/s";
    otherwise a plain line every `every` samples and at the end (so CI logs stay readable).

    The total is unknown while a file streams, so this counts and shows the rate rather than a percentage.
    """

    def __init__(self, what: str, every: int = 10_000, stream: Any = None) -> None:
        self.what = what
        self.every = every
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.count = 0
        self._start = self._drawn = time.monotonic()

    def update(self, n: int = 1) -> None:
        before = self.count
        self.count += n
        if self.tty:
            now = time.monotonic()
            if now - self._drawn >= 0.2:
                self._draw(now, end="")
        elif self.count // self.every > before // self.every:
            print(f"[tunelab] {self.what}: {self.count:,} samples", file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty:
            self._draw(time.monotonic(), end="\n")
        elif self.count % self.every:
            print(f"[tunelab] {self.what}: {self.count:,} samples", file=self.stream, flush=True)

    def clear(self) -> None:
        """Erase the live line (before printing something else to the terminal)."""
        if self.tty and self.count:
            print("\r\x1b[K", end="", file=self.stream, flush=True)

    def _draw(self, now: float, end: str) -> None:
        rate = self.count / max(now - self._start, 1e-9)
        print(f"\r\x1b[K{self.what}: {self.count:,} samples, {rate:,.0f}/s, {now - self._start:.0f} s", end=end,
              file=self.stream, flush=True)
        self._drawn = now
