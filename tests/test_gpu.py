"""GPU checks (marked `gpu`, skipped without CUDA): the fused loss under bf16 autocast against the plain loss, and a
short 4-bit QLoRA `tunelab train` run with the fast path (fused loss, Liger when installed) on the tiny model."""
from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_fused_loss_matches_plain_under_bf16_autocast():
    from tunelab.model.kernels import fused_linear_cross_entropy

    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(2, 256, 512, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    weight = (torch.randn(32000, 512, device="cuda", generator=g) * 0.02).bfloat16()
    labels = torch.randint(0, 32000, (2, 256), device="cuda", generator=g)
    labels[:, :40] = -100
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused = fused_linear_cross_entropy(hidden, weight, labels)
    (g_fused,) = torch.autograd.grad(fused, hidden)
    h2 = hidden.detach().clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = h2 @ weight.t()
    plain = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, 32000), labels[:, 1:].reshape(-1), ignore_index=-100)
    (g_plain,) = torch.autograd.grad(plain, h2)
    assert abs(fused.item() - plain.item()) < 1e-3 * plain.item()
    rel = (g_fused.float() - g_plain.float()).norm() / g_plain.float().norm()
    assert rel.item() < 2e-2  # bf16 operands: 1e-3 to 1e-2 is rounding


def test_qlora_train_on_gpu(tmp_path):
    from tunelab.config import load_config
    from tunelab.data.demo import write_demo_dataset
    from tunelab.model.tiny import build_tiny_model
    from tunelab.train.workflow import run_train

    model = build_tiny_model(str(tmp_path / "tiny"))
    write_demo_dataset(str(tmp_path / "data"))
    out = tmp_path / "out"
    metrics = run_train(load_config({
        "model_name_or_path": model, "do_train": True, "template": "qwen", "quantization_bit": 4, "bf16": True,
        "dataset": "demo", "dataset_dir": str(tmp_path / "data"), "cutoff_len": 128, "max_steps": 30,
        "per_device_train_batch_size": 8, "learning_rate": 2e-3, "logging_steps": 5, "save_steps": 15,
        "output_dir": str(out), "overwrite_cache": True,
    }))
    log = [json.loads(line) for line in open(out / "trainer_log.jsonl")]
    assert log[-1]["loss"] < log[0]["loss"] - 2.0
    assert all(r["gpu_memory_gib"] > 0 for r in log)
    assert os.path.isfile(out / "adapter_model.safetensors")
    assert metrics["train_loss"] > 0


def test_packed_rows_attend_within_each_sample_on_gpu(tmp_path):
    """With SDPA on the GPU, a packed row's logits equal each sample's own forward pass (no cross-sample attention)."""
    from transformers import AutoModelForCausalLM

    from tunelab.data.collator import Collator, PackedSet
    from tunelab.data.processing import EncodedSet
    from tunelab.model.tiny import build_tiny_model

    path = build_tiny_model(str(tmp_path / "tiny"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").cuda().eval()
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, 150000, (n,), generator=g).tolist() for n in (37, 20, 51)]
    data = EncodedSet(samples, [list(s) for s in samples])
    packed = PackedSet(data, capacity=128)
    assert len(packed) == 1
    batch = Collator(pad_token_id=0)([packed[0]])
    with torch.no_grad():
        # use_cache=False as in training: with a KV cache transformers skips its packed-sequence mask
        row = model(input_ids=batch["input_ids"].cuda(), position_ids=batch["position_ids"].cuda(), use_cache=False).logits[0]
        start = 0
        for j in packed.bins[0]:
            ids = torch.tensor([samples[j]]).cuda()
            alone = model(input_ids=ids, use_cache=False).logits[0]
            assert torch.allclose(row[start : start + len(samples[j])], alone, atol=1e-4, rtol=1e-4)
            start += len(samples[j])


def test_packed_qlora_train_with_varlen_attention_on_gpu(tmp_path, monkeypatch):
    """`tunelab train` with packing on the tiny 4-bit model (the varlen attention on by default): the fast path records
    varlen-attention, the collator's boundaries reach it (FlashAttention's varlen kernel called), each logged loss
    finite and the last below the first."""
    from tunelab.config import load_config
    from tunelab.data.demo import write_demo_dataset
    from tunelab.model.fast import varlen
    from tunelab.model.tiny import build_tiny_model
    from tunelab.train.workflow import run_train

    monkeypatch.delenv("TUNELAB_VARLEN", raising=False)
    calls = []
    flash = varlen._flash
    monkeypatch.setattr(varlen, "_flash", lambda *a: calls.append(True) or flash(*a))  # (traced once if compiled)
    model = build_tiny_model(str(tmp_path / "tiny"))
    write_demo_dataset(str(tmp_path / "data"))
    out = tmp_path / "out"
    run_train(load_config({
        "model_name_or_path": model, "do_train": True, "template": "qwen", "quantization_bit": 4, "bf16": True,
        "dataset": "demo", "dataset_dir": str(tmp_path / "data"), "cutoff_len": 256, "packing": True,
        "max_steps": 20, "per_device_train_batch_size": 2, "learning_rate": 2e-3, "logging_steps": 5,
        "output_dir": str(out), "overwrite_cache": True,
    }))
    with open(out / "tunelab_config.yaml", encoding="utf-8") as fh:  # parsed: YAML folds and escapes the string
        recorded = yaml.safe_load(fh)["resolved"]["fast_path"]
    assert "packed rows' attention per sample" in recorded
    assert calls  # packed batches reached FlashAttention's varlen kernel
    log = [json.loads(line) for line in open(out / "trainer_log.jsonl") if '"loss"' in line]
    assert all(r["loss"] == r["loss"] for r in log) and log[-1]["loss"] < log[0]["loss"]
