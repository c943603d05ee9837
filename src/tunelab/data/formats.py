"""Format converters: one dataset record (alpaca / sharegpt / openai) -> one `Conversation`.

    from tunelab.data.formats import convert_record, detect_format
    conv = convert_record({"instruction": "Hi", "output": "Hello"}, spec, source="data/x.jsonl:1")

The column and tag names follow LLaMA-Factory's `dataset_info.json` (`columns`, `tags`); the defaults are
`ENTRY_COLUMNS` (registry entries, LLaMA-Factory's) or `DEFAULT_COLUMNS` (no entry) and `DEFAULT_TAGS`. A record that cannot be converted raises `RecordError` whose `reason` is a
short sentence without a location: the caller (the loader, `tunelab data validate`) pairs it with the record's
location and decides whether to stop or to skip and count.

Validation rules (LLaMA-Factory's, made explicit): turns alternate user/tool -> assistant, the first turn (after
an optional leading system turn) is a user turn, contents are non-empty text, and a training sample ends with an
assistant reply. Unlike LLaMA-Factory, several consecutive tool results (parallel tool calls) are accepted.
Nothing here reads files or knows about tokenizers.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from tunelab.data.conversation import Conversation
from tunelab.errors import DataError

if TYPE_CHECKING:
    from tunelab.data.registry import DatasetSpec

FORMATS = ("alpaca", "sharegpt", "openai")

# The columns LLaMA-Factory reads from a dataset_info.json entry that has no "columns" object (its DatasetAttr
# defaults). An entry with "columns" reads exactly the columns it names: every other one is unused, as in
# LLaMA-Factory. system, history and tools have no default there: a hub set that happens to have such a column
# does not use it unless the entry names it (see registry.parse_entry).
ENTRY_COLUMNS: dict[str, dict[str, str]] = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output"},
    "sharegpt": {"messages": "conversations"},
    "openai": {"messages": "messages"},
}
# A record read without a registry entry (a file given by path, `tunelab data convert`, a converter called on its
# own) reads these: the entry defaults plus system, history / tools, when the record has them.
DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "alpaca": {**ENTRY_COLUMNS["alpaca"], "system": "system", "history": "history"},
    "sharegpt": {**ENTRY_COLUMNS["sharegpt"], "system": "system", "tools": "tools"},
    "openai": {**ENTRY_COLUMNS["openai"], "system": "system", "tools": "tools"},
}

# Tags of an entry without a "tags" object; an entry with "tags" reads exactly the tags it names (LLaMA-Factory).
# openai's defaults are tunelab's: LLaMA-Factory gives openai entries sharegpt's from/value defaults, which no
# openai file has, so an openai entry without tags is unreadable there (every openai entry in its registry has tags).
DEFAULT_TAGS: dict[str, dict[str, str]] = {
    "alpaca": {},
    "sharegpt": {
        "role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
        "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system",
    },
    "openai": {
        "role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
        "observation_tag": "tool", "function_tag": "function_call", "system_tag": "system",
    },
}
# Columns of other training stages or of media: an SFT run refuses an entry that names one (see registry.py).
NON_SFT_COLUMNS = {
    "images": "images", "videos": "videos", "audios": "audios",
    "chosen": "preference pairs (DPO / reward modelling)", "rejected": "preference pairs (DPO / reward modelling)",
    "kto_tag": "KTO's desirable / undesirable labels",
}


class RecordError(DataError):
    """One record cannot be converted. `reason` is a sentence without the location; the caller adds it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ----------------------------------------------------------------------------------------------- dispatch


def convert_record(
    record: Any, spec: DatasetSpec, source: str = "", *, require_reply: bool = True
) -> Conversation:
    """Convert one record with the spec's formatting, columns and tags; raises RecordError if it is invalid.

    require_reply: a training sample must end with an assistant reply; pass False for generation prompts.
    """
    if not isinstance(record, Mapping):
        raise RecordError(f"the record is {_kind(record)}, not a JSON object")
    converter = _CONVERTERS.get(spec.formatting)
    if converter is None:
        raise DataError(f"Unknown formatting {spec.formatting!r}; expected one of {', '.join(FORMATS)}.")
    return converter(record, spec.columns, spec.tags, source, require_reply)


