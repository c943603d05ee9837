"""Tests for tunelab.data.template: parity with apply_chat_template, exact label masks, truncation, template choice."""
from __future__ import annotations

import copy
import json

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
    assert "auto, qwen, qwen3, qwen3_nothink, chatml, llama3, llama2, default, fewshot" in message


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


# ----- LLaMA-Factory's template names, tools under every shipped template --------------------------------------------
# The published Meta-Llama-3-8B-Instruct chat template (tokenizer_config.json), verbatim: tunelab's llama3 must render
# every conversation without tools exactly as it does.
LLAMA3_8B_INSTRUCT = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.mark.parametrize("case", ["single", "single+system", "multi", "multi+system"])
def test_llama3_without_tools_is_the_published_llama3_text(qwen_tokenizer, case):
    conv = CONVERSATIONS[case]
    tpl = get_template("llama3", qwen_tokenizer)
    assert tpl.encode_supervised(conv)[0] == reference_ids(qwen_tokenizer, conv, LLAMA3_8B_INSTRUCT, bos_token="")
    prompt = reference_ids(qwen_tokenizer, conv, LLAMA3_8B_INSTRUCT, generation=True, bos_token="")
    assert tpl.encode_prompt(prompt_of(conv)) == prompt


LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
                  "<|python_tag|>"]


@pytest.fixture(scope="module")
def llama_like_tokenizer(qwen_tokenizer):
    """No Llama tokenizer offline: the Qwen2.5 vocabulary with Llama-3's special tokens added as special tokens."""
    tok = copy.deepcopy(qwen_tokenizer)
    tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "additional_special_tokens": LLAMA3_SPECIAL[1:]})
    return tok


def test_llama3_renders_tools_and_tool_calls_as_llama31(llama_like_tokenizer):
    """Tool schemas, the call and the tool result as the published Llama-3.1 template writes them (tools in the
    system message); the call is trained, never an empty reply (it used to vanish: LLaMA-Factory's glaive demo)."""
    tok = llama_like_tokenizer
    tpl = get_template("llama3", tok)
    ids, labels = tpl.encode_supervised(tool_conversation())
    schema = json.dumps(TOOLS[0], indent=4)
    assert tok.decode(ids) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\nYou have access to the following functions. To call a function, please respond "
        'with JSON for a function call.Respond in the format {"name": function name, "parameters": dictionary of '
        f"argument name and its value}}.Do not use variables.\n\n{schema}\n\nYou are helpful.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWeather in Paris?<|eot_id|>"
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "Paris"}}'
        "<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n\"{\\\"temp\\\": 21}\"<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nIt is 21 degrees.<|eot_id|>"
    )
    assert trained_text(tok, ids, labels) == [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', "It is 21 degrees.<|eot_id|>"]


def test_llama3_refuses_parallel_calls_naming_the_record(qwen_tokenizer):
    conv = tool_conversation()
    conv.source = "glaive.json:7"
    conv.messages[1]["tool_calls"] = [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}]
    with pytest.raises(DataError, match=r"glaive.json:7.*only supports single tool-calls"):
        get_template("llama3", qwen_tokenizer).encode_supervised(conv)


@pytest.mark.parametrize("name", ["qwen", "qwen3", "qwen3_nothink", "llama3", "default"])
def test_every_tool_writing_template_trains_the_call(qwen_tokenizer, name):
    ids, labels = get_template(name, qwen_tokenizer).encode_supervised(tool_conversation())
    runs = trained_text(qwen_tokenizer, ids, labels)
    assert len(runs) == 2 and "get_weather" in runs[0] and "Paris" in runs[0]


@pytest.mark.parametrize("name", ["chatml", "fewshot"])
def test_a_reply_that_renders_empty_is_an_error_naming_the_record(qwen_tokenizer, name):
    conv = tool_conversation()
    conv.source = "data/calls.json:3"
    with pytest.raises(DataError) as err:
        get_template(name, qwen_tokenizer).encode_supervised(conv)
    assert str(err.value).startswith(
        "Assistant message 2 of the conversation (from data/calls.json:3) renders as an empty reply under the chat "
        f"template '{name}' (its tool calls are not part of this template's format); training on it would teach")


