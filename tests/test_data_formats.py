"""Tests for tunelab.data.formats: alpaca / sharegpt / openai records -> exact Conversations, and the reasons
given for invalid records."""
from __future__ import annotations

import json

import pytest

from tunelab.data.conversation import Conversation
from tunelab.data.formats import (
    DEFAULT_COLUMNS,
    DEFAULT_TAGS,
    RecordError,
    convert_alpaca,
    convert_openai,
    convert_record,
    convert_sharegpt,
    detect_format,
    detect_mapping,
)
from tunelab.data.registry import DatasetSpec


def _reason(fn, record, **kwargs) -> str:
    with pytest.raises(RecordError) as info:
        fn(record, **kwargs)
    return info.value.reason


# ----------------------------------------------------------------------------------------------- alpaca


def test_alpaca_full_record():
    record = {"instruction": "Translate to French", "input": "good morning", "output": "bonjour",
              "system": "Be brief.", "history": [["Hi", "Hello!"], ["How are you?", "Fine."]]}
    conv = convert_alpaca(record, source="d.jsonl:1")
    assert conv == Conversation(
        messages=[
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Fine."},
            {"role": "user", "content": "Translate to French\ngood morning"},
            {"role": "assistant", "content": "bonjour"},
        ],
        system="Be brief.", tools=None, source="d.jsonl:1",
    )


def test_alpaca_empty_input_and_system_are_left_out():
    conv = convert_alpaca({"instruction": "Say hi", "input": "", "output": "hi", "system": ""})
    assert conv.messages == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    assert conv.system is None


def test_alpaca_input_without_instruction_is_the_prompt():
    # LLaMA-Factory joins whichever of instruction / input is non-empty.
    conv = convert_alpaca({"input": "2+2?", "output": "4"})
    assert conv.messages[0] == {"role": "user", "content": "2+2?"}


def test_alpaca_custom_columns():
    cols = {"prompt": "q", "query": "ctx", "response": "a", "system": "sys", "history": None}
    conv = convert_alpaca({"q": "Q", "ctx": "C", "a": "A", "sys": "S"}, cols)
    assert conv.messages == [{"role": "user", "content": "Q\nC"}, {"role": "assistant", "content": "A"}]
    assert conv.system == "S"


@pytest.mark.parametrize("record, reason", [
    ({"input": "", "output": "x"}, "the 'instruction' field is missing or empty"),
    ({"instruction": "   ", "output": "x"}, "the 'instruction' field is missing or empty"),
    ({"instruction": "x"}, "the 'output' field is missing or empty"),
    ({"instruction": "x", "output": ""}, "the 'output' field is missing or empty"),
    ({"instruction": "x", "output": 42}, "the 'output' field is a number, not text"),
    ({"instruction": ["x"], "output": "y"}, "the 'instruction' field is a list, not text"),
    ({"instruction": "x", "output": "y", "history": "no"},
     "the 'history' field must be a list of [user, assistant] pairs, not text"),
    ({"instruction": "x", "output": "y", "history": [["a", "b"], ["c"]]},
     "item 2 of 'history' must be a [user, assistant] pair of non-empty texts"),
])
def test_alpaca_invalid(record, reason):
    assert _reason(convert_alpaca, record) == reason


def test_alpaca_prompt_only_when_reply_not_required():
    conv = convert_alpaca({"instruction": "x"}, require_reply=False)
    assert conv.messages == [{"role": "user", "content": "x"}]


# ----------------------------------------------------------------------------------------------- sharegpt

