"""Conversations -> tokenized training / evaluation sets (input_ids, labels), cached by content hash.

    sets = build_datasets(cfg, tokenizer, template)     # sets.train, sets.eval, sets.stats

Steps: load the records through the registry/readers (tunelab.data.loader), encode each with the chat template
(tunelab.data.template: masks, cutoff_len truncation), drop samples left with no trained token (counted and
reported), split off val_size with the run's seed, and cache the result under a key made of the data's
fingerprint, the tokenizer's vocabulary and template, and every setting that changes the encoding. A second run
with the same data and tokenizer loads the cache instead of tokenizing (`overwrite_cache: true` forces it).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from tunelab.data.conversation import Conversation
from tunelab.errors import DataError

logger = logging.getLogger(__name__)

CACHE_VERSION = "1"  # bump when the encoding changes so old caches are not reused


@dataclass
class EncodedSet:
    """Tokenized samples, a plain list-backed torch-style dataset (len / getitem)."""

    input_ids: list[list[int]]
    labels: list[list[int]]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}

    def select(self, indices: Sequence[int]) -> "EncodedSet":
        return EncodedSet([self.input_ids[i] for i in indices], [self.labels[i] for i in indices])

    def num_tokens(self) -> int:
        return sum(len(x) for x in self.input_ids)

    def num_trained_tokens(self) -> int:
        return sum(sum(1 for t in lab if t != -100) for lab in self.labels)


@dataclass
class Datasets:
    train: EncodedSet | None
    eval: EncodedSet | None
    stats: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- encoding


def encode_conversations(
    conversations: Sequence[Conversation], template, *, cutoff_len: int, train_on_prompt: bool, mask_history: bool, num_workers: int | None = None,
    skip_invalid: bool = False, skipped: list[str] | None = None,
) -> tuple[EncodedSet, int]:
    """Encode with the template; returns the set and how many samples were dropped (no trained token left).

    A sample the template cannot encode (a DataError naming it, e.g. a reply that renders empty) stops the run, or
    with skip_invalid is left out and its message appended to `skipped`.
    """
    args = (cutoff_len, train_on_prompt, mask_history, skip_invalid)
    if num_workers and num_workers > 1 and len(conversations) >= 2000:
        results = _encode_parallel(conversations, template, args, num_workers)
    else:
        results = [_encode_one(template, c, args) for c in conversations]
    ids, labels, dropped = [], [], 0
    for r in results:
        if isinstance(r, str):
            if skipped is not None:
                skipped.append(r)
            continue
        if r is None:
            dropped += 1
            continue
        ids.append(r[0])
        labels.append(r[1])
    return EncodedSet(ids, labels), dropped


def _encode_one(template, conv: Conversation, args):
    """encode_supervised's result, or under skip_invalid the DataError's message (a str) for a skipped sample."""
    cutoff_len, train_on_prompt, mask_history, skip_invalid = args
    try:
        return template.encode_supervised(conv, cutoff_len, train_on_prompt=train_on_prompt, mask_history=mask_history)
    except DataError as exc:
        if not skip_invalid:
            raise
        return str(exc)


_WORKER_TEMPLATE = None


def _init_worker(template) -> None:
    import signal

    global _WORKER_TEMPLATE
    _WORKER_TEMPLATE = template
    # a forked worker inherits the parent's Python signal handlers (a training run's graceful-stop SIGTERM
    # handler, a server's): the pool stops its workers with SIGTERM, which must end them
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _encode_chunk(payload):
    convs, args = payload
    return [_encode_one(_WORKER_TEMPLATE, c, args) for c in convs]


def _encode_parallel(conversations, template, args, num_workers):
    import multiprocessing as mp

    chunk = max(64, len(conversations) // (num_workers * 8))
    payloads = [(conversations[i : i + chunk], args) for i in range(0, len(conversations), chunk)]
    pool = mp.get_context("fork").Pool(num_workers, initializer=_init_worker, initargs=(template,))
    try:
        out = []
        for part in pool.imap(_encode_chunk, payloads):
            out.extend(part)
        pool.close()  # the workers leave on their end-of-work sentinels (terminate would race them with SIGTERM)
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
    return out


# ---------------------------------------------------------------- caching


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    h.update(str(len(tokenizer)).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    h.update(str(tokenizer.chat_template or "").encode())
    return h.hexdigest()[:16]


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def default_cache_root() -> str:
    root = os.environ.get("TUNELAB_CACHE") or os.path.join(os.environ.get("HF_HOME", os.path.expanduser("~/.cache")), "tunelab")
    return os.path.join(root, "tokenized")


def _save_cache(path: str, data: EncodedSet, dropped: int) -> None:
    from tunelab.utils.io import atomic_write_text

    atomic_write_text(path, json.dumps({"input_ids": data.input_ids, "labels": data.labels, "dropped": dropped}))


def _load_cache(path: str) -> tuple[EncodedSet, int] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
        return EncodedSet(doc["input_ids"], doc["labels"]), int(doc["dropped"])
    except (OSError, ValueError, KeyError):
        return None


def load_encoded(names: str, cfg, tokenizer, template, *, role: str) -> tuple[EncodedSet, dict[str, Any]]:
    """Load + encode one dataset list (train or eval), using the cache when the same data was seen before."""
    from tunelab.data.loader import content_fingerprint, load_conversations

    key = cache_key(
        {
            "v": CACHE_VERSION,
            "data": content_fingerprint(names, cfg.dataset_dir),
            "tok": tokenizer_fingerprint(tokenizer),
            "template": template.name,
            "system": cfg.default_system,
            "thinking": cfg.enable_thinking,
            "cutoff": cfg.cutoff_len,
            "prompt": cfg.train_on_prompt,
            "history": cfg.mask_history,
            "max_samples": cfg.max_samples,
            "skip_invalid": cfg.skip_invalid,
        }
    )
    cache_dir = cfg.tokenized_path or default_cache_root()
    path = os.path.join(cache_dir, f"{role}-{key}.json")
    if not cfg.overwrite_cache and os.path.isfile(path):
        cached = _load_cache(path)
        if cached is not None:
            logger.info("%s data: loaded %d tokenized samples from the cache (%s)", role, len(cached[0]), path)
            return cached[0], {"cached": True, "dropped_no_label": cached[1], "skipped_invalid": 0}
    result = load_conversations(names, cfg.dataset_dir, max_samples=cfg.max_samples, skip_invalid=cfg.skip_invalid)
    if result.skipped:
        logger.warning("%s data: skipped %d invalid records (skip_invalid: true); first: %s", role, result.skipped,
                       "; ".join(f"{loc}: {why}" for loc, why in result.errors[:3]))
    convs = list(result.conversations)
    if cfg.default_system is not None:
        for c in convs:
            if c.system is None:
                c.system = cfg.default_system
    unencodable: list[str] = []
    encoded, dropped = encode_conversations(
        convs, template, cutoff_len=cfg.cutoff_len, train_on_prompt=cfg.train_on_prompt,
        mask_history=cfg.mask_history, num_workers=cfg.preprocessing_num_workers,
        skip_invalid=cfg.skip_invalid, skipped=unencodable,
    )
    if unencodable:
        logger.warning("%s data: skipped %d samples the chat template cannot encode (skip_invalid: true); first: %s",
                       role, len(unencodable), unencodable[0])
    if dropped:
        logger.warning("%s data: dropped %d samples with no trained token left after cutoff_len=%d truncation", role, dropped, cfg.cutoff_len)
    if len(encoded) == 0:
        raise DataError(f"{role} dataset '{names}' has no usable sample (all {len(convs)} were empty or lost their response to cutoff_len={cfg.cutoff_len}).")
    try:
        _save_cache(path, encoded, dropped)
    except OSError as exc:
        logger.warning("could not write the tokenized cache %s (%s); continuing without it", path, exc)
    return encoded, {"cached": False, "dropped_no_label": dropped, "skipped_invalid": result.skipped + len(unencodable)}


def split_validation(data: EncodedSet, val_size: float, seed: int) -> tuple[EncodedSet, EncodedSet]:
    """Seeded split: val_size < 1 is a fraction, >= 1 a count. Order inside each part follows the original."""
    import numpy as np

    n = len(data)
    k = int(val_size) if val_size >= 1 else max(1, int(round(n * val_size)))
    if k >= n:
        raise DataError(f"val_size={val_size} leaves no training samples out of {n}; use a smaller val_size.")
    perm = np.random.Generator(np.random.PCG64(seed)).permutation(n)
    eval_idx = sorted(perm[:k].tolist())
    held = set(eval_idx)
    return data.select([i for i in range(n) if i not in held]), data.select(eval_idx)


def build_datasets(cfg, tokenizer, template) -> Datasets:
    if not cfg.dataset:
        raise DataError("dataset is not set: name a dataset from dataset_info.json, a built-in one (alpaca_gpt4_en) or a file path.")
    train, stats = load_encoded(cfg.dataset, cfg, tokenizer, template, role="train")
    eval_set = None
    if cfg.eval_dataset:
        eval_set, _ = load_encoded(cfg.eval_dataset, cfg, tokenizer, template, role="eval")
    elif cfg.val_size > 0:
        train, eval_set = split_validation(train, cfg.val_size, cfg.seed)
    stats.update(
        train_samples=len(train),
        train_tokens=train.num_tokens(),
        train_trained_tokens=train.num_trained_tokens(),
        eval_samples=len(eval_set) if eval_set is not None else 0,
    )
    return Datasets(train=train, eval=eval_set, stats=stats)
