"""The dataset registry: LLaMA-Factory's `dataset_info.json`, a few built-in hub datasets, and plain paths.

    from tunelab.data.registry import resolve_dataset
    spec = resolve_dataset("alpaca_gpt4_en", dataset_dir="data")   # -> DatasetSpec(load_from="hf_hub", ...)

A name is looked up in `<dataset_dir>/dataset_info.json`, then in BUILTIN_DATASETS, then taken as a path to a
file or folder (relative to the working directory, then to dataset_dir), whose format is detected from its
first record. `dataset_dir="ONLINE"` (LLaMA-Factory's convention) takes the name as a hub dataset id.
`dataset_dir="REMOTE:<repo>"` (LLaMA-Factory's registry read from a hub dataset repo) is refused with a sentence
saying how to use a local copy instead: nothing here downloads, and a registry fetched at run time would make the
meaning of a dataset name depend on the hub's state at that moment.

Hub entries prefer `hf_hub_url`; `ms_hub_url` is used when it is the only one, or when ModelScope is asked for
(`use_modelscope=True`, or LLaMA-Factory's USE_MODELSCOPE_HUB=1 environment variable when the argument is None).
Only the entry being resolved is validated, so one stale entry does not block the others; `check_registry`
validates them all (for `tunelab data validate`). `write_registry_entry` adds an entry atomically.
Nothing here downloads anything: the loader does that, lazily.
"""
from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from tunelab.data.formats import (
    DEFAULT_COLUMNS, DEFAULT_TAGS, ENTRY_COLUMNS, FORMATS, NON_SFT_COLUMNS, RecordError, detect_format, detect_mapping,
)
from tunelab.data.readers import iter_records
from tunelab.errors import DataError

logger = logging.getLogger(__name__)

REGISTRY_FILE = "dataset_info.json"
ONLINE = "ONLINE"
REMOTE = "REMOTE:"

LoadFrom = Literal["file", "hf_hub", "ms_hub"]
Formatting = Literal["alpaca", "sharegpt", "openai"]

BUILTIN_DATASETS: dict[str, dict[str, Any]] = {
    "alpaca_gpt4_en": {"hf_hub_url": "llamafactory/alpaca_gpt4_en", "ms_hub_url": "llamafactory/alpaca_gpt4_en",
                       "formatting": "alpaca"},
    "alpaca_gpt4_zh": {"hf_hub_url": "llamafactory/alpaca_gpt4_zh", "ms_hub_url": "llamafactory/alpaca_gpt4_zh",
                       "formatting": "alpaca"},
}

# Every key LLaMA-Factory reads from an entry; others are ignored with a warning (LF ignores them silently).
ENTRY_KEYS = frozenset({
    "file_name", "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name", "formatting",
    "ranking", "subset", "split", "folder", "num_samples", "columns", "tags",
})
COLUMN_KEYS = frozenset({
    "prompt", "query", "response", "history", "messages", "system", "tools", "images", "videos", "audios",
    "chosen", "rejected", "kto_tag",
})
TAG_KEYS = frozenset(DEFAULT_TAGS["sharegpt"])


@dataclass
class DatasetSpec:
    """One resolved dataset: where it is and how its records map to conversations.

    path: the file or folder for load_from="file" (dataset_dir joined with file_name).
    columns / tags: what LLaMA-Factory reads: the entry's "columns" / "tags" exactly as written when it has them
        (a column or tag it does not name is unused), else formats.ENTRY_COLUMNS / DEFAULT_TAGS.
    origin: where the spec came from ("data/dataset_info.json", "built-in", "path"), for messages.
    """

    name: str
    load_from: LoadFrom
    path: str | None = None
    hf_hub_url: str | None = None
    ms_hub_url: str | None = None
    subset: str | None = None
    split: str = "train"
    folder: str | None = None
    formatting: Formatting = "alpaca"
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    num_samples: int | None = None
    ranking: bool = False
    origin: str = ""

    @property
    def where(self) -> str:
        """The file, folder or hub id, for messages."""
        if self.load_from == "file":
            return str(self.path)
        return str(self.ms_hub_url if self.load_from == "ms_hub" else self.hf_hub_url)


# ----------------------------------------------------------------------------------------------- resolving