TOOLS = [{"name": "get_weather", "description": "Weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]


def test_sharegpt_system_turn_function_call_observation_and_tools():
    record = {
        "conversations": [
            {"from": "system", "value": "You are a weather bot."},
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
            {"from": "observation", "value": '{"temp": 21}'},
            {"from": "gpt", "value": "It is 21 degrees."},
        ],
        "tools": json.dumps(TOOLS),
    }
    conv = convert_sharegpt(record, source="s.json[0]")
    assert conv == Conversation(
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "",
             "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]},
            {"role": "tool", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "It is 21 degrees."},
        ],
        system="You are a weather bot.", tools=TOOLS, source="s.json[0]",
    )
    assert conv.to_openai_messages()[2]["tool_calls"] == [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]


def test_sharegpt_system_column_tools_list_and_parallel_calls():
    calls = [{"name": "a", "arguments": {}}, {"name": "b", "arguments": "{\"x\": 1}"}]
    record = {
        "system": "Sys.", "tools": TOOLS,
        "conversations": [
            {"from": "human", "value": "do both"},
            {"from": "function_call", "value": json.dumps(calls)},
            {"from": "observation", "value": "ra"},
            {"from": "observation", "value": "rb"},
            {"from": "gpt", "value": "done"},
        ],
    }
    conv = convert_sharegpt(record)
    assert conv.system == "Sys."
    assert conv.tools == TOOLS
    assert conv.messages[1] == {"role": "assistant", "content": "", "tool_calls": calls}
    assert [m["role"] for m in conv.messages] == ["user", "assistant", "tool", "tool", "assistant"]


def test_sharegpt_custom_columns_and_tags():
    cols = {"messages": "dialog", "system": "sys", "tools": None}
    tags = {"role_tag": "speaker", "content_tag": "text", "user_tag": "u", "assistant_tag": "a"}
    record = {"sys": "S", "dialog": [{"speaker": "u", "text": "hi"}, {"speaker": "a", "text": "yo"}]}
    conv = convert_sharegpt(record, cols, tags)
    assert conv.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert conv.system == "S"


def _turns(*pairs):
    return {"conversations": [{"from": f, "value": v} for f, v in pairs]}


@pytest.mark.parametrize("record, reason", [
    (_turns(("human", "a"), ("human", "b")), "turn 2 is from 'human' but an assistant reply ('gpt') was expected"),
    (_turns(("gpt", "a"), ("human", "b")),
     "turn 1 is from 'gpt' but a conversation must start with a user turn ('human')"),
    (_turns(("system", "s"), ("observation", "a"), ("gpt", "b")),
     "turn 2 is from 'observation' but a conversation must start with a user turn ('human')"),
    (_turns(("human", "a"), ("gpt", "b"), ("gpt", "c")),
     "turn 3 is from 'gpt' but a user turn ('human') or tool result ('observation') was expected"),
    (_turns(("human", "a"), ("gpt", "")), "turn 2 ('gpt') has empty content"),
    (_turns(("human", "  \n"), ("gpt", "b")), "turn 1 ('human') has empty content"),
    ({"conversations": [{"from": "human", "value": ["a"]}, {"from": "gpt", "value": "b"}]},
     "turn 1 ('human') content is a list, not text"),
    ({"conversations": [{"from": "human"}, {"from": "gpt", "value": "b"}]}, "turn 1 ('human') has no 'value' field"),
    (_turns(("human", "a"), ("bot", "b")),
     "turn 2 has an unknown role 'bot' (expected one of 'human', 'gpt', 'observation', 'function_call', 'system')"),
    (_turns(("human", "a"), ("gpt", "b"), ("human", "c")),
     "the last turn is from 'human'; a training sample must end with an assistant reply ('gpt')"),
    (_turns(("human", "a"), ("gpt", "b"), ("system", "c")),
     "turn 3 is a system turn ('system'); only the first turn may be the system prompt"),
    (_turns(("human", "a"), ("function_call", "{name: 1}"), ("observation", "o"), ("gpt", "b")),
     "turn 2 ('function_call') is not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
    (_turns(("human", "a"), ("function_call", '{"arguments": {}}'), ("observation", "o"), ("gpt", "b")),
     "turn 2 ('function_call') must be a JSON object with 'name' and 'arguments' (or a list of them)"),
    ({**_turns(("human", "a"), ("gpt", "b")), "tools": "[{"},
     "the 'tools' field is not valid JSON (Expecting property name enclosed in double quotes at column 3)"),
    ({**_turns(("human", "a"), ("gpt", "b")), "tools": "[1, 2]"},
     "the 'tools' field must be a list of function definitions (JSON objects)"),
    ({**_turns(("human", "a"), ("gpt", "b")), "tools": [{"description": "x"}]}, "tool 1 in 'tools' has no 'name'"),
    ({"conversations": "hi"}, "the 'conversations' field must be a list of turns, not text"),
    ({"conversations": []}, "the 'conversations' list is empty"),
    ({"messages": []}, "the 'conversations' field is missing"),
    ({"conversations": ["hi"]}, "turn 1 is text, not an object"),
    ({"conversations": [{"value": "x"}]}, "turn 1 has no 'from' field"),
    (_turns(("system", "s")), "the 'conversations' list has no turns besides the system prompt"),
])
def test_sharegpt_invalid(record, reason):
    assert _reason(convert_sharegpt, record) == reason


def test_sharegpt_prompt_only_when_reply_not_required():
    conv = convert_sharegpt(_turns(("human", "a"), ("gpt", "b"), ("human", "c")), require_reply=False)
    assert [m["role"] for m in conv.messages] == ["user", "assistant", "user"]


# ----------------------------------------------------------------------------------------------- openai


def test_openai_messages_with_tool_calls():
    record = {
        "messages": [
            {"role": "system", "content": "Be helpful."},
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
            ]},
            {"role": "tool", "tool_call_id": "c1", "content": "21"},
            {"role": "tool", "tool_call_id": "c2", "content": "25"},
            {"role": "assistant", "content": "Paris 21, Rome 25."},
        ],
        "tools": [{"type": "function", "function": TOOLS[0]}],
    }
    conv = convert_openai(record, source="o.jsonl:4")
    assert conv == Conversation(
        messages=[
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                {"name": "get_weather", "arguments": '{"city": "Rome"}'}]},
            {"role": "tool", "content": "21"},
            {"role": "tool", "content": "25"},
            {"role": "assistant", "content": "Paris 21, Rome 25."},
        ],
        system="Be helpful.", tools=[{"type": "function", "function": TOOLS[0]}], source="o.jsonl:4",
    )


