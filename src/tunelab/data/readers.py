"""File readers: stream the records (dicts) of a dataset file or folder, each with a location for messages.

    from tunelab.data.readers import iter_records
    for location, record in iter_records("data/train.jsonl"):   # ("data/train.jsonl:17", {...})
        ...

Locations: "f.jsonl:17" / "f.txt:17" (1-based line), "f.json[3]" / "f.parquet[12]" / "f.arrow[12]" (0-based
index), "f.csv:row 5" (1-based data row, the header not counted). A folder reads its data files in sorted name
order (not recursively; hidden files, other extensions and `datasets`' metadata files are ignored).

Types: .json (an array of objects, or JSON Lines content), .jsonl, .csv (every value is text), .parquet,
.arrow (`datasets.save_to_disk` output or any Arrow IPC stream/file), .txt (each non-blank line -> {"text": line}).
jsonl, txt, csv, parquet and arrow stream with bounded memory; a .json array is parsed whole.

Two kinds of problems:
- a bad record (a line that is not valid JSON, a record that is not an object, a CSV row with the wrong number
  of fields) is reported as an `InvalidRecord(location, reason)`: with `on_error=None` iter_records raises a
  DataError for the first one; with `on_error=callback` it calls the callback and goes on (how the loader's
  `skip_invalid` and `tunelab data validate` collect every problem in one pass);
- a bad file (missing, empty, unsupported type, not UTF-8, a truncated JSON array or Parquet file) always
  raises a DataError: skipping records cannot fix it. Text that is not UTF-8 is a file problem (the whole file
  has to be re-saved), and the message says which encoding the bytes look like.
A UTF-8 byte-order mark is accepted.
"""
from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tunelab.errors import DataError


@dataclass(frozen=True)
class InvalidRecord:
    """A record that cannot be used: where it is and why, as a short sentence."""

    location: str
    reason: str

    def __str__(self) -> str:
        return f"{self.location}: {self.reason}"


OnError = Callable[[InvalidRecord], None]
Records = Iterator[tuple[str, dict[str, Any]]]

# Files that `datasets.save_to_disk` writes next to its .arrow data (and our own registry file).
METADATA_FILES = frozenset({"dataset_info.json", "state.json", "dataset_dict.json"})
_BOM = b"\xef\xbb\xbf"
_BATCH_ROWS = 1024


def iter_records(path: str, on_error: OnError | None = None) -> Records:
    """Stream (location, record) from a file or a folder of data files.

    on_error: None raises a DataError at the first invalid record; a callable receives each InvalidRecord and
    reading goes on. File-level problems raise a DataError either way.
    """
    for file in data_files(path):
        yield from _iter_file(file, on_error)


def data_files(path: str) -> list[str]:
    """The data files that `path` stands for: itself, or a folder's data files in sorted order."""
    if os.path.isfile(path):
        _check_extension(path)
        return [path]
    if os.path.isdir(path):
        return _folder_files(path)
    raise DataError(f"Dataset file {path} does not exist.")


def supported_extensions() -> tuple[str, ...]:
    return tuple(_READERS)


# ----------------------------------------------------------------------------------------------- per file


def _iter_file(file: str, on_error: OnError | None) -> Records:
    """Run the file type's reader; a file with no records at all (valid or not) is an error."""
    report = _Reporter(on_error)
    count = 0
    for location, record in _READERS[_extension(file)](file, report):
        count += 1
        yield location, record
    if count == 0 and report.count == 0:
        raise DataError(f"{file} is empty: it contains no records.")


class _Reporter:
    """Calls on_error for each invalid record (or raises for the first one) and counts them."""

    def __init__(self, on_error: OnError | None) -> None:
        self.on_error = on_error
        self.count = 0

    def __call__(self, invalid: InvalidRecord) -> None:
        self.count += 1
        if self.on_error is None:
            raise DataError(f"{invalid.location}: {invalid.reason}.")
        self.on_error(invalid)


def _extension(file: str) -> str:
    return os.path.splitext(file)[1].lower()


