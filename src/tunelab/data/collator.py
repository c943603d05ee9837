"""Batching: pad to the longest sample of the batch, or pack several samples into one row.

Padding (`Collator` on plain samples): right padding with the tokenizer's pad id, labels padded with -100, an attention mask;
lengths rounded up to a multiple of 8 on GPUs (tensor-core friendly shapes).

Packing (`pack_samples` + `PackedSet`, then `Collator` on its rows): samples are placed whole into rows of at most cutoff_len tokens
(first-fit on lengths sorted longest first, deterministic). Each row carries `position_ids` that restart at 0 for
every sample and no attention mask: transformers builds a block-diagonal causal mask from restarting
position_ids, so a token never attends to another sample (tests check logits against separate forward passes, on
the CPU and on a GPU). Each sample's first label is masked, so no sample is trained to follow the one before it.
"""
from __future__ import annotations

from typing import Any, Sequence

IGNORE_INDEX = -100


def loss_fields(labels, attention_mask=None) -> dict:
    """Side fields computed on the CPU so the training step never has to ask the GPU (each question is a sync):

    loss_rows: flat indices into the [batch x (length-1)] shifted positions whose next-token label is trained,
        used by the fused loss to run the output head on those rows only;
    num_tokens: real (non-pad) tokens in the batch, a plain int, for the tokens-per-second figures.
    """
    import torch

    shifted = labels[:, 1:].reshape(-1)
    rows = torch.nonzero(shifted != IGNORE_INDEX, as_tuple=False).flatten()
    n = int(attention_mask.sum()) if attention_mask is not None else int(labels.numel())
    return {"loss_rows": rows, "num_tokens": n}


def full_pack_length(capacity: int | None) -> int | None:
    """The Collator's pack_length for packed rows of `capacity` tokens (cutoff_len; None: no packing): the capacity
    when TUNELAB_PACK_FULL=1 (one static shape; opt-in until a GPU A/B), else None (each batch padded to its
    longest row)."""
    import os

    return capacity if capacity and os.environ.get("TUNELAB_PACK_FULL", "0") == "1" else None


def pad_multiple(device: str, cutoff_len: int | None = None, graphs: bool = False) -> int | None:
    """The multiple each unpacked batch's length is padded up to: 8 on CUDA (tensor-core friendly shapes, as
    LLaMA-Factory pads), none elsewhere. Where the fast path replays its layers as CUDA graphs (`graphs`: the model
    has model.fast.graphs' LayerGraphs), one graph is captured per layer and length, so lengths are bucketed: a
    multiple of 64 giving at most 8 lengths up to cutoff_len (1,024: 128; 2,048: 256; 4,096: 512) - graphs.
    MAX_SIGNATURES; run 34 on the H200 measured padded alpaca-like batches so bucketed at 0.197 s a step against
    0.713 with lengths rounded to 8. TUNELAB_PAD_MULTIPLE=N overrides it on any device. The padding is masked out
    of attention and loss, so the training is the same up to rounding."""
    import os

    raw = os.environ.get("TUNELAB_PAD_MULTIPLE")
    if raw is None:
        if device != "cuda":
            return None
        if graphs and cutoff_len:
            from tunelab.model.fast.graphs import MAX_SIGNATURES

            return max(8, -(-cutoff_len // (MAX_SIGNATURES * 64)) * 64)
        return 8
    if not raw.isdigit() or int(raw) < 1:
        from tunelab.errors import ConfigError

        raise ConfigError(f"TUNELAB_PAD_MULTIPLE={raw!r}: expected a whole number >= 1 (the multiple each padded "
                          "batch's length is rounded up to)")
    return int(raw)


def _round_up(n: int, multiple: int | None) -> int:
    if not multiple:
        return n
    return (n + multiple - 1) // multiple * multiple


class Collator:
    """Batches plain samples (padding + attention mask) and packed rows (padding + restarting position_ids).

    One collator for both, chosen per batch by the features: the packed training set yields rows with position_ids,
    and the evaluation set of the same run yields plain samples.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, varlen: bool = False,
                 pack_length: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        # packed batches padded to exactly this many tokens (the rows' capacity, cutoff_len), not to their longest
        # row: one shape for every packed batch, so compiled layers keep one static graph (opt-in:
        # full_pack_length(); LLaMA-Factory pads its packed rows to the cutoff too)
        self.pack_length = pack_length
        # packed batches also carry their sample boundaries (cu_seq_lens_q / _k: model/fast/varlen.py) when the
        # model's attention reads them
        self.varlen = varlen

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        packed = "position_ids" in features[0]
        length = _round_up(max(len(f["input_ids"]) for f in features), self.pad_to_multiple_of)
        if packed and self.pack_length:
            length = max(length, self.pack_length)
        ids = torch.full((len(features), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
        extra = torch.zeros((len(features), length), dtype=torch.long)  # attention mask, or position ids
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.tensor(f["labels"], dtype=torch.long)
            if packed:
                extra[i, :n] = torch.tensor(f["position_ids"], dtype=torch.long)
                extra[i, n:] = torch.arange(length - n)  # padding forms its own "sample", never attended by real tokens
            else:
                extra[i, :n] = 1
        if packed:
            out = {"input_ids": ids, "labels": labels, "position_ids": extra, **loss_fields(labels)}
            out["num_tokens"] = sum(len(f["input_ids"]) for f in features)
            if self.varlen:
                from tunelab.model.fast.varlen import boundaries

                out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = boundaries(extra)
            return out
        return {"input_ids": ids, "attention_mask": extra, "labels": labels, **loss_fields(labels, extra)}


def pack_samples(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of sample indices whose lengths sum to at most capacity (first-fit decreasing, deterministic)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = min(lengths[i], capacity)
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


class PackedSet:
    """A dataset view whose items are packed rows: concatenated input_ids, labels and restarting position_ids."""

    def __init__(self, data, capacity: int):
        self.data = data
        self.bins = pack_samples([len(x) for x in data.input_ids], capacity)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for j in self.bins[i]:
            ids += self.data.input_ids[j]
            # a sample's first token is never a target: in the shifted loss it would be predicted from the previous
            # sample's last token (only reachable with train_on_prompt, where the first token carries a label)
            labels += [IGNORE_INDEX] + self.data.labels[j][1:]
            pos += list(range(len(self.data.input_ids[j])))
        return {"input_ids": ids, "labels": labels, "position_ids": pos}
