"""The one template / encoding layer: `Conversation` -> token ids (and labels), for training, chat, eval and the API.

    tpl = get_template("qwen", tokenizer)               # or "qwen3", "qwen3_nothink", "llama3", "chatml", "default", "auto"
    input_ids, labels = tpl.encode_supervised(conv, cutoff_len=2048)
    prompt_ids = tpl.encode_prompt(conv)                 # for generation; stop on tpl.stop_token_ids

How it works, and why this way:
- Every named template is a Jinja chat template shipped in `tunelab/resources/chat_templates/` (the published text
  for Qwen2.5, Qwen3, Llama-3; a plain ChatML and a simple "Human:/Assistant:" one). Rendering always goes through
  `tokenizer.apply_chat_template(..., tokenize=False, chat_template=<text>)`, and the text is tokenized once with
  `add_special_tokens=False`, which is exactly what `apply_chat_template(tokenize=True)` does. So what we train on is
  token for token what the model's own chat template (and vLLM, llama.cpp, the HF pipeline) produces at inference.
  There is no second, hand-written copy of any format that could drift.
- Labels come from character spans. For assistant message i, the reply starts where the generation prompt of the
  conversation before it ends: render(msgs[:i], add_generation_prompt=True) must be a prefix of the full text. It
  ends right after the turn's end marker (`<|im_end|>` for ChatML/Qwen, `<|eot_id|>` for Llama-3, eos for
  "default"), which is found by rendering a probe conversation, so it also works for `auto` templates. The end
  marker IS trained (the model must learn to stop); what the template writes after it (the newline of ChatML) is not:
  generation stops at the marker, so the model never writes that newline (LLaMA-Factory trains it; docs/parity.md).
  A token is trained when its character span lies entirely inside a reply span; all other labels are -100.
- Templates that are not prefix-stable get a template-specific fallback: Qwen3 renders an empty think block
  `<think>\n\n</think>\n\n` in the final reply but drops think blocks from earlier turns, so the generation prompt is
  also tried with `enable_thinking` flipped, and a reply's end is searched forward from its start when the turn
  rendered alone is not a prefix of the full text. When no rule locates a reply, a `DataError` says so: we never
  guess a mask.
- With enable_thinking=False, Qwen3's generation prompt holds the empty think block, so it is prompt (not trained)
  in the final reply; with enable_thinking=True the think block is part of the trained reply.
- A reply that renders as nothing but its end marker (a tool call under a template with no tool-call format) is a
  DataError naming the sample, never a silently trained empty turn; the training data path skips and counts such
  samples under skip_invalid.
- cutoff_len truncation works on (prompt, reply) token pairs, one per assistant turn, like LLaMA-Factory: each pair
  gets `infer_seqlen(len(prompt), len(reply), remaining)`; each part keeps its head; once the budget is spent the
  remaining pairs are dropped. With mask_history the budget goes to the last turn first. See `infer_seqlen`.

Messages are given to the template in Hugging Face form (`Conversation.to_openai_messages()`), with two
normalisations that every Qwen-style template expects: tool-call `arguments` given as a JSON string become the
object (Qwen2.5's template pipes them through `tojson`, which would double-encode a string), and bare tool schemas
`{"name": ...}` are wrapped as `{"type": "function", "function": {...}}` as transformers does for Python functions.
"""
from __future__ import annotations

import copy
import difflib
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from tunelab.data.conversation import Conversation
from tunelab.utils.resources import read_chat_template
from tunelab.errors import ConfigError, DataError, ModelError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

