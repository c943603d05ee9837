"""`tunelab data stats`: what a dataset holds: counts, turns, prompt / response lengths, Chinese share, duplicates.

    report = collect_stats(spec, on_invalid=log)                       # characters only
    report = collect_stats(spec, on_invalid=log, template=tpl, workers=2)  # and tokens through the template
    print("\n".join(report.lines())); report.plot("stats.png")

Per valid conversation (read and converted by the data layer, streamed: only a few numbers per sample are kept):
- turns: user messages (one per exchange);
- prompt characters: system prompt, user and tool messages; response characters: assistant messages;
- with a template, prompt and response tokens as training encodes them (response = trained tokens, with the end
  markers; prompt = everything else, template tokens included; no truncation);
- Chinese share: CJK ideographs (U+3400-4DBF, U+4E00-9FFF, U+F900-FAFF) among all non-space characters, and how
  many samples are mostly (over half) Chinese;
- exact duplicates: samples whose system prompt, messages and tools equal an earlier sample's.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from tunelab.data.conversation import Conversation
from tunelab.data.readers import InvalidRecord
from tunelab.data.registry import DatasetSpec
from tunelab.data.template import ChatTemplate
from tunelab.datatools.numbers import distribution_line, histogram_lines
from tunelab.datatools.source import iter_conversations
from tunelab.datatools.tokens import Progress, measure

_SPACES = (" ", "\n", "\t", "\r", "\u3000")
_CJK_RANGES = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF))
_SHOWN_DUPLICATES = 3


def _ints() -> array:
    return array("q")


@dataclass
class StatsReport:
    spec: DatasetSpec
    valid: int = 0
    invalid: int = 0
    turns: array = field(default_factory=_ints)
    prompt_chars: array = field(default_factory=_ints)
    response_chars: array = field(default_factory=_ints)
    template: str | None = None
    prompt_tokens: array = field(default_factory=_ints)
    response_tokens: array = field(default_factory=_ints)
    token_errors: int = 0
    cjk_chars: int = 0
    text_chars: int = 0  # non-space characters
    mostly_chinese: int = 0
    duplicates: int = 0
    duplicate_examples: list[tuple[str, str]] = field(default_factory=list)
    _seen: dict[bytes, str] = field(default_factory=dict, repr=False)

    def observe(self, conv: Conversation) -> None:
        """Add one conversation's character counts, Chinese share and duplicate check."""
        self.valid += 1
        prompt = [conv.system or ""] + [m.get("content") or "" for m in conv.messages if m["role"] != "assistant"]
        response = [m.get("content") or "" for m in conv.messages if m["role"] == "assistant"]
        self.turns.append(sum(1 for m in conv.messages if m["role"] == "user"))
        self.prompt_chars.append(sum(map(len, prompt)))
        self.response_chars.append(sum(map(len, response)))
        text = "\n".join(prompt + response)
        non_space = len(text) - sum(text.count(c) for c in _SPACES)
        cjk = count_cjk(text)
        self.text_chars += non_space
        self.cjk_chars += cjk
        self.mostly_chinese += 2 * cjk > non_space
        self._check_duplicate(conv)

    def _check_duplicate(self, conv: Conversation) -> None:
        # Piece by piece (separators keep ("ab", "c") and ("a", "bc") apart): much faster than json.dumps per sample.
        h = hashlib.blake2b(digest_size=16)
        h.update(b"\x00" if conv.system is None else b"\x01" + conv.system.encode("utf-8", "surrogatepass"))
        for m in conv.messages:
            h.update(f"\x1e{m['role']}\x1f".encode() + str(m.get("content") or "").encode("utf-8", "surrogatepass"))
            if m.get("tool_calls"):
                h.update(b"\x1d" + json.dumps(m["tool_calls"], sort_keys=True, default=str).encode())
        if conv.tools:
            h.update(b"\x1c" + json.dumps(conv.tools, sort_keys=True, default=str).encode())
        digest = h.digest()
        first = self._seen.get(digest)
        if first is None:
            self._seen[digest] = conv.source
        else:
            self.duplicates += 1
            if len(self.duplicate_examples) < _SHOWN_DUPLICATES:
                self.duplicate_examples.append((conv.source, first))

    # ----- output ----------------------------------------------------------------------------------------------
    def lines(self) -> list[str]:
        s = self.spec
        total = self.valid + self.invalid
        lines = [f"{s.where} ({s.formatting}): {total:,} records, {self.valid:,} valid, {self.invalid:,} invalid."]
        if not self.valid:
            return lines
        lines += [distribution_line("turns per conversation", self.turns), *histogram_lines(self.turns, exact=True)]
        for label, values in self._series()[1:]:
            lines += [distribution_line(label, values), *histogram_lines(values)]
        if self.token_errors:
            lines.append(f"{self.token_errors:,} samples cannot be rendered by template {self.template!r} "
                         "(`tunelab data validate` lists them).")
        share = 100 * self.cjk_chars / self.text_chars if self.text_chars else 0.0
        mostly = 100 * self.mostly_chinese / self.valid
        lines.append(f"text: {share:.1f}% Chinese (CJK characters) of {self.text_chars:,} non-space characters; "
                     f"{self.mostly_chinese:,} of {self.valid:,} samples ({mostly:.1f}%) are mostly Chinese.")
        dup = f"duplicates: {self.duplicates:,} " + ("sample repeats" if self.duplicates == 1 else "samples repeat")
        dup += " an earlier one"
        if self.duplicate_examples:
            dup += " (" + "; ".join(f"{a} = {b}" for a, b in self.duplicate_examples)
            dup += ", ...)" if self.duplicates > len(self.duplicate_examples) else ")"
        lines.append(dup + ".")
        return lines

    def _series(self) -> list[tuple[str, array]]:
        series = [("turns per conversation", self.turns), ("prompt characters", self.prompt_chars),
                  ("response characters", self.response_chars)]
        if self.template is not None:
            series += [(f"prompt tokens ({self.template})", self.prompt_tokens),
                       (f"response tokens ({self.template})", self.response_tokens)]
        return series

    def plot(self, path: str) -> None:
        """Histograms of every series into one PNG (matplotlib Agg), written atomically."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        series = [(label, values) for label, values in self._series() if len(values)]
        cols = 2
        rows = (len(series) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
        for ax, (label, values) in zip(axes.flat, series):
            exact = label.startswith("turns")
            bins = range(min(values), max(values) + 2) if exact and max(values) - min(values) < 60 else 50
            ax.hist(values, bins=bins, color="#4C72B0")
            ax.set_title(label)
            ax.set_ylabel("samples")
        for ax in list(axes.flat)[len(series):]:
            ax.axis("off")
        fig.suptitle(f"{self.spec.where}: {self.valid:,} samples")
        fig.tight_layout()
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fig.savefig(fh, format=os.path.splitext(path)[1].lstrip(".").lower() or "png", dpi=100)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        finally:
            plt.close(fig)


def count_cjk(text: str) -> int:
    """CJK ideographs in text (vectorised: ~10x faster than a regex over hundreds of MB)."""
    if text.isascii():
        return 0
    import numpy as np

    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return int(sum(np.count_nonzero((codes >= lo) & (codes <= hi)) for lo, hi in _CJK_RANGES))


def collect_stats(
    spec: DatasetSpec, on_invalid: Callable[[InvalidRecord], None], *, template: ChatTemplate | None = None,
    workers: int = 1, progress: Progress | None = None,
) -> StatsReport:
    """Stream the dataset once and gather the report (token counts too when given a template)."""
    report = StatsReport(spec, template=template.name if template else None)

    def count_invalid(invalid: InvalidRecord) -> None:
        report.invalid += 1
        on_invalid(invalid)

    observed = _observed(iter_conversations(spec, count_invalid), report)
    if template is None:
        for _ in observed:
            if progress:
                progress.update()
        return report
    for m in measure(observed, template, None, workers, progress):
        if m.error is not None:
            report.token_errors += 1
            continue
        report.prompt_tokens.append(m.prompt_tokens)
        report.response_tokens.append(m.response_tokens)
    return report


def _observed(conversations: Iterable[Conversation], report: StatsReport) -> Iterator[Conversation]:
    for conv in conversations:
        report.observe(conv)
        yield conv
