"""What the `tunelab data` jobs share: local dataset specs, streamed conversations, atomic JSON / JSONL writers.

    spec = local_spec("alpaca_zh_demo", "data")             # a registered name or a path (tunelab.data.registry)
    for conv in iter_conversations(spec, on_invalid=log):   # readers.iter_records -> formats.convert_record
        ...
    with RecordWriter("out.json") as out:                  # written to a hidden temp file beside out.json ...
        out.write({"instruction": "Hi", "output": "Hello"})
        out.commit()                                        # ... and renamed only here; any error discards it

A .json output is an array laid out exactly as `json.dumps(records, indent=2, ensure_ascii=False)` would lay it
out (LLaMA-Factory's own data files look like that), but written record by record, so memory stays bounded.
A .jsonl output has one compact record per line.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from tunelab.data.conversation import Conversation
from tunelab.data.formats import RecordError, convert_record
from tunelab.data.readers import InvalidRecord, iter_records
from tunelab.data.registry import DatasetSpec, resolve_dataset
from tunelab.errors import ConfigError, DataError

OUTPUT_KINDS = {".json": "json", ".jsonl": "jsonl"}


def local_spec(name: str, dataset_dir: str = "data") -> DatasetSpec:
    """Resolve a registered name or a path to a local file spec; hub datasets are refused with what to do."""
    spec = resolve_dataset(name, dataset_dir)
    if spec.load_from != "file":
        hub = "ModelScope" if spec.load_from == "ms_hub" else "the Hugging Face Hub"
        raise DataError(f"Dataset {name!r} is on {hub} ({spec.where}); `tunelab data` works on local files. "
                        "Download it first (for example `huggingface-cli download --repo-type dataset "
                        f"{spec.where} --local-dir data/{name}`) and give the file or folder instead.")
    return spec


def raise_invalid(invalid: InvalidRecord) -> None:
    """The default on_invalid: stop at the first invalid record (the readers' message)."""
    raise DataError(f"{invalid.location}: {invalid.reason}.")


class InvalidLog:
    """An on_invalid callback that counts invalid records and keeps the first `keep` for the summary."""

    def __init__(self, keep: int = 5) -> None:
        self.keep = keep
        self.count = 0
        self.first: list[InvalidRecord] = []

    def __call__(self, invalid: InvalidRecord) -> None:
        self.count += 1
        if len(self.first) < self.keep:
            self.first.append(invalid)

    def summary(self) -> str:
        """'' when nothing was invalid, else a few lines naming the first ones."""
        if not self.count:
            return ""
        lines = [f"Skipped {self.count:,} invalid record{'s' if self.count != 1 else ''}:"]
        lines += [f"  {item}" for item in self.first]
        if self.count > len(self.first):
            lines.append(f"  ... and {self.count - len(self.first):,} more (`tunelab data validate` lists them all).")
        return "\n".join(lines)


def iter_conversations(
    spec: DatasetSpec, on_invalid: Callable[[InvalidRecord], None] = raise_invalid, *, require_reply: bool = True
) -> Iterator[Conversation]:
    """Stream a local dataset's valid conversations; each invalid record (unreadable or unconvertible) goes to
    on_invalid with its location and the same reason training would give. File-level problems raise DataError."""
    for location, record in iter_records(str(spec.path), on_error=on_invalid):
        try:
            yield convert_record(record, spec, location, require_reply=require_reply)
        except RecordError as e:
            on_invalid(InvalidRecord(location, e.reason))


def output_kind(path: str) -> str:
    """"json" or "jsonl" from the output file's suffix."""
    kind = OUTPUT_KINDS.get(os.path.splitext(path)[1].lower())
    if kind is None:
        raise ConfigError(f"Cannot write {path}: the output must end in .json (a JSON array) or .jsonl "
                          "(one record per line).")
    return kind


class RecordWriter:
    """Stream records into a temp file beside `path`; `commit()` renames it into place, anything else deletes it."""

    def __init__(self, path: str, kind: str | None = None) -> None:
        self.path = path
        self.kind = kind or output_kind(path)
        self.count = 0
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        self._fh = os.fdopen(fd, "w", encoding="utf-8")
        self._done = False

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.discard()

    def write(self, record: dict[str, Any]) -> None:
        if self.kind == "jsonl":
            self._fh.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        else:
            # indent=2 escapes newlines inside strings, so re-indenting by 2 gives json.dumps(list, indent=2).
            text = json.dumps(record, ensure_ascii=False, indent=2, default=str).replace("\n", "\n  ")
            self._fh.write(("[\n  " if self.count == 0 else ",\n  ") + text)
        self.count += 1

    def commit(self) -> None:
        """Finish the file and rename it to `path` (readers see the old file or the whole new one)."""
        if self.kind == "json":
            self._fh.write("\n]\n" if self.count else "[]\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.chmod(self._tmp, 0o666 & ~_umask())
        os.replace(self._tmp, self.path)
        self._done = True

    def discard(self) -> None:
        """Delete the temp file unless committed (safe to call more than once)."""
        if self._done:
            return
        self._fh.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)
        self._done = True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
