"""`task=perplexity`: mean negative log-likelihood of the assistant tokens of a dataset, and its exponential.

    tunelab eval cfg.yaml task=perplexity eval_dataset=my_eval      # -> output_dir/perplexity_results.json

The tokens scored are exactly those training takes its loss on: the same template encoding, cutoff_len,
train_on_prompt and mask_history (`ChatTemplate.encode_supervised`), so `nll` on a training set equals the training
loss. The mean is over tokens of the whole set (sum of token NLLs / token count), not a mean of per-batch means.
Batched (sorted by length, right padding), no generation; the output head runs only at the scored positions.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Sequence

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def token_nll(model, input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], *, batch_size: int,
              pad_id: int, device, on_batch=None) -> tuple[float, int]:
    """(sum of the NLL of every labelled token, number of labelled tokens); label t is predicted at position t-1."""
    import torch
    import torch.nn.functional as F

    order = sorted(range(len(input_ids)), key=lambda i: -len(input_ids[i]))
    total, count = 0.0, 0
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            idx = order[b: b + batch_size]
            longest = max(len(input_ids[i]) for i in idx)
            ids = torch.full((len(idx), longest), pad_id, dtype=torch.long)
            lab = torch.full((len(idx), longest), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(idx), longest), dtype=torch.long)
            for row, i in enumerate(idx):
                n = len(input_ids[i])
                ids[row, :n], lab[row, :n], mask[row, :n] = torch.tensor(input_ids[i]), torch.tensor(labels[i]), 1
            targets = lab[:, 1:]
            keep = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(-1)  # positions whose next token is scored
            if keep.numel() == 0:
                continue
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False,
                        logits_to_keep=keep.to(device))
            wanted = targets[:, keep].to(device)
            for row in range(len(idx)):  # one row at a time keeps the float32 copy of the logits small
                total += F.cross_entropy(out.logits[row].float(), wanted[row], ignore_index=IGNORE_INDEX,
                                         reduction="sum").item()
            count += int((wanted != IGNORE_INDEX).sum())
            if on_batch is not None:
                on_batch(len(idx))
    return total, count


def run_perplexity(cfg, engine, conversations, output_dir: str) -> dict[str, Any]:
    from tunelab.data.processing import encode_conversations
    from tunelab.errors import DataError
    from tunelab.eval.progress import Progress
    from tunelab.utils.io import atomic_write_json

    encoded, dropped = encode_conversations(conversations, engine.template, cutoff_len=cfg.cutoff_len,
                                            train_on_prompt=cfg.train_on_prompt, mask_history=cfg.mask_history)
    if dropped:
        logger.warning("%d samples have no scored token left after cutoff_len=%d and are left out", dropped, cfg.cutoff_len)
    if len(encoded) == 0:
        raise DataError(f"no sample has a scored token left after cutoff_len={cfg.cutoff_len}.")
    tokenizer = engine.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    started = time.time()
    with Progress(len(encoded), "perplexity", unit="samples") as bar:
        total, count = token_nll(engine.model, encoded.input_ids, encoded.labels, batch_size=cfg.batch_size,
                                 pad_id=pad_id, device=engine.device, on_batch=bar.update)
    nll = total / count
    results = {
        "nll": nll,
        "perplexity": math.exp(nll) if nll < 700 else float("inf"),
        "tokens": count,
        "samples": len(encoded),
        "dropped_samples": dropped,
        "runtime_s": round(time.time() - started, 2),
    }
    atomic_write_json(os.path.join(output_dir, "perplexity_results.json"), results)
    logger.info("nll %.4f, perplexity %.3f over %d tokens of %d samples", nll, results["perplexity"], count, len(encoded))
    return results