def _check_extension(file: str) -> None:
    if _extension(file) not in _READERS:
        kinds = ", ".join(_READERS)
        raise DataError(f"{file} has an unsupported file type ({_extension(file) or 'no extension'}); "
                        f"supported: {kinds}.")


def _folder_files(folder: str) -> list[str]:
    names = sorted(os.listdir(folder))
    if "dataset_dict.json" in names:
        raise DataError(f"{folder} holds several splits (a datasets DatasetDict); point at one split's folder, "
                        f"e.g. {os.path.join(folder, 'train')}.")
    files = [os.path.join(folder, n) for n in names
             if not n.startswith(".") and n not in METADATA_FILES and _extension(n) in _READERS]
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise DataError(f"Folder {folder} has no data files ({', '.join(_READERS)}).")
    return files


# ----------------------------------------------------------------------------------------------- text decoding


def _text_lines(file: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line with its line ending), reading bytes so memory stays bounded."""
    with open(file, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{file}:{lineno}: {_not_utf8(raw, e.start)}") from None


def _read_text(file: str) -> str:
    """A whole file as text (for a JSON array), with the same encoding checks as _text_lines."""
    with open(file, "rb") as fh:
        raw = fh.read()
    if raw.startswith(_BOM):
        raw = raw[len(_BOM):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        start = raw.rfind(b"\n", 0, e.start) + 1
        end = raw.find(b"\n", e.start)
        line = raw[start:end if end >= 0 else len(raw)]
        lineno = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{file}:{lineno}: {_not_utf8(line, e.start - start)}") from None


def _not_utf8(raw: bytes, offset: int) -> str:
    """Why the bytes are not UTF-8, and which encoding they look like."""
    where = f"the text is not valid UTF-8 (byte 0x{raw[offset]:02x} at byte {offset + 1} of the line)"
    guess = _guess_encoding(raw)
    if guess is None:
        return f"{where}. Re-save the file as UTF-8."
    return (f"{where}; it looks like {guess}. Re-save the file as UTF-8 "
            f"(for example: iconv -f {guess.split('/')[-1]} -t UTF-8 old > new).")


def _guess_encoding(raw: bytes) -> str | None:
    """A hint for the usual suspects: UTF-16 (BOM) and GBK/GB18030 (Chinese text from Windows tools)."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16"
    try:
        text = raw.decode("gb18030")
    except UnicodeDecodeError:
        return None
    if any("\u4e00" <= ch <= "\u9fff" for ch in text):
        return "GBK/GB18030"
    return None


# ----------------------------------------------------------------------------------------------- JSON


def _read_jsonl(file: str, report: OnError) -> Records:
    for lineno, line in _text_lines(file):
        text = line.strip()
        if not text:
            continue
        location = f"{file}:{lineno}"
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            report(InvalidRecord(location, _json_line_reason(e, text, last_line=not line.endswith("\n"))))
            continue
        if not isinstance(value, dict):
            report(InvalidRecord(location, f"the record is {_json_kind(value)}, not a JSON object"))
            continue
        yield location, value


def _json_line_reason(e: json.JSONDecodeError, text: str, last_line: bool) -> str:
    if e.pos >= len(text) or e.msg.startswith("Unterminated string"):
        if last_line:
            return "invalid JSON: the line ends before the record is complete; the file looks truncated"
        return "invalid JSON: the line ends before the record is complete (is a record split over several lines?)"
    return f"invalid JSON: {e.msg} at column {e.colno}"


def _read_json(file: str, report: OnError) -> Records:
    """A .json file holds an array of records, or JSON Lines content (detected from the first line)."""
    if _first_line_is_object(file):
        return _read_jsonl(file, report)
    return _read_json_array(file, report)


def _first_line_is_object(file: str) -> bool:
    with open(file, "rb") as fh:
        for raw in fh:
            text = raw.removeprefix(_BOM).decode("utf-8", errors="replace").strip()
            if text:
                if not text.startswith("{"):
                    return False
                try:
                    return isinstance(json.loads(text), dict)
                except json.JSONDecodeError:
                    return False
    return False


