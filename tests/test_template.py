"""Tests for tunelab.data.template: parity with apply_chat_template, exact label masks, truncation, template choice."""
from __future__ import annotations

import copy

import pytest

from tunelab.data.conversation import Conversation
from tunelab.data.template import (
    QWEN_DEFAULT_SYSTEM,
    get_template,
    hf_messages,
    hf_tools,
    infer_seqlen,
    read_chat_template,
    template_mismatch_warning,
)
from tunelab.errors import ConfigError, DataError

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def single_turn(system: str | None = None) -> Conversation:
    return Conversation(
        messages=[{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"}], system=system
    )


def two_turns(system: str | None = None) -> Conversation:
    return Conversation(
        messages=[
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi there"},
            {"role": "user", "content": "How are you?"},
            {"role": "assistant", "content": "Fine, thanks."},
        ],
        system=system,
    )


def tool_conversation() -> Conversation:
    return Conversation(
        system="You are helpful.",
        tools=TOOLS,
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}],
            },
            {"role": "tool", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "It is 21 degrees."},
        ],
    )


CONVERSATIONS = {
    "single": single_turn(),
    "single+system": single_turn("Be brief."),
    "multi": two_turns(),
    "multi+system": two_turns("Be brief."),
    "tools": tool_conversation(),
}


def reference_ids(tok, conv: Conversation, text: str, *, generation: bool = False, **kwargs) -> list[int]:
    """apply_chat_template(tokenize=True) with the published template text, on the HF form of the conversation."""
    messages = hf_messages(conv)
    if generation:
        messages = messages[:-1]
    return tok.apply_chat_template(
        messages, tools=hf_tools(conv), chat_template=text, tokenize=True, return_dict=False,
        add_generation_prompt=generation, **kwargs,
    )


def prompt_of(conv: Conversation) -> Conversation:
    """The conversation without its last (assistant) message: a generation prompt."""
    return Conversation(messages=conv.messages[:-1], system=conv.system, tools=conv.tools)


