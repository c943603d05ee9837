"""Progress with an ETA for evaluation loops: a tqdm bar when stderr is a terminal, plain log lines otherwise.

    with Progress(total=len(questions), desc="mmlu", unit="q") as bar:
        for batch in batches:
            ...
            bar.update(len(batch))

Plain lines (CI logs, `| tee`) come at most every `every_s` seconds and at the end, so a log stays readable.
"""
from __future__ import annotations

import datetime
import logging
import sys
import time

logger = logging.getLogger(__name__)


def _fmt(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class Progress:
    def __init__(self, total: int, desc: str, unit: str = "it", every_s: float = 15.0, stream=None) -> None:
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = self.last_print = time.time()
        self._bar = None
        if hasattr(self.stream, "isatty") and self.stream.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            if note:
                self._bar.set_postfix_str(note, refresh=False)
            return
        now = time.time()
        if now - self.last_print >= self.every_s or self.done >= self.total:
            self.last_print = now
            logger.info("%s", self.line(note))

    def line(self, note: str = "") -> str:
        elapsed = time.time() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        pct = 100.0 * self.done / max(self.total, 1)
        text = (f"{self.desc}: {self.done}/{self.total} {self.unit} ({pct:.0f}%) | {rate:.1f} {self.unit}/s | "
                f"{_fmt(elapsed)} elapsed, {_fmt(left)} left")
        return f"{text} | {note}" if note else text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
