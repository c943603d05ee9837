"""Text metrics for `tunelab eval task=predict`: BLEU-4, ROUGE-1/2/L exactly as LLaMA-Factory computes them, and
exact match on a final-answer marker (`#### 50`).

    from tunelab.eval.metrics import similarity_scores, exact_match
    similarity_scores(["我爱北京"], ["我爱北京天安门"])   # {"bleu-4": 47.2367, "rouge-1": ..., "rouge-2": ..., "rouge-l": ...}

Why these exact rules: published before/after tables (LLaMA-Factory's `predict_bleu-4`, `predict_rouge-l`) are made
with them, and small differences (word vs character BLEU, smoothing, rounding) move the numbers by several points.
Per sample, as LLaMA-Factory's `ComputeSimilarity` and `scripts/eval_bleu_rouge.py`:
- BLEU-4: `nltk` `sentence_bleu([list(label)], list(predict), smoothing_function=SmoothingFunction().method3)`,
  i.e. over characters, whatever the language.
- ROUGE-1/2/L: `rouge_chinese.Rouge().get_scores` F-scores on jieba-segmented words joined by spaces; when either
  side has no word left (empty or whitespace-only text) all three are 0.
- each score x100 and rounded to 4 decimals; the reported value is the mean over samples.
nltk, jieba and rouge-chinese are the `metrics` extra (pip install 'tunelab[metrics]'), imported only here.
"""
from __future__ import annotations

import logging
import re
from typing import Sequence

from tunelab.errors import TunelabError

SIMILARITY_KEYS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")
ANSWER_MARKER = "####"


def metric_libraries():
    """(sentence_bleu, SmoothingFunction, jieba, Rouge), or an error naming the extra to install."""
    try:
        import jieba
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
        from rouge_chinese import Rouge
    except ImportError as exc:
        raise TunelabError(
            f"BLEU/ROUGE need nltk, jieba and rouge-chinese ({exc.name} is missing): pip install 'tunelab[metrics]'."
        ) from None
    jieba.setLogLevel(logging.WARNING)  # jieba prints its dictionary loading at INFO level
    return sentence_bleu, SmoothingFunction, jieba, Rouge


def sample_scores(predict: str, label: str) -> dict[str, float]:
    """BLEU-4 and ROUGE-1/2/L F (x100, 4 decimals) of one prediction against its reference, as LLaMA-Factory."""
    sentence_bleu, SmoothingFunction, jieba, Rouge = metric_libraries()
    hypothesis = " ".join(jieba.cut(predict))
    reference = " ".join(jieba.cut(label))
    if not hypothesis.split() or not reference.split():
        rouge = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    else:
        scores = Rouge().get_scores(hypothesis, reference)[0]
        rouge = {key: round(value["f"] * 100, 4) for key, value in scores.items()}
    bleu = sentence_bleu([list(label)], list(predict), smoothing_function=SmoothingFunction().method3)
    return {"bleu-4": round(float(bleu) * 100, 4), **rouge}


def similarity_scores(predicts: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Mean BLEU-4 / ROUGE-1 / ROUGE-2 / ROUGE-L over samples (each x100)."""
    if len(predicts) != len(labels):
        raise ValueError(f"{len(predicts)} predictions for {len(labels)} references")
    if not predicts:
        return {key: 0.0 for key in SIMILARITY_KEYS}
    totals = dict.fromkeys(SIMILARITY_KEYS, 0.0)
    for predict, label in zip(predicts, labels):
        for key, value in sample_scores(predict, label).items():
            totals[key] += value
    return {key: totals[key] / len(predicts) for key in SIMILARITY_KEYS}


# ----------------------------------------------------------------------------------------------- exact match
_NUMBER = re.compile(r"^[-+]?\d+(\.\d+)?$")


def final_answer(text: str) -> str | None:
    """The text after the last `####` marker, normalised (spaces, thousands commas, `$`, a final period), or None."""
    pos = text.rfind(ANSWER_MARKER)
    if pos < 0:
        return None
    answer = text[pos + len(ANSWER_MARKER):].strip().splitlines()
    answer = answer[0].strip() if answer else ""
    answer = answer.replace(",", "").replace("$", "").rstrip(".").strip()
    if _NUMBER.match(answer):  # 50, 50.0 and +50 are the same answer
        value = float(answer)
        answer = str(int(value)) if value.is_integer() else str(value)
    return answer


def exact_match(predicts: Sequence[str], labels: Sequence[str]) -> tuple[float, int] | None:
    """(accuracy x100, samples scored) over the references that end in a `#### answer` marker; None when none does.

    A prediction without the marker counts as wrong: the fine-tune is expected to learn the answer format.
    """
    pairs = [(final_answer(p), final_answer(lab)) for p, lab in zip(predicts, labels)]
    scored = [(p, lab) for p, lab in pairs if lab is not None]
    if not scored:
        return None
    correct = sum(1 for p, lab in scored if p is not None and p == lab)
    return 100.0 * correct / len(scored), len(scored)