def convert_alpaca(
    record: Mapping[str, Any], columns: Mapping[str, str] | None = None, tags: Mapping[str, str] | None = None,
    source: str = "", require_reply: bool = True,
) -> Conversation:
    """Alpaca: instruction (+ "\\n" + input when non-empty) -> user, output -> assistant; optional system, history.

    `columns` is the entry's mapping as LLaMA-Factory reads it (None: DEFAULT_COLUMNS); a column it does not name is
    not read, whatever the record holds.
    """
    cols = _columns(columns, "alpaca")
    prompt_key, response_key = cols.get("prompt"), cols.get("response")
    user = "\n".join(p for p in (_text_field(record, prompt_key), _text_field(record, cols.get("query"))) if p)
    if not user.strip():
        raise RecordError(f"the {prompt_key!r} field is missing or empty" if prompt_key
                          else "the entry's columns name no 'prompt' (or 'query') column, so there is no user turn")
    messages = _alpaca_history(record, cols.get("history"))
    messages.append({"role": "user", "content": user})
    response = _text_field(record, response_key)
    if response.strip():
        messages.append({"role": "assistant", "content": response})
    elif require_reply and not response_key:
        raise RecordError("the entry's columns name no 'response' column, so there is no reply to train on (a "
                          "pre-training text set?)")
    elif require_reply:
        raise RecordError(f"the {response_key!r} field is missing or empty")
    tools = _parse_tools(record.get(cols["tools"]), cols["tools"]) if cols.get("tools") else None  # LF reads it too
    return Conversation(messages=messages, system=_system_field(record, cols.get("system")), tools=tools,
                        source=source)


def convert_sharegpt(
    record: Mapping[str, Any], columns: Mapping[str, str] | None = None, tags: Mapping[str, str] | None = None,
    source: str = "", require_reply: bool = True,
) -> Conversation:
    """ShareGPT: a list of {from, value} turns (human, gpt, system, function_call, observation) + system, tools."""
    return _convert_turns(record, "sharegpt", columns, tags, source, require_reply)


def convert_openai(
    record: Mapping[str, Any], columns: Mapping[str, str] | None = None, tags: Mapping[str, str] | None = None,
    source: str = "", require_reply: bool = True,
) -> Conversation:
    """OpenAI: a list of {role, content} messages (system, user, assistant with optional tool_calls, tool)."""
    return _convert_turns(record, "openai", columns, tags, source, require_reply)


_CONVERTERS: dict[str, Callable[..., Conversation]] = {
    "alpaca": convert_alpaca, "sharegpt": convert_sharegpt, "openai": convert_openai,
}


# ----------------------------------------------------------------------------------------------- detection


def detect_format(record: Any) -> tuple[str, str]:
    """Guess a record's formatting from its keys: (formatting, reason). Raises RecordError when it cannot tell."""
    if not isinstance(record, Mapping):
        raise RecordError(f"the record is {_kind(record)}, not a JSON object")
    for key in ("conversations", "messages"):
        turns = record.get(key)
        if isinstance(turns, list) and turns and isinstance(turns[0], Mapping):
            if "from" in turns[0] and "value" in turns[0]:
                return "sharegpt", f"{key!r} holds turns with 'from'/'value'"
            if "role" in turns[0] and "content" in turns[0]:
                return "openai", f"{key!r} holds messages with 'role'/'content'"
    alpaca_keys = [k for k in ("instruction", "input", "output") if k in record]
    if "instruction" in alpaca_keys or "output" in alpaca_keys:  # validation comes later, record by record
        return "alpaca", f"the record has {', '.join(repr(k) for k in alpaca_keys)}"
    if set(record) == {"text"}:
        raise RecordError("the record only has 'text' (plain text for pre-training); supervised fine-tuning "
                          "needs alpaca, sharegpt or openai records")
    keys = ", ".join(repr(k) for k in list(record)[:8]) or "none"
    raise RecordError(f"the keys ({keys}) match no known format: alpaca needs 'instruction' and 'output', "
                      "sharegpt 'conversations' of from/value turns, openai 'messages' of role/content")