# name -> file in resources/chat_templates
TEMPLATE_FILES = {
    "qwen": "qwen2_5.jinja",
    "qwen3": "qwen3.jinja",
    "qwen3_nothink": "qwen3_nothink.jinja",
    "chatml": "chatml.jinja",
    "llama3": "llama3.jinja",
    "llama2": "llama2.jinja",
    "default": "default.jinja",
    "fewshot": "fewshot.jinja",
}
TEMPLATE_NAMES = ("auto", *TEMPLATE_FILES)
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# The system prompt a template writes when the conversation gives none (documentation; the Jinja text inserts it).
DEFAULT_SYSTEMS = {"qwen": QWEN_DEFAULT_SYSTEM}
# Stop tokens besides the turn end marker and eos: Qwen models also end documents with <|endoftext|>.
EXTRA_STOP_TOKENS = {key: ("<|endoftext|>",) for key in ("qwen", "qwen3", "qwen3_nothink")}
# LLaMA-Factory 0.9.5's templates for vision / audio / video models (those registered with a multimodal plugin).
VISION_TEMPLATES = frozenset("""
    dots_ocr ernie_vl gemma3 gemma3n gemma4 gemma4n glm4v glm4_5v glm_ocr granite3_vision intern_vl intern_s1 keye_vl
    kimi_vl lfm2_vl llama4 mllama llava llava_next llava_next_llama3 llava_next_mistral llava_next_qwen llava_next_yi
    llava_next_video llava_next_video_mistral llava_next_video_yi mimo_vl minicpm_v minicpm_v_4_6 minicpm_o
    mistral_small ministral3 paligemma paligemma_chat pixtral qwen2_audio qwen2_omni qwen3_omni qwen3_omni_nothink
    qwen2_vl qwen2_5_vl qwen3_vl qwen3_vl_nothink qwen3_5 qwen3_5_nothink qwen3_6 video_llava yi_vl youtu_vl
""".split())
# LLaMA-Factory 0.9.5's text templates that tunelab does not ship as named templates: `auto` (the model's own
# published chat template) is the way to train those models.
OTHER_LF_TEMPLATES = frozenset("""
    bailing bailing_v2 breeze chatglm3 chatml_de cohere cpm4 dbrx deepseek deepseek3 deepseekr1 hy3 deepseekcoder empty
    ernie ernie_nothink exaone falcon falcon_h1 gemma gemma2 glm4 glm4_moe glm4_7 glmz1 gpt_oss granite3 granite4 index
    hunyuan hunyuan_small intern2 lfm2 llama2_zh moonlight mimo mimo_v2 minimax1 minimax2 ministral mistral olmo
    openchat openchat-3.6 opencoder phi phi_small phi4 phi4_mini sailor seed_coder seed_oss smollm smollm2 solar
    starchat telechat2 vicuna xuanyuan yi youtu yuan zephyr aeva
""".split())
_THINK_BLOCK = re.compile(r"^<think>\s*</think>")

_PROBE_REPLY = "Tunelab probe reply."
_PROBE_CONVERSATIONS = (
    [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi there."},
        {"role": "user", "content": "How are you?"},
    ],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
)


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """How many prompt and reply tokens of one turn to keep within `cutoff_len` (LLaMA-Factory's rule).

    A short reply (under half the budget) is kept whole and the prompt gets the rest; else a short prompt is kept
    whole and the reply gets the rest; else both are cut in proportion to their lengths.
    """
    if target_len * 2 < cutoff_len:
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target_len = cutoff_len - source_len
    else:
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    new_source_len = min(max(cutoff_len - new_target_len, 0), source_len)
    return new_source_len, new_target_len


def _normalize_tool_call(call: dict[str, Any]) -> dict[str, Any]:
    """A tool call whose JSON-string arguments are parsed into the object the templates expect."""
    function = dict(call.get("function", call))
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            function["arguments"] = parsed
    return {"type": "function", "function": function} if "function" in call else function


def hf_messages(conv: Conversation) -> list[dict[str, Any]]:
    """The conversation as Hugging Face chat messages, normalised for Qwen-style templates (see module doc)."""
    messages = conv.to_openai_messages()
    for message in messages:
        if message.get("content") is None:
            message["content"] = ""
        if message.get("tool_calls"):
            message["tool_calls"] = [_normalize_tool_call(call) for call in message["tool_calls"]]
    return messages


def hf_tools(conv: Conversation) -> list[dict[str, Any]] | None:
    """The conversation's tool schemas in OpenAI form ({"type": "function", "function": {...}}), or None."""
    if not conv.tools:
        return None
    return [tool if "function" in tool else {"type": "function", "function": tool} for tool in conv.tools]


