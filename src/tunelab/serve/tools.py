"""Qwen's tool-call output (`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`) -> OpenAI tool_calls,
for whole answers and for streams.

One parser serves both: `ToolCallParser.feed(text)` takes text pieces as they are generated and returns events
(("content", text) or ("tool_call", {"name", "arguments"})); `finish()` flushes. The non-streamed answer is the
parser fed the whole text at once, so a stream's events joined always equal the non-streamed answer.
Rules: text outside the markers is content; whitespace next to a call is layout, not content (trailing whitespace
is held back until real text follows, so the newlines around tool calls are never sent); a block whose JSON does not parse, or that lacks a name, is
kept as content text, markers and all (nothing the model wrote is dropped); an unterminated block at the end is
content too. Arguments are sent as a JSON string, as OpenAI does.
"""
from __future__ import annotations

import json
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker (text that may become the marker)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


def parse_call(block: str) -> dict[str, Any] | None:
    """{"name", "arguments": JSON string} from the text between the markers, or None if it is not a call."""
    try:
        obj = json.loads(block.strip())
    except (json.JSONDecodeError, ValueError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    return {"name": obj["name"], "arguments": args}


class ToolCallParser:
    def __init__(self) -> None:
        self.buf = ""
        self.inside = False
        self.pending_ws = ""
        self.calls = 0
        self.emitted_after_call = False

    def feed(self, text: str) -> list[tuple[str, Any]]:
        self.buf += text
        events: list[tuple[str, Any]] = []
        while True:
            if not self.inside:
                at = self.buf.find(OPEN)
                if at < 0:
                    keep = _partial_suffix(self.buf, OPEN)
                    self._content(self.buf[: len(self.buf) - keep], events)
                    self.buf = self.buf[len(self.buf) - keep :]
                    return events
                self._content(self.buf[:at], events)
                self.buf, self.inside = self.buf[at + len(OPEN) :], True
            else:
                at = self.buf.find(CLOSE)
                if at < 0:
                    return events
                block, self.buf, self.inside = self.buf[:at], self.buf[at + len(CLOSE) :], False
                call = parse_call(block)
                if call is None:
                    self._content(OPEN + block + CLOSE, events)
                else:
                    self.pending_ws = ""  # the whitespace before a call is layout, not content
                    self.calls += 1
                    self.emitted_after_call = False
                    events.append(("tool_call", call))

    def finish(self) -> list[tuple[str, Any]]:
        events: list[tuple[str, Any]] = []
        rest = (OPEN if self.inside else "") + self.buf
        self.buf, self.inside = "", False
        self._content(rest, events)
        if self.pending_ws and not self.calls:
            events.append(("content", self.pending_ws))
        self.pending_ws = ""
        return events

    def _content(self, text: str, events: list[tuple[str, Any]]) -> None:
        """Emit text, holding back its trailing whitespace (layout if a call follows, content if text follows);
        after a call, leading whitespace is layout too."""
        if not text:
            return
        body = text.rstrip()
        if not body:
            self.pending_ws += text
            return
        lead = self.pending_ws
        if self.calls and not self.emitted_after_call:
            body, lead = body.lstrip(), ""
            self.emitted_after_call = True
        events.append(("content", lead + body))
        self.pending_ws = text[len(text.rstrip()) :]


def parse_all(text: str) -> tuple[str, list[dict[str, Any]]]:
    """(content, calls) of a whole answer: the same parser as for streams."""
    parser = ToolCallParser()
    events = parser.feed(text) + parser.finish()
    content = "".join(v for k, v in events if k == "content")
    return content, [v for k, v in events if k == "tool_call"]
