"""Length distributions as text: min/mean/p50/p90/p99/max and power-of-two histograms (validate and stats).

    lengths = array("q", [12, 40, 300])
    print(distribution_line("prompt chars", lengths))   # prompt chars: min 12, mean 117.3, p50 40, ...
    print("\n".join(histogram_lines(lengths)))          # one '#' bar per power-of-two bucket

Percentiles are nearest-rank (the smallest value with at least q% of the values at or below it), so each one is a
value that occurs in the data.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

PERCENTILES = (50, 90, 99)


def percentile(sorted_values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile of already sorted values (non-empty)."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def describe(values: Sequence[int]) -> dict[str, float]:
    """{"count", "min", "mean", "p50", "p90", "p99", "max"} (empty values give count 0 only)."""
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    out: dict[str, float] = {"count": len(ordered), "min": ordered[0], "mean": sum(ordered) / len(ordered)}
    out.update({f"p{q}": percentile(ordered, q) for q in PERCENTILES})
    out["max"] = ordered[-1]
    return out


def distribution_line(label: str, values: Sequence[int]) -> str:
    """'label: min 3, mean 12.5, p50 10, p90 20, p99 31, max 31'."""
    d = describe(values)
    if not d["count"]:
        return f"{label}: no values"
    parts = [f"min {d['min']:,}", f"mean {d['mean']:,.1f}"]
    parts += [f"p{q} {d[f'p{q}']:,}" for q in PERCENTILES]
    parts.append(f"max {d['max']:,}")
    return f"{label}: " + ", ".join(parts)


def bucket_bounds(values: Sequence[int], exact: bool = False) -> list[tuple[int, int, int]]:
    """(low, high, count) per power-of-two bucket [2^(k-1), 2^k - 1] ({0} is its own bucket), min to max;
    exact=True gives one bucket per value instead (for small counts such as turns)."""
    if exact:
        counts = Counter(int(v) for v in values)
        return [(v, v, counts.get(v, 0)) for v in range(min(counts), max(counts) + 1)] if counts else []
    counts = Counter(int(v).bit_length() for v in values)
    if not counts:
        return []
    return [(0 if k == 0 else 1 << (k - 1), 0 if k == 0 else (1 << k) - 1, counts.get(k, 0))
            for k in range(min(counts), max(counts) + 1)]


def histogram_lines(values: Sequence[int], width: int = 40, exact: bool = False) -> list[str]:
    """'   64-127     | ########  1,234' lines; the longest bar is `width` characters."""
    buckets = bucket_bounds(values, exact)
    if not buckets:
        return []
    peak = max(c for _, _, c in buckets)
    labels = [f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}" for lo, hi, _ in buckets]
    pad = max(len(label) for label in labels)
    lines = []
    for label, (_, _, count) in zip(labels, buckets):
        bar = "#" * (round(width * count / peak) if count else 0)
        lines.append(f"  {label:>{pad}} | {bar:<{width}} {count:,}")
    return lines
