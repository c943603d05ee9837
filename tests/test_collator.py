"""The collator's exact tensors (padding, masks, CPU-side loss rows and token counts) and packing's bins and labels."""
from __future__ import annotations

import pytest
import torch

from tunelab.data.collator import Collator, PackedSet, pack_samples
from tunelab.data.processing import EncodedSet


def test_padding_mask_loss_rows_and_token_count():
    batch = Collator(pad_token_id=0, pad_to_multiple_of=4)([
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8, 9], "labels": [-100, -100]},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 9, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [-100, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    # shifted targets: row 0 positions 0,1 predict 6,7 -> flat indices 0,1 of the [2 x 3] shifted grid
    assert batch["loss_rows"].tolist() == [0, 1]
    assert batch["num_tokens"] == 5


def test_pack_samples_first_fit_decreasing():
    assert pack_samples([5, 3, 4, 2, 6], capacity=8) == [[4, 3], [0, 1], [2]]


def test_packed_rows_mask_each_samples_first_label_and_restart_positions():
    data = EncodedSet([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]])  # train_on_prompt: every label set
    packed = PackedSet(data, capacity=8)
    row = packed[0]
    assert row == {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, -100, 5], "position_ids": [0, 1, 2, 0, 1]}
    batch = Collator(pad_token_id=0, pad_to_multiple_of=8)([row])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert "attention_mask" not in batch and batch["num_tokens"] == 5
    assert torch.equal(batch["loss_rows"], torch.tensor([0, 1, 3]))


def test_pack_length_pads_packed_rows_to_the_capacity_only(monkeypatch):
    """Collator(pack_length=N): packed batches are N tokens wide whatever their longest row (the padding: pad ids,
    -100 labels, position ids 0, 1, ... as one more segment; the real-token count and loss rows unchanged);
    unpacked batches keep padding to their longest sample. full_pack_length() reads TUNELAB_PACK_FULL (off unless 1)."""
    from tunelab.data.collator import full_pack_length

    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 2]},
            {"input_ids": [8, 9], "labels": [-100, 9], "position_ids": [0, 0]}]
    short = Collator(0, 8)(rows)
    full = Collator(0, 8, pack_length=16)(rows)
    assert short["input_ids"].shape == (2, 8) and full["input_ids"].shape == (2, 16)
    assert full["input_ids"][0].tolist() == [5, 6, 7] + [0] * 13
    assert full["labels"][1].tolist() == [-100, 9] + [-100] * 14
    assert full["position_ids"][1].tolist() == [0, 0] + list(range(14))
    assert full["num_tokens"] == short["num_tokens"] == 5
    # loss rows index the flattened shifted [rows x (length - 1)] positions: the same targets at the wider stride
    assert short["loss_rows"].tolist() == [0, 1, 7] and full["loss_rows"].tolist() == [0, 1, 15]
    plain = Collator(0, 8, pack_length=16)([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}])
    assert plain["input_ids"].shape == (1, 8) and "position_ids" not in plain
    monkeypatch.delenv("TUNELAB_PACK_FULL", raising=False)
    assert full_pack_length(1024) is None
    monkeypatch.setenv("TUNELAB_PACK_FULL", "1")
    assert full_pack_length(1024) == 1024 and full_pack_length(None) is None


def test_pad_multiple_reads_the_environment_and_pads_to_it(monkeypatch):
    """pad_multiple(device): 8 on CUDA and none elsewhere by default; TUNELAB_PAD_MULTIPLE=N on any device; anything
    but a whole number >= 1 is a ConfigError naming the variable. A batch padded to 64 keeps its real tokens, mask
    and loss rows (the padding masked)."""
    from tunelab.data.collator import pad_multiple
    from tunelab.errors import ConfigError

    monkeypatch.delenv("TUNELAB_PAD_MULTIPLE", raising=False)
    assert pad_multiple("cuda") == 8 and pad_multiple("cpu") is None
    # under the layer graphs: buckets of a multiple of 64, at most 8 lengths up to the cutoff
    assert [pad_multiple("cuda", n, graphs=True) for n in (256, 1024, 2048, 4096, 1000, 100)] == [64, 128, 256, 512,
                                                                                                 128, 64]
    assert pad_multiple("cuda", 1024) == 8 and pad_multiple("cpu", 1024, graphs=True) is None
    monkeypatch.setenv("TUNELAB_PAD_MULTIPLE", "64")
    assert pad_multiple("cuda") == 64 and pad_multiple("cpu") == 64 and pad_multiple("cuda", 1024, graphs=True) == 64
    batch = Collator(0, pad_multiple("cuda"))([{"input_ids": list(range(1, 71)), "labels": [-100] * 10 + list(range(11, 71))},
                                               {"input_ids": [7, 8, 9], "labels": [-100, 8, 9]}])
    assert batch["input_ids"].shape == (2, 128)
    assert batch["attention_mask"].sum(1).tolist() == [70, 3] and batch["num_tokens"] == 73
    assert batch["loss_rows"].tolist() == list(range(9, 69)) + [127, 128]
    for bad in ("0", "eight", "-8", "8.0"):
        monkeypatch.setenv("TUNELAB_PAD_MULTIPLE", bad)
        with pytest.raises(ConfigError, match="TUNELAB_PAD_MULTIPLE"):
            pad_multiple("cuda")
