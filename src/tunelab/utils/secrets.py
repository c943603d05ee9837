"""Secrets never reach a saved file or a log: `redact(mapping)` replaces the values of secret keys.

A key is secret when it names a token or an API key: hf_hub_token, swanlab_api_key, and any key ending in
`_token` or containing `api_key` / `apikey` / `password` / `secret` (so later tracker keys are covered too).
Token *counts* and token *choices* (max_new_tokens, use_fast_tokenizer, ...) are not secrets.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

REDACTED = "<redacted>"
_SECRET = re.compile(r"(_token$|^token$|api_?key|password|secret)", re.IGNORECASE)


def is_secret_key(key: str) -> bool:
    return bool(_SECRET.search(str(key)))


def redact(values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy with every set secret value replaced by <redacted> (unset ones stay None); nested dicts too."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out[key] = redact(value)
        elif is_secret_key(key) and value not in (None, ""):
            out[key] = REDACTED
        else:
            out[key] = value
    return out
