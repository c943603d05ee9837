"""`tunelab data convert`: any supported file -> alpaca / sharegpt / openai records in .json or .jsonl.

    result = convert_file("gsm8k.parquet", "gsm8k.json", to="alpaca", mapping="instruction=question,output=answer")

Each record goes through the data layer like a training sample: read (readers.iter_records), optionally mapped
(`--map TARGET=SOURCE,...` copies source columns to the names the format expects; `--output-template` builds the
'output' field from record fields, e.g. "{solution}\\n#### {answer}"), checked and converted to a `Conversation`
(formats.convert_record, so the same rules and messages as training), then written back in the target format by
the inverse writers below (`to_alpaca`, `to_sharegpt`, `to_openai`). `--keep-extra` copies the fields nothing used
(ids, scores, ...). The first invalid record stops the conversion (or, with skip_invalid, is skipped and counted);
the output is written to a temp file and renamed at the end, so a failure never leaves half a file.

Numbers in mapped or templated columns (Parquet/Arrow integer answers) become text, as alpaca fields are text.
alpaca -> alpaca keeps the instruction/input split; other conversions join them as training does.
"""
from __future__ import annotations

import json
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tunelab.data.conversation import Conversation
from tunelab.data.formats import FORMATS, RecordError, convert_record, detect_format, detect_mapping
from tunelab.data.readers import InvalidRecord, iter_records
from tunelab.data.registry import DatasetSpec
from tunelab.datatools.source import InvalidLog, RecordWriter, output_kind, raise_invalid
from tunelab.errors import ConfigError, DataError

# ----------------------------------------------------------------------------------------------- inverse writers


def to_alpaca(conv: Conversation) -> dict[str, Any]:
    """{"instruction", "input", "output"[, "system"][, "history"]}: earlier exchanges become history pairs."""
    if conv.tools or any(m["role"] == "tool" or m.get("tool_calls") for m in conv.messages):
        raise RecordError("it has tool calls or tool results, which alpaca records cannot hold; convert it to "
                          "sharegpt or openai instead")
    roles = [m["role"] for m in conv.messages]
    if not roles or roles != ["user", "assistant"] * (len(roles) // 2):
        raise RecordError("its turns are not user/assistant pairs ending with an assistant reply, which alpaca "
                          "records need")
    pairs = [(conv.messages[i]["content"], conv.messages[i + 1]["content"]) for i in range(0, len(roles), 2)]
    record: dict[str, Any] = {"instruction": pairs[-1][0], "input": "", "output": pairs[-1][1]}
    if conv.system is not None:
        record["system"] = conv.system
    if len(pairs) > 1:
        record["history"] = [list(p) for p in pairs[:-1]]
    return record


_SHAREGPT_ROLES = {"user": "human", "assistant": "gpt", "tool": "observation"}


def to_sharegpt(conv: Conversation) -> dict[str, Any]:
    """{"conversations": [{"from", "value"}, ...][, "system"][, "tools" (JSON text, as LLaMA-Factory reads it)]}.

    An assistant message with tool calls becomes a function_call turn holding the call (or list of calls) as JSON.
    """
    turns = []
    for number, m in enumerate(conv.messages, 1):
        if m.get("tool_calls"):
            if m.get("content"):
                raise RecordError(f"message {number} has both text and tool calls, which one ShareGPT "
                                  "function_call turn cannot hold; convert it to openai instead")
            calls = [{"name": c["name"], "arguments": c["arguments"]} for c in m["tool_calls"]]
            value = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
            turns.append({"from": "function_call", "value": value})
        else:
            turns.append({"from": _SHAREGPT_ROLES[m["role"]], "value": m["content"]})
    record: dict[str, Any] = {"conversations": turns}
    if conv.system is not None:
        record["system"] = conv.system
    if conv.tools:
        record["tools"] = json.dumps(conv.tools, ensure_ascii=False)
    return record


def to_openai(conv: Conversation) -> dict[str, Any]:
    """{"messages": [{"role", "content"[, "tool_calls"]}, ...][, "tools"]}, a system prompt first when given."""
    record: dict[str, Any] = {"messages": conv.to_openai_messages()}
    if conv.tools:
        record["tools"] = conv.tools
    return record


WRITERS: dict[str, Callable[[Conversation], dict[str, Any]]] = {
    "alpaca": to_alpaca, "sharegpt": to_sharegpt, "openai": to_openai,
}

# ----------------------------------------------------------------------------------------------- mapping


def parse_pairs(text: str | None, option: str) -> list[tuple[str, str]]:
    """ "a=b,c=d" -> [("a", "b"), ("c", "d")]; a malformed pair is a ConfigError naming the option."""
    if not text:
        return []
    pairs = []
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"{option} expects NAME=VALUE pairs separated by commas (for example "
                              f"{option} instruction=question,output=answer); {part.strip()!r} is not one.")
        pairs.append((key.strip(), value.strip()))
    return pairs