def test_unencodable_samples_stop_the_run_or_are_counted_skips(qwen_tokenizer):
    from tunelab.data.processing import encode_conversations

    convs = [single_turn(), tool_conversation(), two_turns()]
    tpl = get_template("chatml", qwen_tokenizer)
    with pytest.raises(DataError, match="renders as an empty reply"):
        encode_conversations(convs, tpl, cutoff_len=64, train_on_prompt=False, mask_history=False)
    skipped: list[str] = []
    data, dropped = encode_conversations(convs, tpl, cutoff_len=64, train_on_prompt=False, mask_history=False,
                                         skip_invalid=True, skipped=skipped)
    assert (len(data), dropped, len(skipped)) == (2, 0, 1)
    assert "renders as an empty reply" in skipped[0]


def test_qwen3_nothink(qwen_tokenizer):
    """The Qwen3-Instruct-2507 format: Qwen3's text, no think block in the prompt or in the reply."""
    tpl = get_template("qwen3_nothink", qwen_tokenizer)
    ids, labels = tpl.encode_supervised(two_turns("Be brief."))
    assert qwen_tokenizer.decode(ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
        "Hi there<|im_end|>\n<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\nFine, thanks."
        "<|im_end|>\n")
    assert trained_text(qwen_tokenizer, ids, labels) == ["Hi there<|im_end|>", "Fine, thanks.<|im_end|>"]
    assert qwen_tokenizer.decode(tpl.encode_prompt(prompt_of(single_turn()))) == (
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    assert tpl.stop_token_ids == [151645, 151643] and tpl.default_system is None
    # Everything else is the published Qwen3 text: a prompt with tools, a call and its result renders as qwen3's.
    conv = tool_conversation()
    qwen3 = read_chat_template("qwen3.jinja")
    assert tpl.encode_prompt(prompt_of(conv)) == reference_ids(qwen_tokenizer, conv, qwen3, generation=True)
    # reasoning the data carries is kept, as the published template keeps it
    reasoned = Conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\nhm\n</think>\n\nHello"}])
    assert "<think>\nhm\n</think>\n\nHello" in qwen_tokenizer.decode(tpl.encode_supervised(reasoned)[0])


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl_nothink", "llava", "mllama", "QWEN2_VL"])
def test_vision_language_templates_are_refused(qwen_tokenizer, name):
    with pytest.raises(ConfigError) as err:
        get_template(name, qwen_tokenizer)
    assert f"template '{name}' is LLaMA-Factory's template for a vision-language" in str(err.value)
    assert "images, videos and audio are not supported: tunelab fine-tunes text-only models" in str(err.value)


@pytest.mark.parametrize("name", ["llama2_zh", "deepseek", "deepseek3", "deepseekr1", "mistral"])
def test_other_llamafactory_templates_point_to_auto(name):
    from tunelab.data.template import check_template_name

    with pytest.raises(ConfigError) as err:
        check_template_name(name)
    assert f"template '{name}' is a LLaMA-Factory template that tunelab does not ship; use `template: auto`" in str(
        err.value)


# The published Llama-2-7b-chat-hf chat template (tokenizer_config.json), verbatim.
LLAMA2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def llama2_tokenizer(qwen_tokenizer):
    """The Qwen2.5 vocabulary with Llama-2's bos and eos as special tokens (no Llama tokenizer offline)."""
    tok = copy.deepcopy(qwen_tokenizer)
    tok.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    return tok


@pytest.mark.parametrize("case", ["single", "multi+system"])
def test_llama2_is_the_published_llama2_chat_text(llama2_tokenizer, case):
    tok = llama2_tokenizer
    conv = CONVERSATIONS[case]
    tpl = get_template("llama2", tok)
    ids, labels = tpl.encode_supervised(conv)
    assert ids == reference_ids(tok, conv, LLAMA2_CHAT)
    expected = [" Hi there </s>"] if case == "single" else [" Hi there </s>", " Fine, thanks. </s>"]
    assert trained_text(tok, ids, labels) == expected
    assert tok.decode(tpl.encode_prompt(prompt_of(conv))).endswith("[INST] " + conv.messages[-2]["content"] + " [/INST]")