@pytest.mark.parametrize("messages, reason", [
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
     "turn 2 is from 'user' but an assistant reply ('assistant') was expected"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}],
     "turn 2 is from 'tool' but an assistant reply ('assistant') was expected"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}],
     "turn 2 ('assistant') content is a number, not text"),
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}],
     "turn 2 has an unknown role 'bot' (expected one of 'user', 'assistant', 'tool', 'function_call', 'system')"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "", "tool_calls": [{"type": "function"}]}],
     "turn 2 ('assistant') tool_calls must be a JSON object with 'name' and 'arguments' (or a list of them)"),
])
def test_openai_invalid(messages, reason):
    assert _reason(convert_openai, {"messages": messages}) == reason


# ----------------------------------------------------------------------------------------------- dispatch, detection


def test_convert_record_uses_the_spec():
    spec = DatasetSpec(name="x", load_from="file", formatting="openai", columns=DEFAULT_COLUMNS["openai"],
                       tags=DEFAULT_TAGS["openai"])
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    assert convert_record(record, spec, "x:1") == Conversation(
        messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], source="x:1")
    with pytest.raises(RecordError, match="the record is a list, not a JSON object"):
        convert_record([1], spec)


@pytest.mark.parametrize("record, expected", [
    ({"instruction": "a", "input": "", "output": "b"}, ("alpaca", "the record has 'instruction', 'input', 'output'")),
    ({"instruction": "a"}, ("alpaca", "the record has 'instruction'")),
    ({"conversations": [{"from": "human", "value": "a"}]},
     ("sharegpt", "'conversations' holds turns with 'from'/'value'")),
    ({"messages": [{"role": "user", "content": "a"}]}, ("openai", "'messages' holds messages with 'role'/'content'")),
    ({"messages": [{"from": "human", "value": "a"}]}, ("sharegpt", "'messages' holds turns with 'from'/'value'")),
])
def test_detect_format(record, expected):
    assert detect_format(record) == expected


def test_detect_format_failures():
    with pytest.raises(RecordError, match=r"only has 'text' \(plain text for pre-training\)"):
        detect_format({"text": "hello"})
    with pytest.raises(RecordError, match=r"the keys \('q', 'a'\) match no known format"):
        detect_format({"q": 1, "a": 2})


def test_detect_mapping_follows_the_record():
    cols, tags = detect_mapping({"messages": [{"from": "user", "value": "a"}]}, "sharegpt")
    assert cols == {"messages": "messages", "system": "system", "tools": "tools"}
    assert (tags["user_tag"], tags["assistant_tag"], tags["role_tag"]) == ("user", "assistant", "from")
    cols, tags = detect_mapping({"conversations": [{"role": "user", "content": "a"}]}, "openai")
    assert cols["messages"] == "conversations"
    assert tags == DEFAULT_TAGS["openai"]