def resolve_dataset(name: str, dataset_dir: str = "data", *, use_modelscope: bool | None = None) -> DatasetSpec:
    """Find a dataset by registered name, built-in name, or path; raises DataError with the known names."""
    name = name.strip()
    if dataset_dir == ONLINE:
        return _online_spec(name, _prefer_modelscope(use_modelscope))
    registry = load_registry(dataset_dir)
    if name in registry:
        return parse_entry(name, registry[name], dataset_dir, registry_path(dataset_dir), use_modelscope)
    if name in BUILTIN_DATASETS:
        return parse_entry(name, BUILTIN_DATASETS[name], dataset_dir, "built-in", use_modelscope)
    path = _existing_path(name, dataset_dir)
    if path is not None:
        return spec_from_path(path, name=name)
    raise DataError(_unknown_dataset_message(name, dataset_dir, registry))


def registry_path(dataset_dir: str) -> str:
    return os.path.join(dataset_dir, REGISTRY_FILE)


def parse_entry(
    name: str, entry: Any, dataset_dir: str, origin: str, use_modelscope: bool | None = None
) -> DatasetSpec:
    """Validate one dataset_info.json entry and turn it into a DatasetSpec (files must exist)."""
    where = f"{origin}: entry {name!r}"
    if not isinstance(entry, Mapping):
        raise DataError(f"{where} must be a JSON object, not {type(entry).__name__}.")
    _warn_unknown(entry, ENTRY_KEYS, where)
    formatting = _formatting(entry, where)
    columns = _named(entry, "columns", COLUMN_KEYS, where, ENTRY_COLUMNS[formatting])
    _refuse_other_stages(entry, columns, where)
    spec = DatasetSpec(
        name=name, load_from="file", formatting=formatting,  # load_from is set by _set_source
        subset=_optional_str(entry, "subset", where), split=_optional_str(entry, "split", where) or "train",
        folder=_optional_str(entry, "folder", where), columns=columns,
        tags=_named(entry, "tags", TAG_KEYS, where, DEFAULT_TAGS[formatting]) if formatting != "alpaca" else {},
        num_samples=_num_samples(entry, where), ranking=False, origin=origin,
    )
    _set_source(spec, entry, dataset_dir, where, _prefer_modelscope(use_modelscope))
    return spec


def spec_from_path(path: str, name: str | None = None) -> DatasetSpec:
    """A spec for a file or folder given directly; the format comes from its first valid record."""
    location, record = _first_record(path)
    try:
        formatting, _reason = detect_format(record)
    except RecordError as e:
        raise DataError(f"Cannot tell the format of {path} from its first record ({location}): {e.reason}. "
                        "Register it in dataset_info.json with 'formatting' and 'columns'.") from None
    columns, tags = detect_mapping(record, formatting)  # no entry: system, tools / history are read when present
    return DatasetSpec(name=name or path, load_from="file", path=path, formatting=formatting,  # type: ignore[arg-type]
                       columns=columns, tags=tags, origin="path")


def check_registry(dataset_dir: str) -> list[str]:
    """Every problem in dataset_dir/dataset_info.json, one sentence each (empty when all entries are valid)."""
    problems = []
    origin = registry_path(dataset_dir)
    for name, entry in load_registry(dataset_dir).items():
        try:
            parse_entry(name, entry, dataset_dir, origin)
        except DataError as e:
            problems.append(str(e))
    return problems


def _online_spec(name: str, modelscope: bool) -> DatasetSpec:
    load_from: LoadFrom = "ms_hub" if modelscope else "hf_hub"
    url_key = "ms_hub_url" if modelscope else "hf_hub_url"
    return DatasetSpec(name=name, load_from=load_from, columns=dict(ENTRY_COLUMNS["alpaca"]), origin=ONLINE,
                       **{url_key: name})


def _prefer_modelscope(use_modelscope: bool | None) -> bool:
    """The argument wins; None falls back to LLaMA-Factory's USE_MODELSCOPE_HUB environment variable."""
    if use_modelscope is not None:
        return use_modelscope
    return os.environ.get("USE_MODELSCOPE_HUB", "0").strip().lower() in ("1", "true", "y", "yes")


def _existing_path(name: str, dataset_dir: str) -> str | None:
    for candidate in (name, os.path.join(dataset_dir, name)):
        if os.path.exists(candidate):
            return candidate
    return None


def _first_record(path: str) -> tuple[str, dict[str, Any]]:
    invalid: list[Any] = []
    with contextlib.closing(iter_records(path, on_error=invalid.append)) as records:
        for location, record in records:
            return location, record
    raise DataError(f"{path} has no valid record to detect its format from; the first problem: {invalid[0]}.")


