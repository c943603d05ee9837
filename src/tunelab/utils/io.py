"""Atomic file writes: write to a temporary name beside the target, then rename, so a crash never leaves half a file."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any


_UMASK: int | None = None


def current_umask() -> int:
    """The process umask (read once: os.umask can only be read by setting it)."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return _UMASK


def default_file_mode() -> int:
    """The mode open() gives a new file under the umask (0644 with the usual 022)."""
    return 0o666 & ~current_umask()


def honour_umask(root: str) -> None:
    """Give files written through a temporary file (mkstemp and safetensors create them 0600) the mode a plain
    open() would have, under `root` (a file or a folder, recursively). Files with any other mode are left alone."""
    paths = [root] if os.path.isfile(root) else [os.path.join(d, n) for d, _, names in os.walk(root) for n in names]
    mode = default_file_mode()
    for path in paths:
        try:
            st = os.lstat(path)
            if (st.st_mode & 0o777) == 0o600 and mode != 0o600 and os.path.isfile(path) and not os.path.islink(path):
                os.chmod(path, mode)
        except OSError:  # a file removed meanwhile, or one we do not own
            continue


def atomic_write_text(path: str, text: str, encoding: str = "utf-8") -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, "w", encoding=encoding) as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, default_file_mode())  # mkstemp makes 0600; the result should read like any other output
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str, data: Any, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


def append_jsonl(path: str, record: dict[str, Any]) -> None:
    """Append one JSON line and flush it to disk (a log that survives a kill up to its last full line)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        fh.flush()


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The records of a JSON-lines log; a missing file gives [] and a line cut by a kill is skipped."""
    records: list[dict[str, Any]] = []
    if not os.path.isfile(path):
        return records
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
    return records