def unescape(template: str) -> str:
    r"""Turn the \n, \t and \\ typed on a command line into a newline, tab and backslash."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], template)


@dataclass
class RecordMapper:
    """Applies --map and --output-template to one raw record; remembers which source fields it used."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    output_template: str | None = None

    def __post_init__(self) -> None:
        self.fields: list[str] = []
        if self.output_template is not None:
            try:
                self.fields = [f for _, f, _, _ in string.Formatter().parse(self.output_template) if f is not None]
            except ValueError as e:
                raise ConfigError(f"--output-template {self.output_template!r} is not a valid template ({e}); "
                                  "write fields as {name} and a literal brace as {{ or }}.") from None
            bad = [f for f in self.fields if not f.isidentifier()]
            if bad or not self.fields:
                raise ConfigError(f"--output-template {self.output_template!r} must name record fields in braces, "
                                  "like \"{solution}\\n#### {answer}\" (no positional {} or attribute access).")

    @property
    def used(self) -> set[str]:
        """Source fields that the mapping or the template consumed (not copied by --keep-extra)."""
        return {source for _, source in self.pairs} | set(self.fields)

    def rename(self, record: dict[str, Any]) -> dict[str, Any]:
        """--map: a copy of the record with each TARGET set to its SOURCE column's value."""
        if not self.pairs:
            return record
        mapped = dict(record)
        for target, source in self.pairs:
            mapped[target] = _text_value(_field(record, source, f"--map {target}={source}"))
        return mapped

    def fill(self, record: dict[str, Any]) -> dict[str, Any]:
        """--output-template: the (renamed) record with 'output' built from its fields."""
        if self.output_template is None:
            return record
        values = {name: _text_value(_field(record, name, "--output-template")) for name in self.fields}
        return {**record, "output": self.output_template.format_map(values)}


def _field(record: Mapping[str, Any], name: str, option: str) -> Any:
    if name not in record:
        have = ", ".join(repr(k) for k in list(record)[:12]) or "none"
        raise RecordError(f"the column {name!r} named by {option} is missing (the record has {have})")
    return record[name]


def _text_value(value: Any) -> Any:
    """Numbers become text (alpaca fields are text); everything else is left for the format checks."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


# ----------------------------------------------------------------------------------------------- the job


@dataclass
class ConvertResult:
    written: int
    formatting: str
    reason: str
    skipped: InvalidLog


def convert_file(
    src: str, out: str, *, to: str, source_format: str = "auto", limit: int | None = None,
    mapping: str | None = None, output_template: str | None = None, keep_extra: bool = False,
    skip_invalid: bool = False,
) -> ConvertResult:
    """Convert src (file or folder) into out (.json / .jsonl); see the module doc. Raises DataError/ConfigError."""
    if to not in FORMATS:
        raise ConfigError(f"--to must be one of {', '.join(FORMATS)}, not {to!r}.")
    if source_format not in ("auto", *FORMATS):
        raise ConfigError(f"--from must be auto or one of {', '.join(FORMATS)}, not {source_format!r}.")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be a positive number of records, not {limit}.")
    output_kind(out)
    mapper = RecordMapper(parse_pairs(mapping, "--map"), unescape(output_template) if output_template else None)
    log = InvalidLog()
    on_invalid: Callable[[InvalidRecord], None] = log if skip_invalid else raise_invalid
    spec: DatasetSpec | None = None
    reason = ""
    with RecordWriter(out) as writer:
        for location, raw in iter_records(src, on_error=on_invalid):
            try:
                record = mapper.rename(raw)
                if spec is None:
                    spec, reason = _spec_for(src, location, record, source_format, mapper)
                record = mapper.fill(record)
                conv = convert_record(record, spec, location)
                writer.write(_output_record(conv, record, raw, spec, to, mapper, keep_extra))
            except RecordError as e:
                on_invalid(InvalidRecord(location, e.reason))
                continue
            if limit is not None and writer.count >= limit:
                break
        if writer.count == 0:
            raise DataError(f"{src} has no valid records to convert; nothing was written."
                            + (f"\n{log.summary()}" if log.count else ""))
        writer.commit()
    return ConvertResult(writer.count, spec.formatting if spec else source_format, reason, log)


def _spec_for(
    src: str, location: str, record: dict[str, Any], source_format: str, mapper: RecordMapper
) -> tuple[DatasetSpec, str]:
    """The source spec from the first (mapped) record: detected, or as given by --from."""
    if source_format == "auto":
        try:
            formatting, reason = detect_format(record)
        except RecordError as e:
            raise DataError(f"Cannot tell the format of {src} from its first record ({location}): {e.reason}. "
                            "Give --from, or --map the columns to the names of a format "
                            "(e.g. --map instruction=question,output=answer).") from None
        reason = f"detected: {reason}"
    else:
        formatting, reason = source_format, "given by --from"
    if mapper.output_template is not None and formatting != "alpaca":
        raise ConfigError(f"--output-template sets the alpaca 'output' field, but {src} is read as {formatting}.")
    columns, tags = detect_mapping(record, formatting)
    spec = DatasetSpec(name=src, load_from="file", path=src, formatting=formatting,  # type: ignore[arg-type]
                       columns=columns, tags=tags, origin="path")
    return spec, reason


def _output_record(
    conv: Conversation, record: dict[str, Any], raw: dict[str, Any], spec: DatasetSpec, to: str,
    mapper: RecordMapper, keep_extra: bool,
) -> dict[str, Any]:
    out = WRITERS[to](conv)
    if spec.formatting == "alpaca" and to == "alpaca":  # keep the instruction / input split as it was
        out["instruction"] = record.get(spec.columns["prompt"]) or ""
        out["input"] = record.get(spec.columns["query"]) or ""
    if keep_extra:
        used = mapper.used | {c for c in spec.columns.values() if c} | set(out)
        if mapper.output_template is not None:
            used.add("output")
        targets = {target for target, _ in mapper.pairs}
        for key, value in raw.items():
            if key not in used and key not in targets:
                out[key] = value
    return out