def detect_mapping(record: Mapping[str, Any], formatting: str) -> tuple[dict[str, str], dict[str, str]]:
    """Columns and tags for an auto-detected record (e.g. sharegpt turns stored under 'messages').

    A file read without a dataset_info.json entry reads the DEFAULT_COLUMNS (system, tools, history included).
    """
    columns = dict(DEFAULT_COLUMNS[formatting])
    tags = dict(DEFAULT_TAGS[formatting])
    if formatting == "alpaca":
        return columns, tags
    for key in ("conversations", "messages"):
        if isinstance(record.get(key), list) and record[key]:
            columns["messages"] = key
            break
    roles = {t.get(tags["role_tag"]) for t in record.get(columns["messages"], []) if isinstance(t, Mapping)}
    if formatting == "sharegpt" and {"user", "assistant"} & roles and not {"human", "gpt"} & roles:
        tags.update(user_tag="user", assistant_tag="assistant")
    return columns, tags


# ----------------------------------------------------------------------------------------------- alpaca helpers


def _text_field(record: Mapping[str, Any], key: str | None) -> str:
    """A text column; a missing column or null reads as ""."""
    value = record.get(key) if key else None
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RecordError(f"the {key!r} field is {_kind(value)}, not text")
    return value


def _system_field(record: Mapping[str, Any], key: str | None) -> str | None:
    """The system column; empty means "not given" (the template may use its default), as in LLaMA-Factory."""
    return _text_field(record, key) or None


def _alpaca_history(record: Mapping[str, Any], key: str | None) -> list[dict[str, Any]]:
    """[[user, assistant], ...] turns before the current one, as messages."""
    history = record.get(key) if key else None
    if not history:
        return []
    if not isinstance(history, list):
        raise RecordError(f"the {key!r} field must be a list of [user, assistant] pairs, not {_kind(history)}")
    messages: list[dict[str, Any]] = []
    for i, pair in enumerate(history, 1):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                and all(isinstance(t, str) and t.strip() for t in pair)):
            raise RecordError(f"item {i} of {key!r} must be a [user, assistant] pair of non-empty texts")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages


# ----------------------------------------------------------------------------------------------- turn-list formats

# Which side of the exchange each kind of turn is on, and the order checker's states.
_START, _EXPECT_REPLY, _EXPECT_PROMPT, _AFTER_TOOL = "start", "reply", "prompt", "after_tool"


def _convert_turns(
    record: Mapping[str, Any], formatting: str, columns: Mapping[str, str] | None,
    tags: Mapping[str, str] | None, source: str, require_reply: bool,
) -> Conversation:
    """Shared by sharegpt and openai: they differ only in their default columns and tags."""
    cols = _columns(columns, formatting)
    tg = dict(DEFAULT_TAGS[formatting]) if tags is None else {k: v for k, v in tags.items() if v}
    if not cols.get("messages"):
        raise RecordError("the entry's columns name no 'messages' column, so there are no turns to read")
    for key in ("role_tag", "content_tag", "user_tag", "assistant_tag"):
        if not tg.get(key):
            raise RecordError(f"the entry's tags name no {key!r}, so the turns cannot be read")
    turns = _turn_list(record, cols["messages"])
    system, first = _leading_system(turns, tg)
    if system is None:
        system = _system_field(record, cols.get("system"))
    messages = _turn_messages(turns, first, tg)
    if not messages:
        raise RecordError(f"the {cols['messages']!r} list has no turns besides the system prompt")
    if require_reply and messages[-1]["role"] != "assistant":
        last = turns[-1].get(tg["role_tag"])
        raise RecordError(f"the last turn is from {last!r}; a training sample must end with an assistant reply "
                          f"({tg['assistant_tag']!r})")
    tools = _parse_tools(record.get(cols["tools"]), cols["tools"]) if cols.get("tools") else None
    return Conversation(messages=messages, system=system, tools=tools, source=source)


