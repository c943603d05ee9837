"""Logit comparisons after a merge: does the merged model answer like base + adapter?

    ids = probe_ids(tokenizer, template)                 # a few chat prompts, as token ids
    ref = probe_logits(peft_model, ids)                  # base + adapter, unmerged
    got = probe_logits(merged_model, ids)
    report = compare(ref, got)                           # max abs diff, top-1 agreement

Models are loaded one after the other and freed in between, so checking never holds two 7B models at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

PROBES = (
    "Hello! Who are you?",
    "Write a short poem about the sea.",
    "What is 17 * 23? Explain step by step.",
    "用一句话介绍你自己。",
)


@dataclass
class Parity:
    max_abs_diff: float
    top1_agreement: float  # fraction of positions whose argmax token agrees
    positions: int
    logit_scale: float  # max |logit| of the reference

    def line(self) -> str:
        return f"max abs logit diff {self.max_abs_diff:.3g} (logits up to {self.logit_scale:.3g}), top-1 agreement {self.top1_agreement:.1%} over {self.positions} positions"


def probe_ids(template_or_tokenizer: Any) -> list[list[int]]:
    """The probe prompts as token ids: through the chat template, or as plain text for a model without one."""
    from tunelab.data.conversation import Conversation

    if hasattr(template_or_tokenizer, "encode_prompt"):
        return [template_or_tokenizer.encode_prompt(Conversation(messages=[{"role": "user", "content": p}])) for p in PROBES]
    return [template_or_tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROBES]


def probe_logits(model: Any, prompts: Sequence[Sequence[int]]) -> list[Any]:
    """float32 logits on the CPU of each prompt (batch 1, no padding: nothing but the weights differs)."""
    import torch

    device = model.get_input_embeddings().weight.device
    out = []
    with torch.inference_mode():
        for ids in prompts:
            logits = model(input_ids=torch.tensor([list(ids)], device=device)).logits
            out.append(logits[0].float().cpu())
    return out


def compare(reference: Sequence[Any], other: Sequence[Any]) -> Parity:

    diff = max(float((a - b).abs().max()) for a, b in zip(reference, other))
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(reference, other))
    positions = sum(a.shape[0] for a in reference)
    scale = max(float(a.abs().max()) for a in reference)
    return Parity(diff, agree / positions, positions, scale)


def default_tolerance(dtype: str, logit_scale: float) -> float:
    """Allowed max abs diff: float32 merges are exact up to summation order; 16-bit ones round each merged weight."""
    return (1e-3 if dtype == "float32" else 3e-2) * max(1.0, logit_scale)
