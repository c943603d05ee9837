"""model/fast/varlen.py: packed rows' attention per sample (on by default with packing). On the CPU the per-sample SDPA
reference runs the same boundaries; the GPU test compares FlashAttention's varlen kernel with the masked SDPA path."""
from __future__ import annotations

import copy

import pytest
import torch

from tunelab.data.collator import Collator
from tunelab.model.fast import varlen

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _tiny(seed=0, dtype=torch.float32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    config._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(config).to(dtype)


def _rows():
    """Two packed rows of three and two samples (lengths 5+4+3 and 6+2), as PackedSet gives them."""
    lengths = [[5, 4, 3], [6, 2]]
    g = torch.Generator().manual_seed(3)
    feats = []
    for row in lengths:
        ids = torch.randint(3, 128, (sum(row),), generator=g).tolist()
        pos = [p for n in row for p in range(n)]
        labels = []
        for n in row:
            labels += [-100] + [0] * (n - 1)
        labels = [ids[i] if lab == 0 else lab for i, lab in enumerate(labels)]
        feats.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return lengths, feats


def test_boundaries_of_packed_rows_with_their_padding_tail():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    assert varlen.boundaries(pos).tolist() == [0, 3, 5, 6, 10, 12]
    assert varlen.boundaries(pos).dtype == torch.int32
    with pytest.raises(ValueError, match="start with position id 0"):
        varlen.boundaries(torch.tensor([[1, 2, 0]]))


def test_the_collator_gives_packed_batches_their_boundaries_only_when_asked():
    lengths, feats = _rows()
    plain = Collator(0, 8)(feats)
    assert "cu_seq_lens_q" not in plain
    batch = Collator(0, 8, varlen=True)(feats)
    # rows padded to 16 (12 tokens rounded up to 8): row 0 = 5, 4, 3 + a 4-token padding "sample"; row 1 = 6, 2 + 8
    assert batch["input_ids"].shape == (2, 16)
    assert batch["cu_seq_lens_q"].tolist() == [0, 5, 9, 12, 16, 22, 24, 32]
    assert batch["cu_seq_lens_k"] is batch["cu_seq_lens_q"]
    unpacked = Collator(0, 8, varlen=True)([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in feats])
    assert "cu_seq_lens_q" not in unpacked and "attention_mask" in unpacked


def test_install_only_replaces_sdpa_and_is_on_by_default(monkeypatch):
    monkeypatch.delenv("TUNELAB_VARLEN", raising=False)
    assert varlen.enabled()
    monkeypatch.setenv("TUNELAB_VARLEN", "0")
    assert not varlen.enabled()
    monkeypatch.setenv("TUNELAB_VARLEN", "1")
    assert varlen.enabled()
    eager = _tiny()
    eager.config._attn_implementation = "eager"
    assert varlen.install(eager) is False and eager.config._attn_implementation == "eager"
    model = _tiny()
    assert varlen.install(model) is True and model.config._attn_implementation == varlen.NAME
    # what the training workflow and the bench ask before giving the collator varlen=True
    assert not varlen.active(model)
    model.tunelab_fast_path = ["fast-lora(14 projections)", "varlen-attention"]
    assert varlen.active(model)


def test_flash_fits_and_device_fits(monkeypatch):
    """The flash kernel's inputs: fp16 / bf16, head size <= 256 and a multiple of 8; its devices: NVIDIA compute
    capability 8.0 or newer, not ROCm (anything off CUDA: the per-sample path, so True); install leaves SDPA when
    any of the model's devices does not fit."""
    q = torch.zeros(1, 2, 4, 128)
    assert [varlen.flash_fits(q.to(d)) for d in (torch.bfloat16, torch.float16, torch.float32)] == [True, True, False]
    assert [varlen.flash_fits(torch.zeros(1, 2, 4, d, dtype=torch.bfloat16)) for d in (64, 256, 264, 100)] == [
        True, True, False, False]
    assert varlen.device_fits(torch.device("cpu"))
    monkeypatch.setattr(torch.version, "hip", None)
    for capability, fits in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert varlen.device_fits(torch.device("cuda", 0)) is fits
    monkeypatch.setattr(torch.version, "hip", "6.4")  # a ROCm build: the masked path
    assert varlen.device_fits(torch.device("cuda", 0)) is False
    monkeypatch.setattr(varlen, "device_fits", lambda device: False)
    model = _tiny()
    assert varlen.install(model) is False and model.config._attn_implementation == "sdpa"


def _loss_and_grads(model, batch):
    model.zero_grad()
    keys = ("input_ids", "position_ids", "attention_mask", "cu_seq_lens_q", "cu_seq_lens_k")
    # use_cache=False as in training: transformers derives the block-diagonal mask from restarting position ids only
    # when no KV cache is built
    out = model(**{k: batch[k] for k in keys if k in batch}, use_cache=False)
    logits = out.logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _pair(dtype=torch.float32, device="cpu"):
    """The tiny model and its copy with the varlen attention installed, the two rows collated without and with the
    boundaries (on `device`), their lengths, and the mask of their real tokens (the padding tails differ)."""
    lengths, feats = _rows()
    base = _tiny(dtype=dtype).to(device)
    fast = copy.deepcopy(base)
    assert varlen.install(fast)

    def on(batch):
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    masked, packed = on(Collator(0, 8)(feats)), on(Collator(0, 8, varlen=True)(feats))
    real = torch.zeros_like(masked["labels"], dtype=torch.bool)
    for r, row in enumerate(lengths):
        real[r, :sum(row)] = True
    return base, fast, masked, packed, lengths, feats, real


def test_packed_rows_per_sample_equal_the_masked_sdpa_path_and_each_sample_alone():
    """The per-sample path (CPU) against transformers' SDPA with its block-diagonal mask from the position ids:
    logits, loss and every gradient; and each sample's logits against the sample run alone."""
    base, fast, masked_batch, varlen_batch, lengths, feats, real = _pair()
    ref_logits, ref_loss, ref_grads = _loss_and_grads(base, masked_batch)
    logits, loss, grads = _loss_and_grads(fast, varlen_batch)
    assert torch.allclose(logits[real], ref_logits[real], atol=1e-5)
    assert torch.allclose(loss, ref_loss, rtol=1e-6)
    for name, g in ref_grads.items():
        assert torch.allclose(grads[name], g, atol=1e-6, rtol=1e-4), name
    with torch.no_grad():
        for r, row in enumerate(lengths):
            at = 0
            for n in row:
                alone = base(input_ids=torch.tensor([feats[r]["input_ids"][at:at + n]]), use_cache=False).logits[0]
                assert torch.allclose(logits[r, at:at + n], alone, atol=1e-5)
                at += n


def test_batches_without_boundaries_keep_sdpa_with_their_mask():
    """An unpacked, right-padded batch through the installed attention: the SDPA path and its mask, the same
    logits as the model without it."""
    _, feats = _rows()
    base = _tiny()
    fast = copy.deepcopy(base)
    assert varlen.install(fast)
    batch = Collator(0, 8, varlen=True)([{"input_ids": f["input_ids"][:7 + i], "labels": f["labels"][:7 + i]}
                                          for i, f in enumerate(feats)])
    with torch.no_grad():
        a = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        b = fast(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    keep = batch["attention_mask"].bool()
    assert torch.equal(a[keep], b[keep])


@pytest.mark.gpu
@gpu
def test_flash_varlen_equals_masked_sdpa_on_gpu():
    """FlashAttention's varlen kernel (bf16, grouped-query heads) against the masked SDPA path: loss within 1e-2
    relative, every gradient within 3e-2 relative (norm of the difference over the norm)."""
    base, fast, masked, packed, _, _, _ = _pair(torch.bfloat16, "cuda")
    _, ref_loss, ref_grads = _loss_and_grads(base, masked)
    _, loss, grads = _loss_and_grads(fast, packed)
    assert abs(loss.item() - ref_loss.item()) <= 1e-2 * abs(ref_loss.item())
    for name, g in ref_grads.items():
        err = (grads[name].float() - g.float()).norm() / g.float().norm().clamp_min(1e-12)
        assert err < 3e-2, (name, float(err))


@pytest.mark.gpu
@gpu
def test_fp32_packed_batches_take_the_masked_sdpa_path_on_gpu(monkeypatch):
    """fp32 queries (which the flash kernel refuses) with boundaries: SDPA with transformers' block-diagonal mask,
    the same logits as the model without the varlen attention, the flash kernel never called."""
    calls = []
    monkeypatch.setattr(varlen, "_flash", lambda *a: calls.append(True))
    base, fast, masked, packed, _, _, real = _pair(torch.float32, "cuda")
    ref_logits, _, _ = _loss_and_grads(base, masked)
    logits, _, _ = _loss_and_grads(fast, packed)
    assert not calls and torch.allclose(logits[real], ref_logits[real], atol=1e-5)