def _unknown_dataset_message(name: str, dataset_dir: str, registry: Mapping[str, Any]) -> str:
    known = list(registry) + [n for n in BUILTIN_DATASETS if n not in registry]
    lines = [f"Dataset {name!r} is not registered in {registry_path(dataset_dir)}, is not a built-in dataset, "
             "and is not an existing file or folder."]
    guesses = _close_names(name, known)
    if guesses:
        lines.append(f"Did you mean {' or '.join(repr(g) for g in guesses)}?")
    if registry:
        lines.append(f"Registered in {registry_path(dataset_dir)}: {_name_list(list(registry))}.")
    elif not os.path.isfile(registry_path(dataset_dir)):
        lines.append(f"There is no {registry_path(dataset_dir)} (set dataset_dir to the folder that has it).")
    lines.append(f"Built-in: {_name_list(list(BUILTIN_DATASETS))}.")
    return "\n".join(lines)


def _close_names(name: str, known: list[str], n: int = 3) -> list[str]:
    """The known names most like `name` (case-insensitive): the best and any about as close; ties keep order."""
    scored = sorted(((difflib.SequenceMatcher(None, name.lower(), k.lower()).ratio(), -i, k)
                     for i, k in enumerate(known)), reverse=True)
    if not scored:
        return []
    floor = max(0.6, scored[0][0] - 0.1)
    return [k for score, _, k in scored if score >= floor][:n]


def _did_you_mean(name: str, known: list[str]) -> str | None:
    close = _close_names(name, known, 1)
    return close[0] if close else None


def _name_list(names: list[str], limit: int = 30) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


# ----------------------------------------------------------------------------------------------- entry fields


def _set_source(spec: DatasetSpec, entry: Mapping[str, Any], dataset_dir: str, where: str, modelscope: bool) -> None:
    """Hub URLs win over file_name, as in LLaMA-Factory; ms_hub_url when asked for or when it is the only one."""
    hf = _optional_str(entry, "hf_hub_url", where)
    ms = _optional_str(entry, "ms_hub_url", where)
    spec.hf_hub_url, spec.ms_hub_url = hf, ms
    if ms and (modelscope or not hf):
        spec.load_from = "ms_hub"
    elif hf:
        spec.load_from = "hf_hub"
    elif _optional_str(entry, "file_name", where):
        spec.load_from = "file"
        spec.path = _entry_path(entry["file_name"], dataset_dir, where)
    else:
        unsupported = [k for k in ("script_url", "om_hub_url", "cloud_file_name") if k in entry]
        extra = f" ({', '.join(unsupported)} is not supported by tunelab)" if unsupported else ""
        raise DataError(f"{where} has neither 'file_name' nor 'hf_hub_url'/'ms_hub_url'{extra}; add one of them.")


def _entry_path(file_name: str, dataset_dir: str, where: str) -> str:
    path = os.path.join(dataset_dir, file_name)
    if not os.path.exists(path):
        raise DataError(f"{where}: file_name {file_name!r} does not exist under {dataset_dir} "
                        f"(looked for {path}).")
    return path


def _formatting(entry: Mapping[str, Any], where: str) -> Formatting:
    value = entry.get("formatting", "alpaca")
    if value not in FORMATS:
        guess = _did_you_mean(str(value), list(FORMATS))
        hint = f" Did you mean {guess!r}?" if guess else ""
        raise DataError(f"{where}: formatting {value!r} is not one of {', '.join(FORMATS)}.{hint}")
    return value


def _optional_str(entry: Mapping[str, Any], key: str, where: str) -> str | None:
    value = entry.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, not {type(value).__name__}.")
    return value


def _str_mapping(entry: Mapping[str, Any], key: str, allowed: frozenset[str], where: str) -> dict[str, Any]:
    value = entry.get(key) or {}
    if not isinstance(value, Mapping) or not all(v is None or isinstance(v, str) for v in value.values()):
        raise DataError(f"{where}: {key!r} must be an object mapping names to strings.")  # null: "no column"
    _warn_unknown(value, allowed, f"{where} {key!r}")
    return dict(value)


def _named(
    entry: Mapping[str, Any], key: str, allowed: frozenset[str], where: str, defaults: Mapping[str, str]
) -> dict[str, str]:
    """An entry's columns or tags as LLaMA-Factory reads them: exactly those named when the object is there (null
    or "" meaning unused), else the defaults. Never the defaults merged in: LLaMA-Factory does not merge either."""
    if key not in entry:
        return dict(defaults)
    return {k: v for k, v in _str_mapping(entry, key, allowed, where).items() if v}