def _read_json_array(file: str, report: OnError) -> Records:
    text = _read_text(file)
    if not text.strip():
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(_json_file_error(file, e, text)) from None
    if isinstance(data, dict):
        raise DataError(f"{file} holds a single JSON object, not a list of records; write an array "
                        "[{...}, {...}] or one object per line (JSON Lines).")
    if not isinstance(data, list):
        raise DataError(f"{file} holds {_json_kind(data)}, not a list of records.")
    for index, item in enumerate(data):
        location = f"{file}[{index}]"
        if isinstance(item, dict):
            yield location, item
        else:
            report(InvalidRecord(location, f"the record is {_json_kind(item)}, not a JSON object"))


def _json_file_error(file: str, e: json.JSONDecodeError, text: str) -> str:
    if e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string"):
        return (f"{file}:{e.lineno}: invalid JSON: the file ends before the JSON is complete "
                f"(line {e.lineno}, column {e.colno}); it looks truncated.")
    return f"{file}:{e.lineno}: invalid JSON: {e.msg} at line {e.lineno}, column {e.colno}."


def _json_kind(value: Any) -> str:
    names = {list: "a list", str: "text", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), f"a {type(value).__name__}")


# ----------------------------------------------------------------------------------------------- CSV, text


def _read_csv(file: str, report: OnError) -> Records:
    """Rows as {header: text}; csv.reader pulls lines one at a time, so memory stays bounded."""
    reader = csv.reader(line for _, line in _text_lines(file))
    try:
        header = next(reader, None)
        if header is None:
            return
        row_number = 0
        for row in reader:
            if not row:
                continue
            row_number += 1
            location = f"{file}:row {row_number}"
            if len(row) != len(header):
                report(InvalidRecord(location, f"the row has {len(row)} fields but the header has {len(header)}"))
                continue
            yield location, dict(zip(header, row, strict=True))
    except csv.Error as e:
        raise DataError(f"{file}:{reader.line_num}: the CSV cannot be parsed ({e}).") from None


def _read_txt(file: str, report: OnError) -> Records:
    for lineno, line in _text_lines(file):
        text = line.rstrip("\r\n")
        if text.strip():
            yield f"{file}:{lineno}", {"text": text}


# ----------------------------------------------------------------------------------------------- columnar


def _read_parquet(file: str, report: OnError) -> Records:
    """Row group by row group (iter_batches), so a large file never sits in memory whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = 0
    try:
        parquet = pq.ParquetFile(file)
        for batch in parquet.iter_batches(batch_size=_BATCH_ROWS):
            for row in batch.to_pylist():
                yield f"{file}[{index}]", row
                index += 1
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{file} cannot be read as Parquet ({e}); it may be truncated or not a Parquet "
                        "file.") from None


def _read_arrow(file: str, report: OnError) -> Records:
    """Arrow IPC, stream format (what `datasets.save_to_disk` writes) or file format, batch by batch."""
    import pyarrow as pa

    index = 0
    try:
        with pa.memory_map(file) as source:
            for batch in _arrow_batches(source):
                for row in batch.to_pylist():
                    yield f"{file}[{index}]", row
                    index += 1
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{file} cannot be read as Arrow ({e}); it may be truncated or not an Arrow "
                        "file.") from None


def _arrow_batches(source: Any) -> Iterator[Any]:
    import pyarrow as pa

    is_file_format = source.read(6) == b"ARROW1"
    source.seek(0)
    if not is_file_format:
        yield from pa.ipc.open_stream(source)
        return
    reader = pa.ipc.open_file(source)
    for i in range(reader.num_record_batches):
        yield reader.get_batch(i)


_READERS: dict[str, Callable[[str, OnError], Records]] = {
    ".json": _read_json,
    ".jsonl": _read_jsonl,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
    ".arrow": _read_arrow,
    ".txt": _read_txt,
}
