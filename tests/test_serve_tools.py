"""Qwen tool-call parsing (tunelab.serve.tools) on exact strings: whole answers and every way a stream can split them."""
from __future__ import annotations

import json

import pytest

from tunelab.serve.tools import ToolCallParser, parse_all, parse_call

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
WEATHER = {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def _stream(text: str, size: int):
    parser = ToolCallParser()
    events = []
    for i in range(0, len(text), size):
        events += parser.feed(text[i : i + size])
    events += parser.finish()
    content = "".join(v for k, v in events if k == "content")
    return content, [v for k, v in events if k == "tool_call"], events


@pytest.mark.parametrize(
    "text, content, calls",
    [
        ("Hello there.", "Hello there.", []),
        (CALL, "", [WEATHER]),
        ("Let me check.\n" + CALL, "Let me check.", [WEATHER]),
        (CALL + "\nDone.\n", "Done.", [WEATHER]),
        ("Hi \n there \n", "Hi \n there \n", []),
        (CALL + "\n" + CALL.replace("Paris", "Rome"), "", [WEATHER, {"name": "get_weather", "arguments": '{"city": "Rome"}'}]),
        ('<tool_call>\n{"name": "now"}\n</tool_call>', "", [{"name": "now", "arguments": "{}"}]),
        ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', "", [{"name": "f", "arguments": '{"a": 1}'}]),
        ("<tool_call>\nnot json\n</tool_call>", "<tool_call>\nnot json\n</tool_call>", []),  # kept as text
        ('<tool_call>\n{"arguments": {}}\n</tool_call>', '<tool_call>\n{"arguments": {}}\n</tool_call>', []),  # no name
        ('<tool_call>\n{"name": "f"', '<tool_call>\n{"name": "f"', []),  # unterminated: content
        ("a < b and <tool", "a < b and <tool", []),  # a marker prefix at the end is content after all
        ("  \n", "  \n", []),  # whitespace alone, no calls: kept
        ('{"name": "x"}', '{"name": "x"}', []),
        ('<tool_call>\n{"name": "天气", "arguments": {"城市": "北京"}}\n</tool_call>', "", [{"name": "天气", "arguments": '{"城市": "北京"}'}]),
    ],
)
def test_whole_answers(text, content, calls):
    assert parse_all(text) == (content, calls)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 11, 1000])
@pytest.mark.parametrize("text", ["Hello there.", CALL, "Let me check.\n" + CALL + "\nDone.", "x <tool_call>\nnot json\n</tool_call> y", "a <tool"])
def test_streamed_pieces_give_the_whole_answer(text, size):
    content, calls, events = _stream(text, size)
    assert (content, calls) == parse_all(text)
    if parse_all(text)[1]:
        assert not any("<tool_call>" in v for k, v in events if k == "content")  # a call never leaks as text


def test_content_before_a_call_is_streamed_before_it_completes():
    parser = ToolCallParser()
    assert parser.feed("Sure, checking") == [("content", "Sure, checking")]
    assert parser.feed(" now.\n<tool_") == [("content", " now.")]  # the newline and the marker prefix are held
    assert parser.feed('call>\n{"name": "get_weather",') == []
    assert parser.feed(' "arguments": {"city": "Paris"}}\n</tool_call>') == [("tool_call", WEATHER)]
    assert parser.finish() == []


def test_parse_call_arguments_are_a_json_string():
    call = parse_call('{"name": "f", "arguments": {"b": [1, 2], "a": "x"}}')
    assert call == {"name": "f", "arguments": '{"b": [1, 2], "a": "x"}'}
    assert json.loads(call["arguments"]) == {"b": [1, 2], "a": "x"}
    assert parse_call('{"name": "f", "parameters": {"q": 1}}') == {"name": "f", "arguments": '{"q": 1}'}
    assert parse_call("[1, 2]") is None