def _columns(columns: Mapping[str, str | None] | None, formatting: str) -> dict[str, str]:
    """The columns to read: exactly the named ones (a registry entry, as LLaMA-Factory reads it), or with none
    given (a record converted on its own, a file given by path) the DEFAULT_COLUMNS."""
    if columns is None:
        return dict(DEFAULT_COLUMNS[formatting])
    return {k: v for k, v in columns.items() if v}


def _turn_list(record: Mapping[str, Any], key: str) -> list[Any]:
    turns = record.get(key)
    if turns is None:
        raise RecordError(f"the {key!r} field is missing")
    if not isinstance(turns, list):
        raise RecordError(f"the {key!r} field must be a list of turns, not {_kind(turns)}")
    if not turns:
        raise RecordError(f"the {key!r} list is empty")
    return turns


def _leading_system(turns: list[Any], tags: Mapping[str, str]) -> tuple[str | None, int]:
    """(system prompt, index of the first non-system turn): a leading system turn becomes the system prompt."""
    first = turns[0]
    if tags.get("system_tag") and isinstance(first, Mapping) and first.get(tags["role_tag"]) == tags["system_tag"]:
        content = first.get(tags["content_tag"])
        if content is not None and not isinstance(content, str):
            raise RecordError(f"turn 1 ({tags['system_tag']!r}) content is {_kind(content)}, not text")
        return content or None, 1
    return None, 0


def _turn_messages(turns: list[Any], first: int, tags: Mapping[str, str]) -> list[dict[str, Any]]:
    """Check the order of turns[first:] and convert each to a message."""
    kinds = _role_kinds(tags)
    state = _START
    messages = []
    for number, turn in enumerate(turns[first:], first + 1):
        tag = _role_tag(turn, number, tags, kinds)
        kind = kinds[tag]
        state = _next_state(state, kind, tag, number, tags)
        messages.append(_turn_message(turn, kind, tag, number, tags))
    return messages


def _role_kinds(tags: Mapping[str, str]) -> dict[str, str]:
    """Role tag as written in the data -> kind of turn."""
    kinds = {"user_tag": "user", "assistant_tag": "assistant", "observation_tag": "tool", "function_tag": "function",
             "system_tag": "system"}
    return {tags[key]: kind for key, kind in kinds.items() if tags.get(key)}  # an unnamed tag is no role


def _role_tag(turn: Any, number: int, tags: Mapping[str, str], kinds: Mapping[str, str]) -> str:
    if not isinstance(turn, Mapping):
        raise RecordError(f"turn {number} is {_kind(turn)}, not an object")
    tag = turn.get(tags["role_tag"])
    if tag is None:
        raise RecordError(f"turn {number} has no {tags['role_tag']!r} field")
    if tag not in kinds:
        expected = ", ".join(repr(t) for t in kinds)
        raise RecordError(f"turn {number} has an unknown role {tag!r} (expected one of {expected})")
    return tag


