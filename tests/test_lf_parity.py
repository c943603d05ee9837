"""Tests for tools/lf_parity.py's classifier: each class explains exactly its difference, anything else is
"unexplained" (so the parity summary cannot hide a real difference under a known class)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("lf_parity", Path(__file__).parents[1] / "tools" / "lf_parity.py")
lf_parity = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(lf_parity)

USER = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def _row(tok, prompt: str, reply: str, tail: str = ""):
    """[ids, labels] with the reply trained and the prompt and tail masked."""
    p, r, t = (tok(x, add_special_tokens=False)["input_ids"] if x else [] for x in (prompt, reply, tail))
    return [p + r + t, [-100] * len(p) + r + [-100] * len(t)]


def test_identical_and_newline_label(qwen_tokenizer):
    mine = _row(qwen_tokenizer, USER, "Yo<|im_end|>", "\n")
    lf = _row(qwen_tokenizer, USER, "Yo<|im_end|>\n")
    assert lf_parity.classify(qwen_tokenizer, "qwen", mine, mine, mine, None) == ["identical"]
    # the newline class needs the exact check: tunelab with LLaMA-Factory's convention equal to LLaMA-Factory
    assert lf_parity.classify(qwen_tokenizer, "qwen", mine, lf, lf, None) == ["newline-label"]
    assert lf_parity.classify(qwen_tokenizer, "qwen", mine, lf, mine, None) == ["unexplained"]


def test_text_classes_apply_only_to_their_template_and_difference(qwen_tokenizer):
    mine = _row(qwen_tokenizer, USER, "Yo<|im_end|>")
    lf = _row(qwen_tokenizer, "<|im_start|>system\n<|im_end|>\n" + USER, "Yo<|im_end|>")
    assert lf_parity.classify(qwen_tokenizer, "qwen3", mine, lf, mine, None) == ["empty-tools-system-turn"]
    assert lf_parity.classify(qwen_tokenizer, "qwen", mine, lf, mine, None) == ["unexplained"]
    think = _row(qwen_tokenizer, USER, "<think>\n\n</think>\n\nYo<|im_end|>")
    assert lf_parity.classify(qwen_tokenizer, "qwen3", mine, think, mine, None) == ["qwen3-history-think"]
    other = _row(qwen_tokenizer, USER, "Yo!<|im_end|>")
    assert lf_parity.classify(qwen_tokenizer, "qwen3", mine, other, mine, None) == ["unexplained"]


@pytest.mark.parametrize("mine, lf, expected", [
    ("tunelab refuses: a sentence", [[1], [1]], ["tunelab-refuses"]),
    ("tunelab refuses: a sentence", None, ["both-refuse"]),
    ([[1], [1]], None, ["lf-drops"]),
])
def test_refusals(qwen_tokenizer, mine, lf, expected):
    assert lf_parity.classify(qwen_tokenizer, "qwen", mine, lf, mine, None) == expected


def test_llama31_tool_format_normalisation():
    ours = ('<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\nCutting Knowledge Date: December 2023\n'
            'Today Date: 26 Jul 2024\n\nYou have access to the following functions. To call a function, please '
            'respond with JSON for a function call.Respond in the format {"name": function name, "parameters": '
            'dictionary of argument name and its value}.Do not use variables.\n\n<|eot_id|>'
            '<|start_header_id|>ipython<|end_header_id|>\n\n"{\\"a\\": 1}"<|eot_id|>')
    theirs = ('<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 01 Dec '
              '2026\n\nYou have access to the following functions. To call a function, please respond with JSON for a '
              'function call. Respond in the format {"name": function name, "parameters": dictionary of argument name '
              'and its value}. Do not use variables.\n\n<|eot_id|>'
              '<|start_header_id|>ipython<|end_header_id|>\n\n{"a": 1}<|eot_id|>')
    assert lf_parity._norm_llama31_tools(ours) == lf_parity._norm_llama31_tools(theirs)
    assert lf_parity._norm_llama31_tools(ours) != lf_parity._norm_llama31_tools(theirs.replace("1}", "2}"))