def trained_text(tok, ids: list[int], labels: list[int]) -> list[str]:
    """The decoded runs of trained tokens, in order."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


# ----- (b) parity with apply_chat_template ------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CONVERSATIONS))
def test_qwen_parity(qwen_tokenizer, case):
    conv = CONVERSATIONS[case]
    tpl = get_template("qwen", qwen_tokenizer)
    text = read_chat_template("qwen2_5.jinja")
    ids, _ = tpl.encode_supervised(conv)
    assert ids == reference_ids(qwen_tokenizer, conv, text)
    assert ids == reference_ids(qwen_tokenizer, conv, qwen_tokenizer.chat_template)  # the tokenizer's own
    assert tpl.encode_prompt(prompt_of(conv)) == reference_ids(qwen_tokenizer, conv, text, generation=True)


@pytest.mark.parametrize("enable_thinking", [False, True])
@pytest.mark.parametrize("case", list(CONVERSATIONS))
def test_qwen3_parity(qwen_tokenizer, case, enable_thinking):
    conv = CONVERSATIONS[case]
    tpl = get_template("qwen3", qwen_tokenizer, enable_thinking=enable_thinking)
    text = read_chat_template("qwen3.jinja")
    ids, _ = tpl.encode_supervised(conv)
    assert ids == reference_ids(qwen_tokenizer, conv, text, enable_thinking=enable_thinking)
    prompt = tpl.encode_prompt(prompt_of(conv))
    assert prompt == reference_ids(qwen_tokenizer, conv, text, generation=True, enable_thinking=enable_thinking)


@pytest.mark.parametrize("case", ["single", "single+system", "multi", "multi+system"])
def test_llama3_parity(qwen_tokenizer, case):
    conv = CONVERSATIONS[case]
    tpl = get_template("llama3", qwen_tokenizer)
    text = read_chat_template("llama3.jinja")
    ids, _ = tpl.encode_supervised(conv)
    # the Qwen tokenizer has no bos token; the template layer renders it as ""
    assert ids == reference_ids(qwen_tokenizer, conv, text, bos_token="")
    prompt = reference_ids(qwen_tokenizer, conv, text, generation=True, bos_token="")
    assert tpl.encode_prompt(prompt_of(conv)) == prompt


def test_qwen_tool_rendering(qwen_tokenizer):
    conv = tool_conversation()
    conv.messages[1]["tool_calls"][0]["arguments"] = '{"city": "Paris"}'  # a JSON string is rendered as the object
    ids, labels = get_template("qwen", qwen_tokenizer).encode_supervised(conv)
    text = qwen_tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are helpful.\n\n# Tools\n\nYou may call one or more functions")
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert "<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response><|im_end|>\n" in text
    assert trained_text(qwen_tokenizer, ids, labels) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is 21 degrees.<|im_end|>",
    ]


def test_qwen3_generation_prompts(qwen_tokenizer):
    conv = prompt_of(two_turns())
    off = get_template("qwen3", qwen_tokenizer, enable_thinking=False).encode_prompt(conv)
    on = get_template("qwen3", qwen_tokenizer, enable_thinking=True).encode_prompt(conv)
    history = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there<|im_end|>\n"
    ask = "<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n"
    assert qwen_tokenizer.decode(off) == history + ask + "<think>\n\n</think>\n\n"
    assert qwen_tokenizer.decode(on) == history + ask


# ----- (c) exact label masks --------------------------------------------------------------------------------------
def test_single_turn_labels(qwen_tokenizer):
    ids, labels = get_template("qwen", qwen_tokenizer).encode_supervised(single_turn())
    assert qwen_tokenizer.decode(ids) == (
        f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\nHi there<|im_end|>\n"
    )
    assert trained_text(qwen_tokenizer, ids, labels) == ["Hi there<|im_end|>"]
    assert ids[-4:] == [13048, 1052, 151645, 198]  # "Hi", " there", <|im_end|>, "\n"
    assert labels[-4:] == [13048, 1052, 151645, -100]  # the newline after <|im_end|> is not trained
    assert labels.count(-100) == len(ids) - 3


def test_two_turn_labels(qwen_tokenizer):
    tpl = get_template("qwen", qwen_tokenizer)
    ids, labels = tpl.encode_supervised(two_turns())
    assert trained_text(qwen_tokenizer, ids, labels) == ["Hi there<|im_end|>", "Fine, thanks.<|im_end|>"]
    ids_h, labels_h = tpl.encode_supervised(two_turns(), mask_history=True)
    assert ids_h == ids
    assert trained_text(qwen_tokenizer, ids_h, labels_h) == ["Fine, thanks.<|im_end|>"]


def test_train_on_prompt(qwen_tokenizer):
    tpl = get_template("qwen", qwen_tokenizer)
    ids, labels = tpl.encode_supervised(two_turns(), train_on_prompt=True)
    assert labels == ids
    ids, labels = tpl.encode_supervised(two_turns(), train_on_prompt=True, mask_history=True)
    masked = [qwen_tokenizer.decode([t]) for t, label in zip(ids, labels) if label == -100]
    assert masked == ["Hi", " there", "<|im_end|>"]  # only the earlier reply


@pytest.mark.parametrize(
    "name,expected",
    [
        ("qwen3", ["Hi there<|im_end|>", "Fine, thanks.<|im_end|>"]),
        ("chatml", ["Hi there<|im_end|>", "Fine, thanks.<|im_end|>"]),
        ("default", [" Hi there<|im_end|>", " Fine, thanks.<|im_end|>"]),
    ],
)
def test_labels_of_other_templates(qwen_tokenizer, name, expected):
    ids, labels = get_template(name, qwen_tokenizer).encode_supervised(two_turns())
    assert trained_text(qwen_tokenizer, ids, labels) == expected


def test_qwen3_think_block_is_prompt_or_reply(qwen_tokenizer):
    conv = single_turn()
    ids, labels = get_template("qwen3", qwen_tokenizer, enable_thinking=False).encode_supervised(conv)
    assert trained_text(qwen_tokenizer, ids, labels) == ["Hi there<|im_end|>"]
    ids, labels = get_template("qwen3", qwen_tokenizer, enable_thinking=True).encode_supervised(conv)
    assert trained_text(qwen_tokenizer, ids, labels) == ["<think>\n\n</think>\n\nHi there<|im_end|>"]
    reasoning = Conversation(messages=[{"role": "user", "content": "Hi"},
                                       {"role": "assistant", "content": "<think>\nHmm.\n</think>\n\nHello!"}])
    ids, labels = get_template("qwen3", qwen_tokenizer).encode_supervised(reasoning)
    assert trained_text(qwen_tokenizer, ids, labels) == ["<think>\nHmm.\n</think>\n\nHello!<|im_end|>"]


# ----- (d) truncation --------------------------------------------------------------------------------------------
def test_infer_seqlen_rule():
    assert infer_seqlen(100, 10, 50) == (40, 10)  # short reply kept whole
    assert infer_seqlen(10, 100, 50) == (10, 40)  # short prompt kept whole
    assert infer_seqlen(60, 40, 50) == (30, 20)  # both cut in proportion


def long_single_turn() -> Conversation:
    # chatml: prompt = 8 template tokens + 40 content tokens = 48; reply = 20 content tokens + <|im_end|> = 21
    return Conversation(messages=[{"role": "user", "content": "a" + " a" * 39},
                                  {"role": "assistant", "content": "b" + " b" * 19}])


@pytest.mark.parametrize("cutoff,source,target", [(None, 48, 21), (40, 28, 12), (30, 21, 9), (16, 12, 4)])
def test_cutoff_lengths(qwen_tokenizer, cutoff, source, target):
    tpl = get_template("chatml", qwen_tokenizer)
    full_ids, _ = tpl.encode_supervised(long_single_turn())
    ids, labels = tpl.encode_supervised(long_single_turn(), cutoff_len=cutoff)
    tail = 1 if cutoff is None else 0  # the "\n" after <|im_end|>
    assert len(ids) == source + target + tail
    assert labels[:source] == [-100] * source
    assert labels[source : source + target] == full_ids[48 : 48 + target]  # the head of the reply
    assert ids[:source] == full_ids[:source]  # the head of the prompt


def test_cutoff_multi_turn_drops_later_turns_or_history(qwen_tokenizer):
    tpl = get_template("chatml", qwen_tokenizer)
    ids, labels = tpl.encode_supervised(two_turns(), cutoff_len=12)  # turn 1 is 9 prompt + 3 reply tokens
    assert len(ids) == 12
    assert qwen_tokenizer.decode(ids) == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there<|im_end|>"
    assert trained_text(qwen_tokenizer, ids, labels) == ["Hi there<|im_end|>"]
    # last turn first: its 13 prompt + 5 reply tokens fill the budget, the first turn is dropped
    ids, labels = tpl.encode_supervised(two_turns(), cutoff_len=18, mask_history=True)
    assert qwen_tokenizer.decode(ids) == (
        "\n<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\nFine, thanks.<|im_end|>"
    )
    assert trained_text(qwen_tokenizer, ids, labels) == ["Fine, thanks.<|im_end|>"]
    ids, labels = tpl.encode_supervised(two_turns(), cutoff_len=14, mask_history=True)  # prompt cut to 14 - 5 = 9
    assert len(ids) == 14
    assert trained_text(qwen_tokenizer, ids, labels) == ["Fine, thanks.<|im_end|>"]


def test_cutoff_leaving_no_trained_token_returns_none(qwen_tokenizer):
    tpl = get_template("chatml", qwen_tokenizer)
    assert tpl.encode_supervised(long_single_turn(), cutoff_len=1) is None


# ----- (e) choosing templates ------------------------------------------------------------------------------------
def test_auto_uses_the_tokenizers_template(qwen_tokenizer):
    auto = get_template("auto", qwen_tokenizer)
    assert auto.text == qwen_tokenizer.chat_template
    assert auto.encode_supervised(two_turns()) == get_template("qwen", qwen_tokenizer).encode_supervised(two_turns())
    assert auto.stop_token_ids[0] == 151645


def test_auto_without_chat_template_is_a_config_error(qwen_tokenizer):
    bare = copy.deepcopy(qwen_tokenizer)
    bare.chat_template = None
    with pytest.raises(ConfigError, match="Set `template`"):
        get_template("auto", bare)


def test_mismatch_warning(qwen_tokenizer):
    assert template_mismatch_warning(get_template("qwen", qwen_tokenizer), qwen_tokenizer) is None
    assert template_mismatch_warning(get_template("auto", qwen_tokenizer), qwen_tokenizer) is None
    warning = template_mismatch_warning(get_template("chatml", qwen_tokenizer), qwen_tokenizer)
    assert warning is not None and "most common cause of rambling, repeating output" in warning
    bare = copy.deepcopy(qwen_tokenizer)
    bare.chat_template = None
    assert template_mismatch_warning(get_template("chatml", bare), bare) is None


@pytest.mark.parametrize("name,suggestion", [("qwen25", "qwen"), ("lama3", "llama3"), ("ChatML-x", "chatml")])
def test_unknown_template_name(qwen_tokenizer, name, suggestion):
    with pytest.raises(ConfigError) as err:
        get_template(name, qwen_tokenizer)
    message = str(err.value)
    assert f"Did you mean '{suggestion}'?" in message
    assert "auto, qwen, qwen3, chatml, llama3, default" in message


def test_names_stop_tokens_and_default_system(qwen_tokenizer):
    qwen = get_template("QWEN", qwen_tokenizer)
    assert (qwen.name, qwen.default_system) == ("qwen", QWEN_DEFAULT_SYSTEM)
    assert qwen.stop_token_ids == [151645, 151643]
    assert get_template("qwen3", qwen_tokenizer).stop_token_ids == [151645, 151643]
    assert get_template("qwen3", qwen_tokenizer).default_system is None
    assert get_template("chatml", qwen_tokenizer).stop_token_ids == [151645]
    assert get_template("llama3", qwen_tokenizer).end_marker == "<|eot_id|>"


def test_bad_conversations_are_data_errors(qwen_tokenizer):
    tpl = get_template("qwen", qwen_tokenizer)
    starts_with_reply = Conversation(messages=[{"role": "assistant", "content": "Hi"}], source="x.jsonl:3")
    with pytest.raises(DataError, match="x.jsonl:3"):
        tpl.encode_supervised(starts_with_reply)
    with pytest.raises(DataError, match="ends with an assistant message"):
        tpl.encode_prompt(single_turn())


def test_fewshot_template_is_plain_text_and_trains_the_answers(qwen_tokenizer):
    """LLaMA-Factory's evaluation configs name `template: fewshot`: no chat markup, answers followed by a blank line."""
    from tunelab.data.conversation import Conversation
    from tunelab.data.template import get_template

    tpl = get_template("fewshot", qwen_tokenizer)
    conv = Conversation([
        {"role": "user", "content": "Q1? Answer:"}, {"role": "assistant", "content": " A"},
        {"role": "user", "content": "Q2? Answer:"}, {"role": "assistant", "content": " B"},
    ])
    ids, labels = tpl.encode_supervised(conv)
    assert qwen_tokenizer.decode(ids) == "Q1? Answer: A\n\nQ2? Answer: B\n\n"
    assert qwen_tokenizer.decode([i for i, lab in zip(ids, labels) if lab != -100]) == " A B"
    prompt = tpl.encode_prompt(Conversation([{"role": "user", "content": "Q1? Answer:"}]))
    assert qwen_tokenizer.decode(prompt) == "Q1? Answer:"
