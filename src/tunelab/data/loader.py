"""Load datasets by name into `Conversation`s: registry -> readers (or the hub) -> format converters.

    from tunelab.data.loader import load_conversations
    result = load_conversations("alpaca_zh_demo,identity", "data", max_samples=1000, skip_invalid=True)
    result.conversations, result.skipped, result.errors, result.per_dataset

Datasets are concatenated in the order given. Per dataset, as in LLaMA-Factory: the registry's `num_samples`
resamples it (a seeded shuffle, repeating records when num_samples is larger; ignored when streaming), then
`max_samples` keeps the first N valid conversations (reading stops there).

Invalid records: by default the whole input is checked and one DataError lists the first few problems with their
locations and the total; `skip_invalid=True` skips them and reports them in `.skipped` / `.errors` (the caller
logs that). When streaming, `.conversations` is an iterator, the counters fill in as it is consumed, and without
skip_invalid the first invalid record raises.

Hub datasets are loaded lazily with `datasets.load_dataset` (or ModelScope's MsDataset for ms_hub entries).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from tunelab.data.conversation import Conversation
from tunelab.data.formats import RecordError, convert_record
from tunelab.data.readers import InvalidRecord, data_files, iter_records
from tunelab.data.registry import DatasetSpec, resolve_dataset
from tunelab.errors import DataError

logger = logging.getLogger(__name__)

# Bump when conversion rules change, so cached tokenized datasets keyed by content_fingerprint are rebuilt.
FINGERPRINT_VERSION = 1


@dataclass
class LoadResult:
    """What load_conversations read. When streaming, the counters grow as `conversations` is consumed."""

    conversations: list[Conversation] | Iterator[Conversation]
    skipped: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)
    per_dataset: dict[str, int] = field(default_factory=dict)


def load_conversations(
    names: str | list[str],
    dataset_dir: str = "data",
    *,
    max_samples: int | None = None,
    skip_invalid: bool = False,
    split: str | None = None,
    streaming: bool = False,
    max_errors_shown: int = 5,
    require_reply: bool = True,
    seed: int = 42,
    use_modelscope: bool | None = None,
) -> LoadResult:
    """Load one or more datasets ("a,b" or ["a", "b"]) as Conversations.

    split: the hub split to load (default: the entry's split, "train"); local files have no splits.
    require_reply: samples must end with an assistant reply (training); False accepts prompts.
    seed: for num_samples resampling.
    """
    if max_samples is not None and max_samples < 1:
        raise DataError(f"max_samples must be a positive integer, not {max_samples!r}.")
    specs = [resolve_dataset(n, dataset_dir, use_modelscope=use_modelscope) for n in split_names(names)]
    result = LoadResult(conversations=[])
    sink = _ErrorSink(result, fail_fast=streaming and not skip_invalid)
    options = _Options(max_samples, split, streaming, require_reply, random.Random(seed))
    if streaming:
        result.conversations = _stream(specs, sink, options)
        return result
    empty = []
    for spec in specs:
        loaded = list(_dataset_conversations(spec, sink, options))
        result.conversations.extend(loaded)  # type: ignore[union-attr]
        empty += [] if loaded else [spec]
    if result.errors and not skip_invalid:
        raise DataError(_invalid_message(result.errors, max_errors_shown))
    if empty:
        raise _no_records_error(empty[0], result)
    return result


def split_names(names: str | Iterable[str]) -> list[str]:
    """ "a, b" or ["a", "b,c"] -> ["a", "b", "c"]; an empty list is an error."""
    parts = [names] if isinstance(names, str) else list(names)
    out = [n.strip() for part in parts for n in str(part).split(",") if n.strip()]
    if not out:
        raise DataError("No dataset given: set `dataset` to one or more names separated by commas.")
    return out


def content_fingerprint(names: str | list[str], dataset_dir: str = "data") -> str:
    """A hash of the resolved specs and their files' paths, sizes and mtimes, for the tokenized-data cache key.

    Loading options (max_samples, template, cutoff_len, ...) are not included: the caller adds them.
    """
    digest = hashlib.sha256(f"tunelab-data-v{FINGERPRINT_VERSION}\n".encode())
    for name in split_names(names):
        spec = resolve_dataset(name, dataset_dir)
        described = asdict(spec)
        described["path"] = os.path.abspath(spec.path) if spec.path else None
        digest.update(json.dumps(described, sort_keys=True).encode())
        for file in data_files(spec.path) if spec.load_from == "file" else []:
            stat = os.stat(file)
            digest.update(f"\n{os.path.abspath(file)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- per dataset


@dataclass
class _Options:
    max_samples: int | None
    split: str | None
    streaming: bool
    require_reply: bool
    rng: random.Random


class _ErrorSink:
    """Collects invalid records into the result; when streaming without skip_invalid, the first one raises."""

    def __init__(self, result: LoadResult, fail_fast: bool) -> None:
        self.result = result
        self.fail_fast = fail_fast

    def __call__(self, invalid: InvalidRecord) -> None:
        if self.fail_fast:
            raise DataError(f"Invalid record at {invalid.location}: {invalid.reason}. Fix it, or set "
                            "`skip_invalid: true` to skip invalid records.")
        self.result.errors.append((invalid.location, invalid.reason))
        self.result.skipped += 1


def _stream(specs: list[DatasetSpec], sink: _ErrorSink, options: _Options) -> Iterator[Conversation]:
    for spec in specs:
        count = 0
        for conversation in _dataset_conversations(spec, sink, options):
            count += 1
            yield conversation
        if count == 0:
            raise _no_records_error(spec, sink.result)


def _no_records_error(spec: DatasetSpec, result: LoadResult) -> DataError:
    skipped = f" ({result.skipped} invalid records were skipped)" if result.skipped else ""
    return DataError(f"Dataset {spec.name!r} ({spec.where}) has no valid records{skipped}.")


def _dataset_conversations(spec: DatasetSpec, sink: _ErrorSink, options: _Options) -> Iterator[Conversation]:
    """One dataset's conversations after num_samples and max_samples, counted in result.per_dataset."""
    conversations: Iterable[Conversation] = _convert(spec, sink, options)
    if spec.num_samples is not None:
        if options.streaming:
            logger.warning("num_samples of dataset %r is ignored when streaming.", spec.name)
        else:
            conversations = _resample(list(conversations), spec.num_samples, options.rng)
    if options.max_samples is not None:
        conversations = itertools.islice(conversations, options.max_samples)
    per_dataset = sink.result.per_dataset
    per_dataset.setdefault(spec.name, 0)
    for conversation in conversations:
        per_dataset[spec.name] += 1
        yield conversation


def _convert(spec: DatasetSpec, sink: _ErrorSink, options: _Options) -> Iterator[Conversation]:
    for location, record in _records(spec, sink, options):
        try:
            yield convert_record(record, spec, location, require_reply=options.require_reply)
        except RecordError as e:
            sink(InvalidRecord(location, e.reason))


def _resample(items: list[Conversation], n: int, rng: random.Random) -> list[Conversation]:
    """LLaMA-Factory's num_samples: a shuffled subset, or every record plus random repeats when n is larger."""
    if not items:
        return items
    order = list(range(len(items)))
    rng.shuffle(order)
    order = order[:n] + [rng.randrange(len(items)) for _ in range(n - len(items))]
    return [items[i] for i in order]


# ----------------------------------------------------------------------------------------------- sources


def _records(spec: DatasetSpec, sink: _ErrorSink, options: _Options) -> Iterator[tuple[str, Any]]:
    if spec.load_from == "file":
        return iter_records(str(spec.path), on_error=sink)
    return _hub_records(spec, options.split or spec.split, options.streaming)


def _hub_records(spec: DatasetSpec, split: str, streaming: bool) -> Iterator[tuple[str, Any]]:
    dataset = _load_ms(spec, split, streaming) if spec.load_from == "ms_hub" else _load_hf(spec, split, streaming)
    rows = iter(dataset)
    for index in itertools.count():
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:  # network errors surface here when streaming
            raise DataError(f"Reading dataset {spec.name!r} ({spec.where}) failed at record {index}: "
                            f"{type(e).__name__}: {e}") from e
        yield f"{spec.where}:{split}[{index}]", row


def _load_hf(spec: DatasetSpec, split: str, streaming: bool) -> Any:
    import datasets

    try:
        return datasets.load_dataset(spec.hf_hub_url, name=spec.subset, data_dir=spec.folder, split=split,
                                     streaming=streaming)
    except Exception as e:  # datasets raises many types for "offline", "not found", "no such split"
        raise DataError(_download_failed(spec, "the Hugging Face Hub", e)) from e


def _load_ms(spec: DatasetSpec, split: str, streaming: bool) -> Any:
    try:
        from modelscope import MsDataset
    except ImportError:
        alt = " Or unset USE_MODELSCOPE_HUB to use the Hugging Face Hub copy." if spec.hf_hub_url else ""
        raise DataError(f"Dataset {spec.name!r} is on ModelScope ({spec.ms_hub_url}), which needs the modelscope "
                        f"package: pip install modelscope (or pip install 'tunelab[modelscope]').{alt}") from None
    try:
        dataset = MsDataset.load(dataset_name=spec.ms_hub_url, subset_name=spec.subset, data_dir=spec.folder,
                                 split=split, use_streaming=streaming)
    except Exception as e:
        raise DataError(_download_failed(spec, "ModelScope", e)) from e
    return dataset.to_hf_dataset() if hasattr(dataset, "to_hf_dataset") else dataset


def _download_failed(spec: DatasetSpec, hub: str, error: Exception) -> str:
    return (f"Dataset {spec.name!r} could not be downloaded from {hub} ({spec.where}): {type(error).__name__}: "
            f"{error}. Check the network connection and the dataset id, or download it and use a local file "
            "(a path, or file_name in dataset_info.json).")


def _invalid_message(errors: list[tuple[str, str]], shown: int) -> str:
    lines = [f"{len(errors)} invalid record{'s' if len(errors) != 1 else ''}:"]
    lines += [f"  {location}: {reason}" for location, reason in errors[:shown]]
    if len(errors) > shown:
        lines.append(f"  ... and {len(errors) - shown} more.")
    lines.append("Fix them, or set `skip_invalid: true` to skip invalid records (the number skipped is reported).")
    return "\n".join(lines)
