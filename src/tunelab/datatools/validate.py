"""`tunelab data validate`: check every record of a dataset as training would, and (with a template) measure it.

    report = validate_dataset(spec, on_invalid=print)                      # each InvalidRecord as it is found
    report = validate_dataset(spec, on_invalid=log, template=tpl, cutoff_len=2048, workers=2)
    print("\n".join(report.lines()))

Records are read and converted by the data layer (readers.iter_records -> formats.convert_record), so every
invalid record is reported with its file and line (or index) and the same reason training gives. With a template,
each valid sample is encoded (tokens.measure, in worker processes): the token-length distribution before
truncation, how many samples exceed cutoff_len, how many would lose their whole response (training drops those),
and how many tokens training would train. A sample the template cannot render is reported as invalid too.
The set is clean when no record is invalid (samples dropped by cutoff_len are a warning, not an error).
"""
from __future__ import annotations

from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

from tunelab.data.readers import InvalidRecord
from tunelab.data.registry import DatasetSpec
from tunelab.data.template import ChatTemplate
from tunelab.datatools.numbers import distribution_line
from tunelab.datatools.source import iter_conversations
from tunelab.datatools.tokens import Progress, measure


@dataclass
class ValidationReport:
    spec: DatasetSpec
    valid: int = 0
    invalid: int = 0
    template: str | None = None
    cutoff_len: int | None = None
    lengths: array = field(default_factory=lambda: array("q"))  # tokens per valid sample, before truncation
    over_cutoff: int = 0
    dropped: int = 0
    trained_tokens: int = 0

    @property
    def clean(self) -> bool:
        return self.invalid == 0

    def lines(self) -> list[str]:
        s = self.spec
        total = self.valid + self.invalid
        lines = [f"{s.where} ({s.formatting}): {total:,} record{_s(total)}, {self.valid:,} valid, "
                 f"{self.invalid:,} invalid."]
        if self.template is None:
            return lines
        measured = len(self.lengths)
        lines.append(f"Tokens per sample with template {self.template!r} (before truncation):")
        lines.append("  " + distribution_line("tokens", self.lengths))
        if self.cutoff_len is not None:
            lines.append(f"  over cutoff_len {self.cutoff_len:,}: {self.over_cutoff:,} of {measured:,} "
                         f"sample{_s(measured)} ({_pct(self.over_cutoff, measured)}) would be truncated")
        lines.append(f"  whole response lost: {self.dropped:,} sample{_s(self.dropped)} "
                     "(training drops such samples)")
        lines.append(f"  trained tokens{' (after truncation)' if self.cutoff_len else ''}: {self.trained_tokens:,}")
        return lines


def validate_dataset(
    spec: DatasetSpec, on_invalid: Callable[[InvalidRecord], None], *, template: ChatTemplate | None = None,
    cutoff_len: int | None = None, workers: int = 1, progress: Progress | None = None,
) -> ValidationReport:
    """Check every record (on_invalid gets each invalid one, in file order); measure tokens when given a template."""
    report = ValidationReport(spec, template=template.name if template else None, cutoff_len=cutoff_len)

    def count_invalid(invalid: InvalidRecord) -> None:
        report.invalid += 1
        on_invalid(invalid)

    conversations = iter_conversations(spec, count_invalid)
    if template is None:
        for _ in conversations:
            report.valid += 1
        return report
    for m in measure(conversations, template, cutoff_len, workers, progress):
        if m.error is not None:
            count_invalid(InvalidRecord(m.source, m.error))
            continue
        report.valid += 1
        report.lengths.append(m.tokens)
        report.over_cutoff += cutoff_len is not None and m.tokens > cutoff_len
        report.dropped += m.dropped
        report.trained_tokens += m.trained
    return report


def _s(n: int) -> str:
    return "" if n == 1 else "s"


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "0%"