def _where(conv: Conversation) -> str:
    """' (from <source>)' for error messages, or ''."""
    return f" (from {conv.source})" if conv.source else ""


@dataclass
class _Turn:
    """Token index ranges of one (prompt, reply) pair: prompt = [src_start, tgt_start), reply = [tgt_start, tgt_end)."""

    src_start: int
    tgt_start: int
    tgt_end: int


class ChatTemplate:
    """A chat format bound to a tokenizer: renders conversations and encodes them for training or generation."""

    def __init__(
        self,
        name: str,
        text: str,
        tokenizer: Any,
        *,
        enable_thinking: bool = False,
        default_system: str | None = None,
        extra_stop_tokens: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.text = text
        self.tokenizer = tokenizer
        self.enable_thinking = enable_thinking
        self.default_system = default_system
        self.end_marker = self._probe_end_marker()
        self.stop_token_ids = self._stop_token_ids(extra_stop_tokens)

    def __repr__(self) -> str:
        return f"ChatTemplate(name={self.name!r}, end_marker={self.end_marker!r}, stop_token_ids={self.stop_token_ids})"

    # ----- rendering -------------------------------------------------------------------------------------------
    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = False,
        enable_thinking: bool | None = None,
    ) -> str:
        """The template's text for HF-form messages (what `apply_chat_template(tokenize=False)` returns)."""
        kwargs: dict[str, Any] = {
            "enable_thinking": self.enable_thinking if enable_thinking is None else enable_thinking
        }
        # Templates that mention bos/eos still render with a tokenizer that lacks them (Llama-3's on a Qwen vocab).
        if self.tokenizer.bos_token is None:
            kwargs["bos_token"] = ""
        if self.tokenizer.eos_token is None:
            kwargs["eos_token"] = ""
        return self.tokenizer.apply_chat_template(
            messages,
            tools=tools,
            chat_template=self.text,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )

    def _render_conv(self, conv: Conversation, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        """`render` with template errors turned into a DataError naming the sample."""
        try:
            return self.render(messages, tools=hf_tools(conv), **kwargs)
        except Exception as exc:  # jinja2 errors, raise_exception() in templates, type errors on odd content
            raise DataError(
                f"The chat template '{self.name}' cannot render the conversation{_where(conv)}: {exc}. "
                "Check the roles and contents of its messages."
            ) from exc

    def render_prompt(self, conv: Conversation) -> str:
        """The generation prompt text for a conversation that ends with a user or tool message."""
        _check_prompt_conversation(conv)
        return self._render_conv(conv, hf_messages(conv), add_generation_prompt=True)

    # ----- encoding --------------------------------------------------------------------------------------------
    def encode_prompt(self, conv: Conversation) -> list[int]:
        """Token ids for generation: the conversation plus the generation prompt, exactly as apply_chat_template."""
        return self._tokenize(self.render_prompt(conv))

    def encode_supervised(
        self,
        conv: Conversation,
        cutoff_len: int | None = None,
        *,
        train_on_prompt: bool = False,
        mask_history: bool = False,
    ) -> tuple[list[int], list[int]] | None:
        """(input_ids, labels) for supervised fine-tuning; labels are -100 where no loss is taken.

        Every assistant reply (its content through the turn's end marker) is trained; with mask_history only the
        last one is. train_on_prompt trains the prompt tokens too. cutoff_len truncates turn by turn (see the
        module doc and `infer_seqlen`). Returns None when no trained token is left.
        """
        if cutoff_len is not None and cutoff_len <= 0:
            raise ConfigError(f"cutoff_len must be a positive number of tokens, got {cutoff_len}.")
        messages = hf_messages(conv)
        _check_supervised_conversation(conv, messages)
        full = self._render_conv(conv, messages)
        spans = self._reply_spans(conv, messages, full)
        ids, offsets = self._tokenize_with_offsets(full)
        turns = _turn_ranges(offsets, spans)
        return _assemble(ids, turns, cutoff_len, train_on_prompt, mask_history)

    def _tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _tokenize_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        try:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError as exc:
            raise ModelError(
                "Training needs a fast (Rust `tokenizers`) tokenizer to map tokens to characters; this model's "
                "tokenizer is a slow Python one. Use a model folder that has a tokenizer.json."
            ) from exc
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    # ----- locating replies ------------------------------------------------------------------------------------
    def _reply_spans(self, conv: Conversation, messages: list[dict[str, Any]], full: str) -> list[tuple[int, int]]:
        """Character spans [start, end) of every assistant reply in the full text, checked to be in order."""
        spans: list[tuple[int, int]] = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = self._reply_start(conv, messages[:i], full)
            end = self._reply_end(conv, messages[: i + 1], full, start)
            if spans and start < spans[-1][1]:
                raise self._unlocatable(conv, i, "its reply overlaps the previous one")
            self._check_not_empty(conv, i, message, full[start:end])
            spans.append((start, end))
        return spans

    def _check_not_empty(self, conv: Conversation, index: int, message: dict[str, Any], reply: str) -> None:
        """A reply that renders as nothing but its end marker (and an empty think block) would train the model to
        answer with nothing: typically a template that has no format for the message's tool calls."""
        text = reply[: -len(self.end_marker)] if self.end_marker and reply.endswith(self.end_marker) else reply
        if _THINK_BLOCK.sub("", text.strip()).strip():
            return
        why = (" (its tool calls are not part of this template's format)" if message.get("tool_calls")
               else " (the message has no content)")
        raise DataError(
            f"Assistant message {index} of the conversation{_where(conv)} renders as an empty reply under the chat "
            f"template '{self.name}'{why}; training on it would teach the model to answer with nothing. Use a "
            "template that writes tool calls (qwen, qwen3, qwen3_nothink, llama3, default), fix the record, or set "
            "`skip_invalid: true` to skip such records (the number skipped is reported)."
        )

    def _reply_start(self, conv: Conversation, before: list[dict[str, Any]], full: str) -> int:
        """Where a reply starts: the end of the generation prompt of the conversation before it."""
        head = self._render_conv(conv, before)
        if not full.startswith(head):
            raise self._unlocatable(conv, len(before), "the conversation before it renders differently on its own")
        # Qwen3 drops the empty think block from earlier turns: then the prompt without it is the prefix.
        for thinking in (self.enable_thinking, not self.enable_thinking):
            prompt = self._render_conv(conv, before, add_generation_prompt=True, enable_thinking=thinking)
            if full.startswith(prompt):
                return len(prompt)
        raise self._unlocatable(conv, len(before), "its generation prompt is not where the reply begins")

    def _reply_end(self, conv: Conversation, through: list[dict[str, Any]], full: str, start: int) -> int:
        """Where a reply ends: just after the turn's end marker (or at the turn's end, less whitespace, if none)."""
        turn = self._render_conv(conv, through)
        marker = self.end_marker
        if full.startswith(turn):
            if not marker:
                return start + len(full[start : len(turn)].rstrip())
            pos = full.rfind(marker, start, len(turn))
        else:  # not prefix-stable (Qwen3 renders a final reply differently): search forward
            pos = full.find(marker, start) if marker else -1
        if pos < 0:
            raise self._unlocatable(conv, len(through) - 1, f"its end marker {marker!r} is missing")
        return pos + len(marker)

    def _unlocatable(self, conv: Conversation, index: int, why: str) -> DataError:
        return DataError(
            f"Cannot find where assistant message {index} starts and ends in the text of chat template "
            f"'{self.name}'{_where(conv)}: {why}. This template is not prefix-stable for this conversation, so its "
            "training labels cannot be derived safely; use a named template (qwen, qwen3, qwen3_nothink, llama3, chatml, "
            "default)."
        )

    # ----- stop tokens -----------------------------------------------------------------------------------------
    def _probe_end_marker(self) -> str:
        """The text the template writes right after an assistant reply, without surrounding whitespace."""
        messages = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": _PROBE_REPLY}]
        try:
            text = self.render(messages)
        except Exception:  # a template that cannot render the probe: fall back to eos
            return self.tokenizer.eos_token or ""
        pos = text.rfind(_PROBE_REPLY)
        if pos < 0:
            return self.tokenizer.eos_token or ""
        return text[pos + len(_PROBE_REPLY) :].strip()

    def _stop_token_ids(self, extra: tuple[str, ...]) -> list[int]:
        """Ids that end a generated reply: the end marker (if one token), eos, and template extras."""
        vocab = self.tokenizer.get_vocab()
        ids: list[int] = []
        if self.end_marker in vocab:
            ids.append(vocab[self.end_marker])
        elif self.end_marker:
            logger.warning(
                "The chat template '%s' ends turns with %r, which is not a single token of this tokenizer; generation "
                "cannot stop on it. The template probably does not belong to this model.",
                self.name,
                self.end_marker,
            )
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        ids.extend(vocab[token] for token in extra if token in vocab)
        return list(dict.fromkeys(ids))


# ----- conversation checks ---------------------------------------------------------------------------------------
def _check_prompt_conversation(conv: Conversation) -> None:
    """A prompt for generation must end with a user or tool message."""
    if not conv.messages:
        raise DataError(f"The conversation{_where(conv)} has no messages, so there is nothing to prompt with.")
    if conv.messages[-1]["role"] == "assistant":
        raise DataError(
            f"A generation prompt must end with a user or tool message, but the conversation{_where(conv)} ends "
            "with an assistant message."
        )


def _check_supervised_conversation(conv: Conversation, messages: list[dict[str, Any]]) -> None:
    """A training sample needs a user message first and at least one assistant reply."""
    roles = [m["role"] for m in messages if m["role"] != "system"]
    if not roles or roles[0] != "user":
        raise DataError(
            f"A training conversation must start with a user message (after an optional system prompt); the one"
            f"{_where(conv)} starts with {roles[0] if roles else 'nothing'!r}."
        )
    if "assistant" not in roles:
        raise DataError(f"The training conversation{_where(conv)} has no assistant message, so nothing to learn.")


# ----- labels and truncation -------------------------------------------------------------------------------------
def _turn_ranges(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[_Turn]:
    """Token ranges of each (prompt, reply) pair; reply tokens are those lying entirely inside a reply span."""
    turns: list[_Turn] = []
    j, n, prev_end = 0, len(offsets), 0
    for start, end in spans:
        while j < n and offsets[j][0] < start:  # prompt tokens, including one straddling the reply start
            j += 1
        first = j
        while j < n and offsets[j][1] <= end:
            j += 1
        turns.append(_Turn(prev_end, first, j))
        prev_end = j
    return turns


def _assemble(
    ids: list[int], turns: list[_Turn], cutoff_len: int | None, train_on_prompt: bool, mask_history: bool
) -> tuple[list[int], list[int]] | None:
    """Truncate pair by pair within cutoff_len, set labels, and join; None when nothing is trained."""
    order = list(range(len(turns)))
    if mask_history:
        order.reverse()  # the budget goes to the last (the only trained) turn first
    parts: list[tuple[list[int], list[int]]] = [([], [])] * len(turns)
    total = 0
    for k in order:
        source = ids[turns[k].src_start : turns[k].tgt_start]
        target = ids[turns[k].tgt_start : turns[k].tgt_end]
        if cutoff_len is not None:
            if total >= cutoff_len:
                break
            keep_source, keep_target = infer_seqlen(len(source), len(target), cutoff_len - total)
            source, target = source[:keep_source], target[:keep_target]
        total += len(source) + len(target)
        trained = not mask_history or k == len(turns) - 1
        source_labels = list(source) if train_on_prompt else [IGNORE_INDEX] * len(source)
        target_labels = list(target) if trained else [IGNORE_INDEX] * len(target)
        parts[k] = (source + target, source_labels + target_labels)
    tail = ids[turns[-1].tgt_end :] if turns else list(ids)
    if cutoff_len is not None:
        tail = tail[: max(cutoff_len - total, 0)]
    input_ids = [t for part_ids, _ in parts for t in part_ids] + tail
    labels = [t for _, part_labels in parts for t in part_labels]
    labels += list(tail) if train_on_prompt else [IGNORE_INDEX] * len(tail)
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return input_ids, labels


# ----- choosing a template ---------------------------------------------------------------------------------------
def _tokenizer_template(tokenizer: Any) -> str | None:
    """The tokenizer's own chat template text (the "default" one when it has several), or None."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template or None


def check_template_name(name: str) -> str:
    """The normalised template name, or a ConfigError saying why it cannot be used (no tokenizer needed)."""
    key = str(name).strip().lower()
    if key in TEMPLATE_NAMES:
        return key
    valid = ", ".join(TEMPLATE_NAMES)
    if key in VISION_TEMPLATES:
        raise ConfigError(
            f"template '{name}' is LLaMA-Factory's template for a vision-language (image / video / audio) model; "
            f"images, videos and audio are not supported: tunelab fine-tunes text-only models. Valid templates: "
            f"{valid}."
        )
    if key in OTHER_LF_TEMPLATES:
        raise ConfigError(
            f"template '{name}' is a LLaMA-Factory template that tunelab does not ship; use `template: auto`, which "
            f"formats conversations with the model's own published chat template (what it sees at inference). "
            f"Named templates: {valid}."
        )
    close = difflib.get_close_matches(key, TEMPLATE_NAMES, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"Unknown template '{name}'.{hint} Valid templates: {valid}.")


def get_template(name: str, tokenizer: Any, *, enable_thinking: bool = False) -> ChatTemplate:
    """The chat template `name` bound to `tokenizer` (see TEMPLATE_NAMES; "auto" = the tokenizer's own)."""
    key = check_template_name(name)
    if key == "auto":
        text = _tokenizer_template(tokenizer)
        if text is None:
            raise ConfigError(
                "template is 'auto' but this model's tokenizer has no chat_template (a base model?). Set `template` "
                f"to one of {', '.join(TEMPLATE_FILES)} to choose the conversation format."
            )
        return ChatTemplate("auto", text, tokenizer, enable_thinking=enable_thinking)
    return ChatTemplate(
        key,
        read_chat_template(TEMPLATE_FILES[key]),
        tokenizer,
        enable_thinking=enable_thinking,
        default_system=DEFAULT_SYSTEMS.get(key),
        extra_stop_tokens=EXTRA_STOP_TOKENS.get(key, ()),
    )


def _first_difference(a: str, b: str) -> int:
    """Index of the first character where two strings differ."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def template_mismatch_warning(template: ChatTemplate, tokenizer: Any) -> str | None:
    """A warning when `template` formats probe conversations unlike the tokenizer's own chat_template, else None."""
    own_text = _tokenizer_template(tokenizer)
    if own_text is None or own_text == template.text:
        return None
    own = ChatTemplate("the tokenizer's own", own_text, tokenizer, enable_thinking=template.enable_thinking)
    for probe in _PROBE_CONVERSATIONS:
        try:
            mine = template.render(copy.deepcopy(probe), add_generation_prompt=True)
            theirs = own.render(copy.deepcopy(probe), add_generation_prompt=True)
        except Exception as exc:  # a template that cannot render the probe: nothing to compare
            logger.debug("Template comparison skipped: %s", exc)
            return None
        if mine != theirs:
            i = _first_difference(mine, theirs)
            return (
                f"The chat template '{template.name}' formats conversations differently from this model's own "
                f"chat_template (first difference at character {i}: {mine[i:i + 40]!r} vs {theirs[i:i + 40]!r}). "
                "A wrong template is the most common cause of rambling, repeating output after fine-tuning: the "
                "model never sees the turn format it knows, so it does not learn where to stop. Use template: auto "
                "(the model's own), or the named template that matches the model, unless you mean to change it."
            )
    return None
