"""`tunelab data preview`: the first samples exactly as the model sees them, with the trained tokens marked.

    for block in preview_samples(spec, template, n=3, colour=False, on_invalid=log):
        print(block)

Each sample is encoded by `ChatTemplate.encode_supervised` (what training does, cutoff_len included when given),
then the token ids are decoded back in runs of trained / not-trained tokens, special tokens kept, so the text
shows the template's markers and which part carries the loss: `[[...]]` around trained runs, or green in a
terminal. A wrong template shows up here as a wrong system prompt, missing end markers, or a loss on the prompt.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

from tunelab.data.conversation import Conversation
from tunelab.data.readers import InvalidRecord
from tunelab.data.registry import DatasetSpec
from tunelab.data.template import IGNORE_INDEX, ChatTemplate
from tunelab.datatools.source import iter_conversations

OPEN, CLOSE = "[[", "]]"
GREEN, RESET = "\x1b[32m", "\x1b[0m"


def segments(conv: Conversation, template: ChatTemplate, cutoff_len: int | None = None) -> list[tuple[str, bool]]:
    """[(text, trained), ...]: the encoded sample decoded in runs; [] when cutoff_len leaves nothing trained."""
    encoded = template.encode_supervised(conv, cutoff_len)
    if encoded is None:
        return []
    ids, labels = encoded
    runs: list[tuple[list[int], bool]] = []
    for token, label in zip(ids, labels):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(token)
        else:
            runs.append(([token], trained))
    decode = template.tokenizer.decode
    return [(decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False), trained)
            for run, trained in runs]


def mark(parts: list[tuple[str, bool]], colour: bool) -> str:
    """The sample text with trained runs in [[brackets]] (or green)."""
    start, end = (GREEN, RESET) if colour else (OPEN, CLOSE)
    return "".join(f"{start}{text}{end}" if trained else text for text, trained in parts)


def legend(colour: bool) -> str:
    where = f"{GREEN}green{RESET}" if colour else f"{OPEN}double brackets{CLOSE}"
    return f"Trained tokens (those with a loss) are shown in {where}."


def preview_samples(
    spec: DatasetSpec, template: ChatTemplate, *, n: int = 3, cutoff_len: int | None = None, colour: bool = False,
    on_invalid: Callable[[InvalidRecord], None],
) -> Iterator[str]:
    """A block of text per sample for the first n valid samples: a header line, then the marked text."""
    for shown, conv in enumerate(iter_conversations(spec, on_invalid), 1):
        header = f"--- sample {shown}: {conv.source} ---"
        parts = segments(conv, template, cutoff_len)
        if parts:
            yield f"{header}\n{mark(parts, colour)}"
        else:
            yield (f"{header}\n(cutoff_len {cutoff_len} leaves no trained token, so training drops this sample; "
                   f"without truncation it reads:)\n{mark(segments(conv, template), colour)}")
        if shown >= n:
            return
