"""Which conversations `task=predict` and `task=perplexity` score, read before any model is loaded.

- `eval_dataset` set: those datasets (registered names, hub ids or file paths), whole.
- else `dataset` with `val_size`: the held-out part, the same samples `tunelab train` evaluated on (same seed, same
  rule: samples left without a trained token after cutoff_len are dropped before the split). Needs the template,
  so `held_out` runs after the tokenizer is there.
- else `dataset`, whole (logged: it may be the training data).
`max_samples` applies per dataset, as in training.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from tunelab.data.conversation import Conversation
from tunelab.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


@dataclass
class EvalSamples:
    names: str
    conversations: list[Conversation]
    split_from_training: bool  # dataset + val_size: call held_out() once the template is known


def load_eval_conversations(cfg, *, purpose: str) -> EvalSamples:
    """The conversations to score; each must end with an assistant reply (the reference / the scored tokens)."""
    from tunelab.data.loader import load_conversations

    names = cfg.eval_dataset or cfg.dataset
    if not names:
        raise ConfigError(f"task={cfg.task} needs data: set eval_dataset (a dataset name or file), or dataset with "
                          "val_size to score the split held out from training.")
    split = not cfg.eval_dataset and cfg.val_size > 0
    if not cfg.eval_dataset and not split:
        logger.info("scoring all of dataset '%s' (set eval_dataset, or val_size for the held-out split)", names)
    result = load_conversations(names, cfg.dataset_dir, max_samples=cfg.max_samples, skip_invalid=cfg.skip_invalid,
                                require_reply=False, seed=cfg.seed)
    if result.skipped:
        logger.warning("skipped %d invalid records (skip_invalid: true)", result.skipped)
    convs = list(result.conversations)
    missing = [c for c in convs if not c.messages or c.messages[-1]["role"] != "assistant"
               or not str(c.messages[-1].get("content") or "").strip()]
    if missing:
        need = "a reference answer to score BLEU/ROUGE against" if purpose == "predict" else "an assistant reply to score"
        raise DataError(
            f"{len(missing)} of {len(convs)} samples of '{names}' have no assistant reply (first: "
            f"{missing[0].source or 'sample 1'}); task={purpose} needs {need} in every sample (the output / "
            "gpt / assistant field). Remove those samples or use a dataset with references."
        )
    if cfg.default_system is not None:
        for c in convs:
            if c.system is None:
                c.system = cfg.default_system
    return EvalSamples(names, convs, split)


def held_out(samples: EvalSamples, cfg, template) -> list[Conversation]:
    """The validation part of `dataset` exactly as training split it (see the module doc); others unchanged."""
    if not samples.split_from_training:
        return samples.conversations
    from tunelab.data.processing import EncodedSet, split_validation

    kept = [c for c in samples.conversations
            if template.encode_supervised(c, cfg.cutoff_len, train_on_prompt=cfg.train_on_prompt,
                                          mask_history=cfg.mask_history) is not None]
    # split_validation works on EncodedSets: give it one whose rows are the sample indices.
    index_set = EncodedSet([[i] for i in range(len(kept))], [[i] for i in range(len(kept))])
    _, held = split_validation(index_set, cfg.val_size, cfg.seed)
    picked = [kept[row[0]] for row in held.input_ids]
    if not picked:
        raise DataError(f"val_size={cfg.val_size} holds out no sample of '{samples.names}'.")
    logger.info("scoring the %d samples held out from training by val_size=%s", len(picked), cfg.val_size)
    return picked
