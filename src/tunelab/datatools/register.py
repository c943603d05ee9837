"""`tunelab data register NAME FILE`: add or update a dataset_info.json entry, after validating the file.

    result = register_dataset("math", "data/math.json", dataset_dir="data")     # formatting detected
    register_dataset("chat", "chat.jsonl", formatting="sharegpt", columns="messages=dialog", force=True)

The entry is built from the file's first record (formatting, and columns / tags such as ShareGPT turns stored under
'messages' with user/assistant roles), overridden by what the user gives; then every record is checked with that
entry (the training rules), and only a clean file is registered, through registry.write_registry_entry: atomic,
every other entry kept, a different entry under the same name refused without force.

An entry with a "columns" (or "tags") object reads exactly what it names, in LLaMA-Factory and in tunelab's registry
alike (every other column or tag is unused). So register writes either no "columns" object, when the entry's
defaults read the file (LLaMA-Factory's: instruction/input/output, or conversations for every turn-list format),
or a complete one: the format's formats.ENTRY_COLUMNS, the detected turns column, the optional columns (system,
history for alpaca; system, tools for the others) that some record of the file has, and the user's --columns.
Tags likewise: none, or all seven (formats.DEFAULT_TAGS, detected roles, --tags). The entry then reads the same
in both tools. file_name is relative to dataset_dir when the file lies inside it, else absolute.
"""
from __future__ import annotations

import contextlib
import difflib
import os
from dataclasses import dataclass
from typing import Any

from tunelab.data.formats import DEFAULT_TAGS, ENTRY_COLUMNS, FORMATS, RecordError, detect_format, detect_mapping
from tunelab.data.readers import iter_records
from tunelab.data.registry import COLUMN_KEYS, TAG_KEYS, load_registry, parse_entry, registry_path, write_registry_entry
from tunelab.datatools.convert import parse_pairs
from tunelab.datatools.source import InvalidLog
from tunelab.datatools.validate import validate_dataset
from tunelab.errors import ConfigError, DataError


@dataclass
class RegisterResult:
    path: str  # the registry file
    entry: dict[str, Any]
    status: str  # "added", "replaced" or "unchanged"
    records: int


def register_dataset(
    name: str, file: str, *, dataset_dir: str = "data", formatting: str | None = None, columns: str | None = None,
    tags: str | None = None, force: bool = False,
) -> RegisterResult:
    path = _locate(file, dataset_dir)
    entry = build_entry(path, dataset_dir, formatting, _pairs(columns, "--columns", COLUMN_KEYS),
                        _pairs(tags, "--tags", TAG_KEYS))
    spec = parse_entry(name, entry, dataset_dir, registry_path(dataset_dir))
    log = InvalidLog()
    report = validate_dataset(spec, log)
    if log.count or not report.valid:
        detail = log.summary().replace("Skipped", "Found", 1) if log.count else f"{path} has no records."
        raise DataError(f"Not registering {name!r}: {path} does not pass validation with the entry "
                        f"{entry}.\n{detail}\nFix the file, or give --formatting / --columns / --tags that match it.")
    existing = load_registry(dataset_dir).get(name)
    written = write_registry_entry(dataset_dir, name, entry, force=force)
    status = "added" if existing is None else "unchanged" if existing == entry else "replaced"
    return RegisterResult(written, entry, status, report.valid)


def build_entry(
    path: str, dataset_dir: str, formatting: str | None, columns: dict[str, str], tags: dict[str, str]
) -> dict[str, Any]:
    """The dataset_info.json entry: file_name, formatting, and complete columns / tags where defaults do not do."""
    record = _first_record(path)
    if formatting is None:
        try:
            formatting, _ = detect_format(record)
        except RecordError as e:
            raise DataError(f"Cannot tell the format of {path} from its first record: {e.reason}. Give "
                            "--formatting (and --columns / --tags).") from None
    elif formatting not in FORMATS:
        raise ConfigError(f"--formatting must be one of {', '.join(FORMATS)}, not {formatting!r}.")
    detected_columns, detected_tags = detect_mapping(record, formatting)
    if columns.get("messages"):  # user-named turns column: detect roles from it, not from the default one
        detected_columns, detected_tags = detect_mapping({"conversations": record.get(columns["messages"])},
                                                         formatting)
        detected_columns.pop("messages", None)
    entry: dict[str, Any] = {"file_name": _file_name(path, dataset_dir), "formatting": formatting}
    lf = "alpaca" if formatting == "alpaca" else "sharegpt"  # LLaMA-Factory's defaults for this kind of entry
    cols = {k: detected_columns.get(k, v) for k, v in ENTRY_COLUMNS[formatting].items()}
    cols.update({k: detected_columns[k] for k in _optional_columns(path, formatting) if k in detected_columns})
    cols.update(columns)
    if not cols == ENTRY_COLUMNS[formatting] == ENTRY_COLUMNS[lf]:
        entry["columns"] = cols
    tgs = {**DEFAULT_TAGS[formatting], **detected_tags, **tags}
    if formatting != "alpaca" and not tgs == DEFAULT_TAGS[formatting] == DEFAULT_TAGS[lf]:
        entry["tags"] = tgs
    return entry


def _optional_columns(path: str, formatting: str) -> set[str]:
    """The optional columns (system, history / tools) that at least one record of the file has, not empty."""
    wanted = ("system", "history") if formatting == "alpaca" else ("system", "tools")
    found: set[str] = set()
    with contextlib.closing(iter_records(path, on_error=InvalidLog(keep=0))) as records:
        for _, record in records:
            found.update(k for k in wanted if record.get(k) not in (None, "", []))
            if len(found) == len(wanted):
                break
    return found


def _locate(file: str, dataset_dir: str) -> str:
    for candidate in (file, os.path.join(dataset_dir, file)):
        if os.path.exists(candidate):
            return candidate
    raise DataError(f"{file} does not exist (looked in the working directory and in {dataset_dir}).")


def _file_name(path: str, dataset_dir: str) -> str:
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(dataset_dir))
    return os.path.abspath(path) if rel == ".." or rel.startswith(".." + os.sep) else rel


def _first_record(path: str) -> dict[str, Any]:
    invalid = InvalidLog(keep=1)
    with contextlib.closing(iter_records(path, on_error=invalid)) as records:
        for _, record in records:
            return record
    raise DataError(f"{path} has no readable record; the first problem: {invalid.first[0]}.")


def _pairs(text: str | None, option: str, allowed: frozenset[str]) -> dict[str, str]:
    pairs = dict(parse_pairs(text, option))
    for key in pairs:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{option}: {key!r} is not a dataset_info.json key ({', '.join(sorted(allowed))})."
                              f"{hint}")
    return pairs
