"""The one in-memory shape of a training / inference sample, whatever file format it came from.

Readers and format converters (alpaca, sharegpt, openai) produce `Conversation`s; the template layer turns a
`Conversation` into token ids and labels. Nothing here knows about tokenizers or files.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("user", "assistant", "tool")


@dataclass
class Conversation:
    """One sample.

    messages: dicts with "role" in ROLES and "content" (str). An assistant message may carry
        "tool_calls": [{"name": str, "arguments": dict | str}] (ShareGPT function_call turns);
        a "tool" message is a tool/function result (ShareGPT observation turns).
        Training samples end with an assistant message; prompts for generation end with a user/tool message.
    system: the system prompt, or None for "not given" (templates may then insert their default).
    tools: function schemas (OpenAI style {"type": "function", "function": {...}} or bare {"name", ...}), or None.
    source: where the sample came from, for error messages ("data/train.jsonl:17").
    """

    messages: list[dict[str, Any]]
    system: str | None = None
    tools: list[dict[str, Any]] | None = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_openai_messages(self) -> list[dict[str, Any]]:
        """The conversation as the messages list that `tokenizer.apply_chat_template` expects."""
        out: list[dict[str, Any]] = []
        if self.system is not None:
            out.append({"role": "system", "content": self.system})
        for m in self.messages:
            msg: dict[str, Any] = {"role": m["role"], "content": m.get("content", "")}
            if m.get("tool_calls"):
                msg["tool_calls"] = [
                    {"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                    for c in m["tool_calls"]
                ]
            out.append(msg)
        return out
