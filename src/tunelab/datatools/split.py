"""`tunelab data split`: a reproducible random train / eval selection, written as <name>_train / <name>_eval.

    result = split_file("math.json", train="2000", eval_="200", seed=42, head=0.9, out_dir=".")

Two streaming passes over the file: the first counts its records, the second copies the selected ones (as they
are, in file order), so memory holds only the chosen indices. Selection uses `random.Random(seed)`:
- with `head`, train is drawn from the first floor(head * total) records and eval from the rest (the math tutorial's
  "first 90% / last 10%"), so the two can never overlap, and a fraction means a fraction of that part;
- without it, one seeded shuffle of all records gives train its first N and eval the next M (no overlap either),
  and a fraction means a fraction of all records.
A count is a whole number ("2000"); a fraction has a point ("0.1", "1.0") and is rounded down, except that two
fractions adding up to 1 (--train 0.8 --eval 0.2) give eval the rest, so every record lands in one file (254
records: 203 + 51). Asking for more records than there are
is an error (never a silent shorter file). Outputs keep .json / .jsonl; other inputs are written as .json.
Both files are written to temp names and renamed together at the end.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass

from tunelab.data.readers import InvalidRecord, iter_records
from tunelab.datatools.source import InvalidLog, RecordWriter, raise_invalid
from tunelab.errors import ConfigError, DataError


@dataclass
class SplitResult:
    total: int
    train_path: str
    eval_path: str | None
    train: int
    eval: int
    pools: tuple[range, range]
    skipped: InvalidLog


def parse_amount(text: str, option: str) -> int | float:
    """ "2000" -> 2000 (a count); "0.1" -> 0.1 (a fraction in [0, 1])."""
    try:
        value = float(text) if "." in text or "e" in text.lower() else int(text)
    except ValueError:
        raise ConfigError(f"{option} must be a number of records (2000) or a fraction (0.1), not {text!r}.") from None
    if value < 0 or (isinstance(value, float) and value > 1):
        raise ConfigError(f"{option} must be a count >= 0 or a fraction between 0 and 1, not {text!r}.")
    return value


def split_file(
    src: str, *, train: str, eval_: str = "0", seed: int = 42, head: float | None = None, out_dir: str = ".",
    skip_invalid: bool = False,
) -> SplitResult:
    train_amount, eval_amount = parse_amount(train, "--train"), parse_amount(eval_, "--eval")
    if head is not None and not 0 < head < 1:
        raise ConfigError(f"--head must be a fraction between 0 and 1 (exclusive), not {head}.")
    log = InvalidLog()
    on_invalid: Callable[[InvalidRecord], None] = log if skip_invalid else raise_invalid
    total = sum(1 for _ in iter_records(src, on_error=on_invalid))
    if total == 0:
        raise DataError(f"{src} has no valid records to split." + (f"\n{log.summary()}" if log.count else ""))
    pools = _pools(total, head)
    rng = random.Random(seed)
    if head is None:
        n_train = _count(train_amount, total, "--train", "records", total)
        n_eval = _count(eval_amount, total, "--eval", "records", total)
        if _whole(train_amount, eval_amount):
            n_eval = total - n_train  # 0.8 + 0.2 of 254: 203 + 51, every record (rounding down both would drop one)
        if n_train + n_eval > total:
            raise DataError(f"{src} has {total:,} records, fewer than --train {n_train:,} + --eval {n_eval:,}.")
        order = list(range(total))
        rng.shuffle(order)
        chosen_train, chosen_eval = set(order[:n_train]), set(order[n_train:n_train + n_eval])
    else:
        n_train = _count(train_amount, len(pools[0]), "--train", f"records in its first {head:g}", total)
        n_eval = _count(eval_amount, len(pools[1]), "--eval", f"records after its first {head:g}", total)
        chosen_train, chosen_eval = set(rng.sample(pools[0], n_train)), set(rng.sample(pools[1], n_eval))
    train_path, eval_path = output_paths(src, out_dir)
    _write(src, train_path, chosen_train, eval_path if n_eval else None, chosen_eval, skip_invalid)
    return SplitResult(total, train_path, eval_path if n_eval else None, n_train, n_eval, pools, log)


def output_paths(src: str, out_dir: str) -> tuple[str, str]:
    """<out_dir>/<name>_train.<ext> and _eval; ext is the input's when .json/.jsonl, else json."""
    base = os.path.basename(os.path.normpath(src))
    name, ext = os.path.splitext(base) if os.path.isfile(src) else (base, "")
    ext = ext.lower() if ext.lower() in (".json", ".jsonl") else ".json"
    return os.path.join(out_dir, f"{name}_train{ext}"), os.path.join(out_dir, f"{name}_eval{ext}")


def _pools(total: int, head: float | None) -> tuple[range, range]:
    if head is None:
        return range(total), range(total)
    cut = math.floor(round(head * total, 6))  # round first: 0.29 * 100 is 28.999999999999996
    return range(cut), range(cut, total)


def _whole(train: int | float, eval_: int | float) -> bool:
    """Two fractions that add up to 1: together they mean every record."""
    return isinstance(train, float) and isinstance(eval_, float) and abs(train + eval_ - 1.0) < 1e-9


def _count(amount: int | float, available: int, option: str, what: str, total: int) -> int:
    n = math.floor(round(amount * available, 6)) if isinstance(amount, float) else amount
    if n > available:
        raise DataError(f"{option} {n:,} asks for more records than the file has {what} ({available:,} of "
                        f"{total:,}).")
    return n


def _write(
    src: str, train_path: str, train: set[int], eval_path: str | None, evaluation: set[int], skip_invalid: bool
) -> None:
    on_invalid: Callable[[InvalidRecord], None] = InvalidLog() if skip_invalid else raise_invalid
    with contextlib.ExitStack() as stack:
        train_out = stack.enter_context(RecordWriter(train_path))
        eval_out = stack.enter_context(RecordWriter(eval_path)) if eval_path else None
        for index, (_, record) in enumerate(iter_records(src, on_error=on_invalid)):
            if index in train:
                train_out.write(record)
            elif eval_out is not None and index in evaluation:
                eval_out.write(record)
        train_out.commit()
        if eval_out is not None:
            eval_out.commit()