def _next_state(state: str, kind: str, tag: str, number: int, tags: Mapping[str, str]) -> str:
    """The turn-order state machine: user (or tool results) -> assistant, starting with a user turn."""
    if kind == "system":
        raise RecordError(f"turn {number} is a system turn ({tag!r}); only the first turn may be the system prompt")
    if state == _START and kind != "user":
        raise RecordError(f"turn {number} is from {tag!r} but a conversation must start with a user turn "
                          f"({tags['user_tag']!r})")
    if kind in ("assistant", "function"):
        if state not in (_EXPECT_REPLY, _AFTER_TOOL):
            raise RecordError(f"turn {number} is from {tag!r} but a user turn ({tags['user_tag']!r}) or tool "
                              f"result ({tags.get('observation_tag')!r}) was expected")
        return _EXPECT_PROMPT
    if state in (_EXPECT_REPLY, _AFTER_TOOL) and not (kind == "tool" and state == _AFTER_TOOL):
        raise RecordError(f"turn {number} is from {tag!r} but an assistant reply ({tags['assistant_tag']!r}) "
                          "was expected")
    return _EXPECT_REPLY if kind == "user" else _AFTER_TOOL


def _turn_message(turn: Mapping[str, Any], kind: str, tag: str, number: int, tags: Mapping[str, str]) -> dict:
    """One turn -> a Conversation message ({"role", "content"} and, for calls, "tool_calls")."""
    content = turn.get(tags["content_tag"])
    if kind == "function":
        return {"role": "assistant", "content": "", "tool_calls": _function_call(content, number, tag)}
    if kind == "assistant" and turn.get("tool_calls"):
        calls = _tool_calls(turn["tool_calls"], f"turn {number} ({tag!r}) tool_calls")
        return {"role": "assistant", "content": _optional_content(content, number, tag), "tool_calls": calls}
    return {"role": "user" if kind == "user" else kind, "content": _required_content(content, number, tag, tags)}


def _required_content(content: Any, number: int, tag: str, tags: Mapping[str, str]) -> str:
    if content is None:
        raise RecordError(f"turn {number} ({tag!r}) has no {tags['content_tag']!r} field")
    if not isinstance(content, str):
        raise RecordError(f"turn {number} ({tag!r}) content is {_kind(content)}, not text")
    if not content.strip():
        raise RecordError(f"turn {number} ({tag!r}) has empty content")
    return content


def _optional_content(content: Any, number: int, tag: str) -> str:
    """An assistant message that calls tools may have no text."""
    if content is None:
        return ""
    if not isinstance(content, str):
        raise RecordError(f"turn {number} ({tag!r}) content is {_kind(content)}, not text")
    return content


def _function_call(value: Any, number: int, tag: str) -> list[dict[str, Any]]:
    """A ShareGPT function_call turn: JSON {"name", "arguments"} or a list of them (as text or already parsed)."""
    where = f"turn {number} ({tag!r})"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RecordError(f"{where} is not valid JSON ({e.msg} at column {e.colno})") from None
    return _tool_calls(value, where)


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """Normalise calls to [{"name", "arguments"}]; accepts bare calls and OpenAI {"function": {...}} wrappers."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise RecordError(f"{where} has no calls")
    calls = []
    for item in items:
        call = item.get("function", item) if isinstance(item, Mapping) else None
        if not (isinstance(call, Mapping) and isinstance(call.get("name"), str) and call["name"]
                and isinstance(call.get("arguments"), (str, Mapping))):
            raise RecordError(f"{where} must be a JSON object with 'name' and 'arguments' (or a list of them)")
        calls.append({"name": call["name"], "arguments": call["arguments"]})
    return calls


def _parse_tools(value: Any, key: str) -> list[dict[str, Any]] | None:
    """The tools column: a JSON string or a list of function definitions; empty means no tools."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RecordError(f"the {key!r} field is not valid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, Mapping) for t in value):
        raise RecordError(f"the {key!r} field must be a list of function definitions (JSON objects)")
    for i, tool in enumerate(value, 1):
        fn = tool.get("function", tool)
        if not (isinstance(fn, Mapping) and isinstance(fn.get("name"), str) and fn["name"]):
            raise RecordError(f"tool {i} in {key!r} has no 'name'")
    return [dict(t) for t in value] or None


def _kind(value: Any) -> str:
    """A JSON-ish name for a value's type, for messages ("a list", "a number")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"