def _refuse_other_stages(entry: Mapping[str, Any], columns: Mapping[str, str], where: str) -> None:
    """Entries for preference training, KTO or images / videos / audio cannot train a text SFT run: say so."""
    if entry.get("ranking"):
        raise DataError(f"{where} is a ranking dataset ('ranking': true: preference pairs for DPO / reward-model "
                        "training); tunelab trains supervised fine-tuning only, so it cannot use it.")
    media = [c for c in ("images", "videos", "audios") if c in columns]
    if media:
        raise DataError(f"{where} names the {' and '.join(repr(c) for c in media)} column: images, videos and audio "
                        "are not supported (tunelab fine-tunes text-only models), so this entry cannot be used.")
    stage = [c for c in ("chosen", "rejected", "kto_tag") if c in columns]
    if stage:
        raise DataError(f"{where} names the {' and '.join(repr(c) for c in stage)} column "
                        f"({NON_SFT_COLUMNS[stage[0]]}), which is for another training stage; tunelab trains "
                        "supervised fine-tuning only, so it cannot use this entry.")


def _num_samples(entry: Mapping[str, Any], where: str) -> int | None:
    value = entry.get("num_samples")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"{where}: 'num_samples' must be a positive integer, not {value!r}.")
    return value


def _warn_unknown(mapping: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    for key in mapping:
        if key not in allowed:
            guess = _did_you_mean(str(key), sorted(allowed))
            hint = f" (did you mean {guess!r}?)" if guess else ""
            logger.warning("%s: unknown key %r is ignored%s.", where, key, hint)


# ----------------------------------------------------------------------------------------------- the file


def load_registry(dataset_dir: str) -> dict[str, dict[str, Any]]:
    """dataset_dir/dataset_info.json as {name: entry}; {} when the file does not exist."""
    if dataset_dir.startswith(REMOTE):
        raise DataError(_remote_message(dataset_dir))
    path = registry_path(dataset_dir)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8-sig") as fh:
            data = json.load(fh)
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; re-save it as UTF-8.") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}.") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} must hold a JSON object mapping dataset names to entries, "
                        f"not {type(data).__name__}.")
    return data


def _remote_message(dataset_dir: str) -> str:
    """LLaMA-Factory 0.9.5 (data/parser.py) reads REMOTE:<repo> as hf_hub_download(<repo>, "dataset_info.json",
    repo_type="dataset"); the entries' file_name paths are still joined with dataset_dir, so there only hub entries
    load. A local copy of the whole repo serves both kinds of entry."""
    repo = dataset_dir[len(REMOTE):].strip() or "<repo>"
    folder = "data/" + (repo.rstrip("/").split("/")[-1] if repo != "<repo>" else "remote")
    return (f"dataset_dir {dataset_dir!r} is LLaMA-Factory's hub-hosted registry (it downloads dataset_info.json "
            f"from the Hugging Face dataset repo {repo!r}); tunelab does not support REMOTE: dataset_dir yet, "
            "it never downloads a registry. Download the repo's dataset_info.json and data files into a local "
            f"folder and point dataset_dir at it: `hf download {repo} --repo-type dataset --local-dir {folder}`, "
            f"then `dataset_dir: {folder}`.")


def write_registry_entry(dataset_dir: str, name: str, entry: Mapping[str, Any], force: bool = False) -> str:
    """Add (or with force, replace) one entry, keeping all others; atomic (temp file + os.replace).

    Returns the registry path. Re-registering an identical entry changes nothing; a different existing entry is
    refused unless force=True. The entry is validated first (its file_name must exist under dataset_dir).
    """
    if not isinstance(name, str) or not name.strip():
        raise DataError("A dataset name must be a non-empty string.")
    path = registry_path(dataset_dir)
    parse_entry(name, entry, dataset_dir, path)
    registry = load_registry(dataset_dir)
    existing = registry.get(name)
    if existing == dict(entry):
        return path
    if existing is not None and not force:
        raise DataError(f"Dataset {name!r} is already registered in {path} with a different entry "
                        f"({json.dumps(existing, ensure_ascii=False)}); use force (--force) to replace it.")
    registry[name] = dict(entry)
    _atomic_write_json(path, registry)
    return path


def _atomic_write_json(path: str, data: Any) -> None:
    """Write to a temp file in the same folder, then os.replace: readers see the old or the new file, never half."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    mode = _file_mode(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".dataset_info.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _file_mode(path: str) -> int:
    """Keep the existing file's permissions (mkstemp creates 0600); a new file gets rw-r--r--."""
    if os.path.exists(path):
        return os.stat(path).st_mode & 0o777
    return 0o644
