"""`task=predict`: batched generation over a dataset, then BLEU-4 / ROUGE-1/2/L (and exact match on `#### answer`).

    tunelab eval cfg.yaml task=predict eval_dataset=my_eval do_sample=false max_new_tokens=256

Writes into output_dir, as LLaMA-Factory's do_predict does:
- generated_predictions.jsonl: one {"prompt", "predict", "label"} per sample, in dataset order; prompt is the
  rendered chat-template text the model saw, label the reference (the sample's last assistant message).
- predict_results.json: predict_bleu-4, predict_rouge-1, predict_rouge-2, predict_rouge-l (see tunelab.eval.metrics),
  predict_exact_match when references end in `#### answer`, sample/token counts and speed.
The prompt of a sample is everything before its last assistant message. Generation goes through the inference
engine (tunelab.infer.engine): prompts sorted by length, batches of batch_size, left padding, KV cache, stop on
the template's stop tokens, max_new_tokens and sampling settings from the config (do_sample: false for numbers
that repeat exactly; with sampling, `seed` makes a run repeatable).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

from tunelab.data.conversation import Conversation

logger = logging.getLogger(__name__)


def split_reference(conv: Conversation) -> tuple[Conversation, str]:
    """(the prompt: every message before the last assistant one, the reference: that message's text)."""
    return Conversation(messages=conv.messages[:-1], system=conv.system, tools=conv.tools, source=conv.source), \
        str(conv.messages[-1].get("content") or "")


def run_predict(cfg, engine, conversations: list[Conversation], output_dir: str) -> dict[str, Any]:
    from tunelab.eval.metrics import exact_match, similarity_scores
    from tunelab.infer.engine import GenerationSettings
    from tunelab.eval.progress import Progress
    from tunelab.utils.io import atomic_write_json, atomic_write_text

    if cfg.do_sample:
        logger.info("do_sample is true: BLEU/ROUGE vary from run to run (seed=%d); set do_sample: false for greedy", cfg.seed)
    from transformers import set_seed

    set_seed(cfg.seed)
    # this config's decoding settings, also when the engine was built from another config (compare, tests)
    gen = dataclasses.asdict(GenerationSettings.from_config(cfg))
    pairs = [split_reference(c) for c in conversations]
    prompts = [engine.encode(p) for p, _ in pairs]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first: memory trouble shows early
    new_ids: list[list[int]] = [[] for _ in prompts]
    started = time.time()
    with Progress(len(prompts), "predict", unit="samples") as bar:
        for b in range(0, len(order), cfg.batch_size):
            idx = order[b: b + cfg.batch_size]
            for i, ids in zip(idx, engine.generate_ids([prompts[i] for i in idx], **gen)):
                new_ids[i] = ids
            bar.update(len(idx), f"{sum(len(x) for x in new_ids) / max(time.time() - started, 1e-9):.0f} new tok/s")
    runtime = time.time() - started
    predicts = [engine.decode(ids) for ids in new_ids]
    labels = [label for _, label in pairs]
    lines = [json.dumps({"prompt": engine.render(p), "predict": pred, "label": label}, ensure_ascii=False)
             for (p, label), pred in zip(pairs, predicts)]
    atomic_write_text(os.path.join(output_dir, "generated_predictions.jsonl"), "\n".join(lines) + "\n")

    generated = sum(len(x) for x in new_ids)
    results: dict[str, Any] = {f"predict_{k}": v for k, v in similarity_scores(predicts, labels).items()}
    em = exact_match(predicts, labels)
    if em is not None:
        results["predict_exact_match"], results["predict_exact_match_samples"] = em
    results.update(
        predict_samples=len(predicts),
        predict_empty=sum(1 for p in predicts if not p.strip()),
        predict_new_tokens=generated,
        predict_runtime=round(runtime, 4),
        predict_samples_per_second=round(len(predicts) / runtime, 3) if runtime > 0 else None,
        predict_tokens_per_second=round(generated / runtime, 1) if runtime > 0 else None,
    )
    atomic_write_json(os.path.join(output_dir, "predict_results.json"), results)
    logger.info("BLEU-4 %.2f, ROUGE-1 %.2f, ROUGE-2 %.2f, ROUGE-L %.2f over %d samples (%.0f new tokens/s)",
                results["predict_bleu-4"], results["predict_rouge-1"], results["predict_rouge-2"],
                results["predict_rouge-l"], len(predicts), results["predict_tokens_per_second"] or 0)
    return results
