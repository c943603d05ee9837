"""tunelab estimate: the arithmetic against hand-computed cases, bitsandbytes' real 4-bit / 8-bit storage on the CPU,
the built-in configs against the published parameter counts, the CLI (table, JSON, --gpu, training configs) and
bad input as sentences with a non-zero exit."""
from __future__ import annotations

import json
import math

import pytest

from tunelab.estimate import Setup, estimate, model_shape
from tunelab.estimate import terms as T
from tunelab.estimate.fit import fit, parse_gpu

Q7 = "Qwen/Qwen2.5-7B-Instruct"


@pytest.mark.parametrize("name,params", [
    ("Qwen/Qwen2.5-7B", 7_615_616_512), ("Qwen/Qwen2.5-1.5B", 1_543_714_304), ("Qwen/Qwen2.5-0.5B", 494_032_768),
    ("Qwen/Qwen3-0.6B", 596_049_920), ("Qwen/Qwen3-8B", 8_190_735_360), ("meta-llama/Meta-Llama-3-8B", 8_030_261_248),
])
def test_builtin_configs_give_the_published_parameter_counts(name, params):
    assert T.total_params(model_shape(name)) == params


def test_lora_parameters_of_the_7b_headline_job():
    # r=8 on q,k,v,o,gate,up,down: 8 x (3584+3584 + 2 x (3584+512) + 3584+3584 + 3 x (3584+18944)) x 28 layers
    s = model_shape(Q7)
    assert T.lora_params(s, 8, T.LORA_TARGETS) == 8 * (7168 + 2 * 4096 + 7168 + 3 * 22528) * 28 == 20_185_088
    assert T.lora_params(s, 16, ("q_proj", "v_proj")) == 16 * (7168 + 4096) * 28


def test_nf4_storage_by_hand():
    # 3584 x 18944 = 67,895,296 weights: 33,947,648 code bytes, 1,060,864 blocks of 64 -> 1,060,864 uint8 absmax,
    # 4,144 blocks of 256 for absmax2 (fp32), the 16-entry fp32 code and the fp32 offset
    assert T.nf4_bytes(3584 * 18944) == {"codes": 33_947_648, "code": 64, "absmax": 1_060_864, "absmax2": 4 * 4144, "offset": 4}
    assert T.nf4_bytes(3584 * 18944, double_quant=False) == {"codes": 33_947_648, "code": 64, "absmax": 4 * 1_060_864}


@pytest.mark.parametrize("fan_in,fan_out,double", [(512, 384, True), (1000, 300, True), (640, 96, False)])
def test_nf4_storage_matches_a_real_bitsandbytes_layer(fan_in, fan_out, double):
    import bitsandbytes as bnb
    import torch

    w = torch.randn(fan_out, fan_in, dtype=torch.bfloat16)
    param = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=double, quant_type="nf4", quant_storage=torch.bfloat16)
    param = param.to("cpu")
    qs = param.quant_state
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    real = {"codes": nbytes(param.data), "code": nbytes(qs.code)}
    if double:
        real.update(absmax=nbytes(qs.absmax), absmax2=nbytes(qs.state2.absmax), offset=nbytes(qs.offset))
        assert qs.absmax.dtype == torch.uint8 and qs.state2.absmax.dtype == torch.float32 and qs.state2.blocksize == 256
        assert nbytes(qs.state2.code) == 1024  # the shared 256-entry table of the second quantization
    else:
        real["absmax"] = nbytes(qs.absmax)
        assert qs.absmax.dtype == torch.float32
    assert T.nf4_bytes(fan_in * fan_out, double_quant=double) == real


def test_int8_storage_matches_a_real_bitsandbytes_layer():
    import bitsandbytes as bnb
    import torch

    w = torch.randn(96, 256, dtype=torch.float16)
    param = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False).to("cpu")
    assert T.int8_bytes(96, 256) == {"codes": param.data.numel() * param.data.element_size(), "SCB": param.SCB.numel() * 4}
    assert param.data.dtype == torch.int8


def test_plain_qlora_breakdown_by_hand():
    """7B, NF4, r=8, batch 4 x 1024, plain stack: the peak is the loss backward (3 fp32 N x V tensors)."""
    s = model_shape(Q7)
    est = estimate(s, Setup(method="qlora", bits=4, batch=4, seq=1024, plain=True, optim="adamw_torch_fused"))
    n = 4 * 1024
    assert est.phase == "loss"
    assert est.row("logits") == 3 * 4 * n * 152064  # a multiple of 512 already
    assert est.row("activations") == 28 * n * 3584 * 2
    assert est.row("weights_16bit") == 2 * 2 * 152064 * 3584 + 28 * 2 * 7168 + 7168  # embeddings + head + norms
    assert est.row("optimizer") == 8 * 20_185_088
    assert est.peak_allocated == sum(r.bytes for r in est.rows)
    # the NF4 weights: per projection n/2 code bytes + n/64 uint8 absmax + fp32 absmax2 per 256 blocks, the code and
    # offset tensors (512 B allocations each), the q/k/v biases in bf16, and the shared 1 KiB table
    r = T.r512
    per_layer = sum(r(n // 2) + r(n // 64) + r(4 * math.ceil(n / 64 / 256)) + 512 + 512
                    for n in (3584 * 3584, 3584 * 512, 3584 * 512, 3584 * 3584, 3584 * 18944, 3584 * 18944, 18944 * 3584))
    per_layer += r(2 * 3584) + 2 * r(2 * 512)
    assert est.row("base_weights") == 28 * per_layer + 1024


def test_fused_loss_holds_one_chunk():
    s = model_shape(Q7)
    from tunelab.model.kernels import CHUNK_BUDGET_BYTES, _chunk_rows

    rows = _chunk_rows(152064)
    assert rows == CHUNK_BUDGET_BYTES // (4 * 152064)
    one = T.fused_loss_bytes(s, rows - 1, 2, rows)  # fewer rows than a chunk: one chunk, 8 B x V per row
    assert one == T.r512(8 * 152064 * (rows - 1)) + 3 * T.r512(2 * (rows - 1) * 3584)
    many = T.fused_loss_bytes(s, 4092, 2, rows)  # 4 x 1024: full chunks, the previous chunk's bf16 probs too
    assert many == T.r512(10 * 152064 * rows) + 3 * T.r512(2 * 4092 * 3584)
    plain = estimate(s, Setup(batch=4, seq=1024, plain=True))
    ours = estimate(s, Setup(batch=4, seq=1024, plain=False))
    assert plain.peak_allocated - ours.peak_allocated > 4 * T.GiB  # the README's "fused loss saves 4.3 GiB"


def test_checkpointing_eager_and_optimizers_move_the_estimate_the_right_way():
    s = model_shape("Qwen/Qwen2.5-1.5B")
    base = Setup(method="lora", bits=None, batch=2, seq=2048)
    on, off = estimate(s, base), estimate(s, Setup(**{**base.__dict__, "grad_ckpt": False}))
    assert off.peak_allocated > on.peak_allocated
    eager = estimate(s, Setup(**{**base.__dict__, "grad_ckpt": False, "attn": "eager"}))
    # eager keeps the fp32 softmax and its bf16 copy per layer: 6 B x heads x T per token, x 28 layers
    assert eager.phases["loss"] - off.phases["loss"] >= 28 * 6 * 12 * 2048 * 4096
    full = Setup(method="full", bits=None, batch=1, seq=512)
    adam, adam8 = estimate(s, full), estimate(s, Setup(**{**full.__dict__, "optim": "adamw_8bit"}))
    assert adam.row("optimizer") == 8 * T.total_params(s)
    assert adam8.row("optimizer") == int((2 + 8 / 256) * T.total_params(s))
    paged = estimate(s, Setup(**{**full.__dict__, "optim": "paged_adamw_8bit"}))
    assert paged.row("optimizer") == 0 and paged.nvidia_smi - paged.peak_reserved > adam8.row("optimizer")


def test_gpu_names_and_sizes():
    assert parse_gpu("24GiB").memory == 24 * T.GiB
    assert parse_gpu("16GB").memory == 16 * 10**9
    assert parse_gpu("3090").memory == 24576 * 2**20 and not parse_gpu("t4").bf16


def test_fit_on_a_24_gib_card_keeps_the_effective_batch():
    s = model_shape(Q7)
    plan = fit(s, Setup(batch=64, seq=1024), parse_gpu("24GiB"))
    advice = {a["setting"]: a["value"] for a in plan["advice"]}
    batch, accum = int(advice["per_device_train_batch_size"]), int(advice["gradient_accumulation_steps"])
    assert batch * accum == 64 and batch == plan["largest_batch"] >= 4
    assert estimate(s, Setup(batch=batch, seq=1024)).nvidia_smi <= 24 * T.GiB - 0.5 * T.GiB
    assert estimate(s, Setup(batch=2 * batch, seq=1024)).nvidia_smi > 24 * T.GiB - 0.5 * T.GiB


# ---------------------------------------------------------------- the command


def _cli(capsys, *argv):
    from tunelab.cli import main

    rc = main(["estimate", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_table_and_json(capsys):
    rc, out, _ = _cli(capsys, Q7, "--batch", "4", "--cutoff-len", "1024", "--gpu", "24GiB")
    assert rc == 0 and "nvidia-smi will show about" in out and "recommended:" in out and "NF4" in out
    rc, out, _ = _cli(capsys, Q7, "--method", "lora", "--plain", "--json")
    doc = json.loads(out)
    assert rc == 0 and doc["settings"]["method"] == "lora" and doc["settings"]["bits"] is None and doc["settings"]["plain"]
    assert doc["peak_allocated_gib"] < doc["nvidia_smi_gib"]
    assert math.isclose(sum(r["bytes"] for r in doc["breakdown"]) / T.GiB, doc["peak_allocated_gib"], abs_tol=2e-3)


def test_cli_training_config_takes_its_keys(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model_name_or_path: Qwen/Qwen2.5-1.5B-Instruct\nquantization_bit: 8\nlora_rank: 16\nlora_target: q_proj,v_proj\n"
                   "per_device_train_batch_size: 2\ncutoff_len: 2048\noptim: paged_adamw_8bit\n"
                   "disable_gradient_checkpointing: true\nadditional_target: lm_head\n")
    rc, out, _ = _cli(capsys, str(cfg), "cutoff_len=512", "--json")
    s = json.loads(out)["settings"]
    assert rc == 0
    assert (s["method"], s["bits"], s["rank"], s["targets"], s["batch"], s["seq"], s["optim"], s["grad_ckpt"], s["extra_trainable"]) == (
        "qlora", 8, 16, ["q_proj", "v_proj"], 2, 512, "paged_adamw_8bit", False, ["lm_head"])


def test_cli_unknown_architecture_is_estimated_with_a_warning(tmp_path, capsys):
    conf = tmp_path / "config.json"
    conf.write_text(json.dumps({"model_type": "mistral", "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4,
                                "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 32000}))
    rc, out, _ = _cli(capsys, str(conf), "--method", "lora")
    assert rc == 0 and "warning:" in out and "generic" in out


@pytest.mark.parametrize("argv,words", [
    (["Org/NoSuchModel-3B"], "unknown model 'Org/NoSuchModel-3B'"),
    ([Q7, "--batch", "0"], "batch size must be at least 1"),
    ([Q7, "--cutoff-len", "65536"], "beyond Qwen/Qwen2.5-7B-Instruct's context of 32768"),
    ([Q7, "--method", "full", "--bits", "4"], "cannot be trained directly"),
    ([Q7, "--gpu", "potato"], "unknown GPU 'potato'"),
    ([Q7, "--target", "q_proj,wq"], "LoRA target 'wq'"),
    (["./missing/folder"], "does not exist"),
    ([Q7, "--gpu", "2GiB"], "does not fit"),
])
def test_bad_input_is_a_sentence_and_a_nonzero_exit(capsys, argv, words):
    rc, out, err = _cli(capsys, *argv)
    assert rc == 1 and words in err and "Traceback" not in err + out


def test_config_json_without_sizes(tmp_path, capsys):
    conf = tmp_path / "config.json"
    conf.write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64}))
    rc, _, err = _cli(capsys, str(conf))
    assert rc == 1 and "intermediate_size" in err


@pytest.mark.parametrize("family,attn,targets", [
    ("qwen2", "sdpa", T.LORA_TARGETS), ("qwen2", "sdpa", ("q_proj", "v_proj")), ("qwen2", "eager", ("down_proj", "o_proj")),
    ("qwen3", "sdpa", T.LORA_TARGETS), ("qwen3", "eager", T.LORA_TARGETS),
])
def test_layer_activations_match_what_autograd_saves(family, attn, targets):
    """One decoder layer of transformers' Qwen2 / Qwen3 with PEFT LoRA (bf16, as under CUDA autocast): the bytes of
    every tensor autograd saves for backward equal the per-token formula x tokens."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from tunelab.estimate.archs import ModelShape

    hidden, inter, heads, kv, head_dim, batch, seq = 128, 352, 4, 2, 64, 2, 64
    conf, cls = (Qwen3Config, Qwen3ForCausalLM) if family == "qwen3" else (Qwen2Config, Qwen2ForCausalLM)
    extra = {"head_dim": head_dim} if family == "qwen3" else {}
    config = conf(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1, num_attention_heads=heads,
                  num_key_value_heads=kv, vocab_size=512, attn_implementation=attn, **extra)
    torch.manual_seed(0)
    model = get_peft_model(cls(config).to(torch.bfloat16), LoraConfig(r=8, target_modules=list(targets)), autocast_adapter_dtype=False)
    decoder = model.base_model.model.model
    x = torch.randn(batch, seq, hidden, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(seq)[None].expand(batch, -1)
    cos, sin = decoder.rotary_emb(x, pos)
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        decoder.layers[0](x, attention_mask=None, position_embeddings=(cos, sin), position_ids=pos)
    known = {p.untyped_storage().data_ptr() for p in model.parameters()} | {t.untyped_storage().data_ptr() for t in (x, cos, sin)}
    got = sum(n for ptr, n in saved.items() if ptr not in known)
    shape = ModelShape("t", family, hidden, inter, 1, heads, kv, head_dim if family == "qwen3" else hidden // heads, 512, False, 4096, family == "qwen2", family == "qwen3")
    assert got == T.layer_saved(shape, T.Kernels(liger=False, attn=attn, gqa_repeat=False), 2, seq, 8, targets, 0.0) * batch * seq


def test_predictions_within_ten_percent_of_the_gpu_measurements(monkeypatch):
    """docs/data/estimate_h200.json: 32 cases measured on an H200 by tools/estimate_measure.py (Qwen2.5-1.5B and 7B,
    LoRA and QLoRA, 1x512 .. 2x4096, plain stack and tunelab's path with Liger). The estimate of today's code must
    stay within 10% of each measured peak allocated and nvidia-smi figure. They were measured before the loss kernel
    (model/fast/ce_triton.py, whose chunk holds no fp32 block): the estimate is made for the loss they ran
    (TUNELAB_CE_TRITON=0, the torch chunk)."""
    import os

    monkeypatch.setenv("TUNELAB_CE_TRITON", "0")

    path = os.path.join(os.path.dirname(__file__), "..", "docs", "data", "estimate_h200.json")
    with open(path, encoding="utf-8") as fh:
        records = [r for r in json.load(fh)["records"] if "peak_allocated_gib" in r]
    assert len(records) == 32
    archs = {"qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct", "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct"}
    for r in records:
        u = Setup(method=r["method"], bits=4 if r["method"] == "qlora" else None, batch=r["batch"], seq=r["seq"],
                  plain=r["stack"] == "plain", liger=r["stack"] == "tunelab", optim="adamw_torch_fused")
        est = estimate(model_shape(archs[r["arch"]]), u)
        case = f"{r['arch']} {r['method']} {r['stack']} {r['batch']}x{r['seq']}"
        assert abs(est.peak_allocated / T.GiB / r["peak_allocated_gib"] - 1) < 0.10, case
        assert abs(est.nvidia_smi / T.GiB / (r["smi_mib"] / 1024) - 1) < 0.10, case


# ---------------------------------------------------------------- the fast path's terms and decisions

def _tiny_shape():
    """A 2-layer Qwen2-like shape small enough to add up by hand: H 64, I 176, 4 heads of 16, 2 kv heads, V 512."""
    from tunelab.estimate.archs import ModelShape

    return ModelShape("tiny", "qwen2", 64, 176, 2, 4, 2, 16, 512, False, 4096, True, False)


def test_compiled_and_offload_terms_by_hand():
    s = _tiny_shape()
    # one layer's dense bf16 weights: q, o 64 x 64 (8,192 B each), k, v 64 x 32 (4,096), gate, up, down 64 x 176 (22,528)
    assert T.compiled_dequant_bytes(s, 4, 2) == 2 * 8192 + 2 * 4096 + 3 * 22528 == 92_160
    assert T.compiled_dequant_bytes(s, None, 2) == 0  # a 16-bit base is never dequantized
    assert T.dequant_temp(s, 4, 2) == 22_528  # eager: the largest one at a time
    # offload: 2 layer inputs + the recomputed output, 2 x 16 tokens x 64 x 2 B = 4,096 B each
    assert T.offload_gpu_checkpoints(s, 32, 2) == 3 * 4096
    # the 7B figure the docs quote: 7 dense bf16 weights of a Qwen2.5-7B layer
    assert T.compiled_dequant_bytes(model_shape(Q7), 4, 2) == 2 * (2 * 3584 * 3584 + 2 * 3584 * 512 + 3 * 3584 * 18944) == 466_092_032


def test_compiled_estimate_rows_by_hand():
    """Tiny QLoRA 2 x 16: the compiled layer saves Liger's set and holds all 7 dequantized weights at its backward;
    the final norm outside the layers stays transformers' (fp32 copy)."""
    s, n = _tiny_shape(), 32
    eager = estimate(s, Setup(batch=2, seq=16, liger=True, optim="adamw_torch_fused"))
    comp = estimate(s, Setup(batch=2, seq=16, compiled=True, optim="adamw_torch_fused"))
    k = T.Kernels(liger=True, attn="sdpa", gqa_repeat=False)
    saved = T.layer_saved(s, k, 2, 16, 8, T.LORA_TARGETS, 0.0)
    # per token: 2 norms' rstd (8) + 2 normed outputs (256) + the residual sum (128) + attention (q, out 2 x 128,
    # k, v 2 x 64, lse 16 = 400) + gate, up, product (3 x 352) + LoRA x A^T (7 x 16)
    assert saved == 8 + 256 + 128 + 400 + 1056 + 112 == 1960
    assert comp.phases["backward"] - eager.phases["backward"] == 92_160 - 22_528
    assert comp.phase == "backward"  # the 7 weights make it the peak here (eager's is the loss)
    rows = {r.key: r.bytes for r in comp.rows}
    assert rows["dequant"] == 92_160 and rows["recompute"] == T.r512(saved * n) == 62_976
    # at the loss the compiled model's final norm keeps its fp32 copy: 4H + 4 more bytes per token than Liger's
    assert comp.phases["loss"] - eager.phases["loss"] == T.r512((4 * 64 + 4 + 256) * n) - T.r512((4 + 256) * n)


def test_offload_estimate_rows_by_hand(monkeypatch):
    monkeypatch.delenv("TUNELAB_KEEP_DENSE", raising=False)
    s, n = _tiny_shape(), 32
    plain = estimate(s, Setup(batch=2, seq=16, liger=True))
    off = estimate(s, Setup(batch=2, seq=16, liger=True, offload=True))
    ckpt = T.checkpoint_bytes(s, n, 2)
    assert ckpt == 2 * 4096
    assert off.phases["backward"] - plain.phases["backward"] == 3 * 4096 - ckpt
    assert off.phases["loss"] - plain.phases["loss"] == -ckpt  # no checkpoint on the GPU at the loss
    # TUNELAB_KEEP_DENSE=1 (lora.keep_dense, opt-in): the recompute's dense weights kept for the backward, all of a
    # layer's instead of the largest one at a time
    monkeypatch.setenv("TUNELAB_KEEP_DENSE", "1")
    kept = estimate(s, Setup(batch=2, seq=16, liger=True, offload=True))
    qbits = off.setup.bits if off.setup.method == "qlora" else None
    extra = T.compiled_dequant_bytes(s, qbits, 2) - T.dequant_temp(s, qbits, 2)
    assert extra > 0
    assert kept.phases["backward"] - off.phases["backward"] == extra
    # without checkpointing there is nothing to offload: the same estimate as without the switch
    assert estimate(s, Setup(batch=2, seq=16, grad_ckpt=False, offload=True)).phases == estimate(s, Setup(batch=2, seq=16, grad_ckpt=False)).phases


def test_kept_gate_up_outputs_by_hand(monkeypatch):
    """TUNELAB_KEEP_GATE_UP (split.keep_plan, opt-in): the last layer's [tokens, 2I] output on the GPU at the loss,
    two in backward (in use, arriving), the other kept layers' in pinned host memory; with
    TUNELAB_KEEP_GATE_UP_ON_GPU=K the last K on the GPU; only where the split applies (4-bit QLoRA under the
    offload, from split.MIN_TOKENS tokens)."""
    monkeypatch.delenv("TUNELAB_KEEP_DENSE", raising=False)
    monkeypatch.delenv("TUNELAB_KEEP_GATE_UP_ON_GPU", raising=False)
    monkeypatch.delenv("TUNELAB_SPLIT_MIN_TOKENS", raising=False)
    s = model_shape(Q7)
    u = Setup(method="qlora", batch=4, seq=1024, compiled=True, offload=True)
    monkeypatch.setenv("TUNELAB_KEEP_GATE_UP", "0")
    off = estimate(s, u)
    monkeypatch.setenv("TUNELAB_KEEP_GATE_UP", "3")
    kept = estimate(s, u)
    one = 4096 * 2 * 18944 * 2
    assert one == 310_378_496 == T.r512(one)
    assert kept.phases["loss"] - off.phases["loss"] == one
    assert kept.phases["backward"] - off.phases["backward"] == 2 * one
    assert kept.host_pinned - off.host_pinned == 9 * one  # 10 layers kept (27, 24, ..., 0), the last on the GPU
    monkeypatch.setenv("TUNELAB_KEEP_GATE_UP_ON_GPU", "2")  # the last two on the GPU, 24, 21, ..., 0 on the host
    both = estimate(s, u)
    assert both.phases["loss"] - off.phases["loss"] == 2 * one
    assert both.phases["backward"] - off.phases["backward"] == 3 * one
    assert both.host_pinned - off.host_pinned == 9 * one
    monkeypatch.setenv("TUNELAB_KEEP_GATE_UP", "0")
    gpu_only = estimate(s, u)
    assert gpu_only.phases["backward"] - off.phases["backward"] == 2 * one and gpu_only.host_pinned == off.host_pinned
    monkeypatch.setenv("TUNELAB_KEEP_GATE_UP_ON_GPU", "0")
    monkeypatch.setenv("TUNELAB_KEEP_GATE_UP", "3")
    small = Setup(method="qlora", batch=1, seq=1024, compiled=True, offload=True)  # 1,024 tokens: no split
    assert estimate(s, small).phases == (monkeypatch.setenv("TUNELAB_KEEP_GATE_UP", "0") or estimate(s, small)).phases
    monkeypatch.setenv("TUNELAB_KEEP_GATE_UP", "3")
    lora = Setup(method="lora", batch=4, seq=1024, compiled=True, offload=True)  # 16-bit gate/up: not grouped
    assert estimate(s, lora).phases == (monkeypatch.setenv("TUNELAB_KEEP_GATE_UP", "0") or estimate(s, lora)).phases


def test_host_embedding_takes_the_table_off_the_gpu():
    """The table (bf16 V x H, 1,089,994,752 B at 7B) leaves the weights row and every moment; a named row says so."""
    s = model_shape(Q7)
    base, host = Setup(batch=4, seq=1024, compiled=True), Setup(batch=4, seq=1024, compiled=True, host_embedding=True)
    a, b = estimate(s, base), estimate(s, host)
    table = T.r512(2 * 152064 * 3584)
    assert table == 1_089_994_752
    assert a.row("weights_16bit") - b.row("weights_16bit") == table and b.row("host_embedding") == 0
    assert all(a.phases[k] - b.phases[k] == table for k in a.phases)
    assert "1.02 GiB off the GPU" in next(r.note for r in b.rows if r.key == "host_embedding")
    tied = model_shape("Qwen/Qwen2.5-1.5B")  # a tied head needs the table on the GPU: nothing moves
    assert estimate(tied, Setup(batch=1, seq=512, host_embedding=True)).phases == estimate(tied, Setup(batch=1, seq=512)).phases


def _fastpath_records():
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "docs", "data", "estimate_fastpath_h200.json")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)["records"]


# the largest error allowed on peak allocated, by kind of case; what each is now is in docs/estimate.md
FAST_TOLERANCE = {"compiled": 0.015, "eager": 0.015, "offload": 0.03}
FAST_RESERVED_TOLERANCE = 0.05


def test_fast_path_estimates_within_tolerance_of_the_h200_measurements(monkeypatch):
    """docs/data/estimate_fastpath_h200.json: the 7B peaks measured on the H200 (runs 2, 5, 6 of docs/fastpath.md and
    run 8's records): eager, compiled, host embedding, checkpoint offload (eager and compiled) and today's default of
    all three. Peak allocated: eager and compiled within 1.5%, the offload within 3% (1.4-2.3% low: docs/estimate.md);
    peak reserved within 5%. Measured before the loss kernel: estimated for the torch chunk they ran."""
    monkeypatch.setenv("TUNELAB_CE_TRITON", "0")
    records = _fastpath_records()
    assert len(records) == 18
    s = model_shape("Qwen/Qwen2.5-7B")
    for r in records:
        u = Setup(method=r["method"], bits=4 if r["method"] == "qlora" else None, batch=r["batch"], seq=r["seq"],
                  optim="adamw_torch_fused", liger=r["liger"], compiled=r["compiled"], offload=r["offload"],
                  host_embedding=r["host_embedding"], mask=r["mask"])
        kind = "offload" if r["offload"] else "compiled" if r["compiled"] else "eager"
        est = estimate(s, u)
        err = est.peak_allocated / T.GiB / r["peak_allocated_gib"] - 1
        assert abs(err) < FAST_TOLERANCE[kind], (r["case"], r["batch"], r["seq"], err)
        assert abs(est.peak_reserved / T.GiB / r["reserved_gib"] - 1) < FAST_RESERVED_TOLERANCE, (r["case"], r["batch"], r["seq"])


def test_the_7b_headline_figures():
    """The measured 7B QLoRA figures: the default of run 8 (compiled + offload + host embedding) 5.82 at 4 x 1024 and
    6.68 at 2 x 4096 (run 8); compiled alone 7.44 / 7.42 (runs 5, 8) and 8.94 at 2 x 4096 (run 6); eager 7.11; eager
    offload 6.53 (run 5): all before gate and up became one function; with it (its forward one augmented GEMM, the
    split recompute on), run 16's 5.56 at 4 x 1024 and 6.60 at 2 x 4096: the planner has no row for the grouping
    (run 14's grouping without the augmented GEMM measured 5.79, the augmented one 5.56, the two projections 5.64)."""
    s = model_shape(Q7)
    for (b, t), measured in {(4, 1024): 5.56, (2, 4096): 6.60}.items():
        est = estimate(s, Setup(batch=b, seq=t, optim="adamw_torch_fused", compiled=True, offload=True,
                                host_embedding=True)).peak_allocated / T.GiB
        assert abs(est / measured - 1) < FAST_TOLERANCE["offload"], (b, t, est)
    got = {name: estimate(s, Setup(batch=b, seq=t, optim="adamw_torch_fused", **kw)).peak_allocated / T.GiB
           for name, b, t, kw in [("default", 4, 1024, {"compiled": True, "offload": True, "host_embedding": True}),
                                  ("default-2x4096", 2, 4096, {"compiled": True, "offload": True, "host_embedding": True}),
                                  ("compiled", 4, 1024, {"compiled": True}), ("compiled-2x4096", 2, 4096, {"compiled": True}),
                                  ("eager", 4, 1024, {"liger": True}), ("offload", 4, 1024, {"liger": True, "offload": True})]}
    assert {k: round(v, 2) for k, v in got.items()} == {"default": 5.70, "default-2x4096": 6.59, "compiled": 7.37,
                                                         "compiled-2x4096": 8.92, "eager": 7.06, "offload": 6.38}
    assert 0.30 < got["compiled"] - got["eager"] < 0.32  # 7 dequantized weights (0.434 GiB) instead of one (0.126)


def test_the_layer_graphs_pool_at_1x1024(monkeypatch):
    """Below the split threshold the offload's calls replay CUDA graphs (model.fast.graphs, on by default): the
    layer's recompute and backward transients sit in the graphs' pool, held at every moment. Run 32 (H200, 7B QLoRA
    1 x 1024, docs/fastpath.md): allocator step peak 4.953 GiB + pool 0.785 = 5.74 steady (the bench's 5.86 adds the
    pool to the first steps' 5.07, an upper bound); 4.98 with TUNELAB_LAYER_GRAPHS=0."""
    s = model_shape(Q7)
    setup = Setup(batch=1, seq=1024, optim="adamw_torch_fused", compiled=True, offload=True, host_embedding=True)
    monkeypatch.setenv("TUNELAB_LAYER_GRAPHS", "0")
    off = estimate(s, setup)
    assert off.phase == "backward" and "graphs" not in {r.key for r in off.rows}
    assert abs(off.peak_allocated / T.GiB / 4.98 - 1) < FAST_TOLERANCE["offload"]
    monkeypatch.delenv("TUNELAB_LAYER_GRAPHS")
    on = estimate(s, setup)
    pooled = sum(r.bytes for r in off.rows if r.key in ("recompute", "temporaries", "dequant"))
    assert on.phase == "loss" and on.row("graphs") == pooled
    assert on.phases["backward"] == off.phases["backward"]  # the same transients, now in the pool
    assert on.phases["loss"] == off.phases["loss"] + pooled
    assert abs(on.peak_allocated / T.GiB / (4.953 + 0.785) - 1) < FAST_TOLERANCE["offload"]
    assert (on.peak_reserved - on.peak_allocated) - (off.peak_reserved - off.peak_allocated) == pooled  # warm-up's
    assert abs(on.peak_reserved / T.GiB / 7.37 - 1) < 0.07  # measured reserved 7.37 GiB: 6.3% under
    big = Setup(batch=4, seq=1024, optim="adamw_torch_fused", compiled=True, offload=True, host_embedding=True)
    assert "graphs" not in {r.key for r in estimate(s, big).rows}  # 4,096 tokens: the split recompute, no graphs
    plain = Setup(batch=1, seq=1024, optim="adamw_torch_fused", plain=True)
    assert "graphs" not in {r.key for r in estimate(s, plain).rows}


# ---------------------------------------------------------------- decisions: the trainer's own functions


def _view(**kw):
    from tunelab.estimate.fastpath import cli_config

    v = cli_config("qlora", 4, 0.0, None)
    for k, val in kw.items():
        setattr(v, k, val)
    return v


def test_the_default_plan_is_compiled_offloaded_with_the_host_embedding(monkeypatch):
    from tunelab.estimate.fastpath import fast_path_plan

    for var in ("TUNELAB_FAST_COMPILE", "TUNELAB_OFFLOAD_CHECKPOINTS", "TUNELAB_HOST_EMBEDDING", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    plan = fast_path_plan(model_shape(Q7), _view())
    assert (plan.fused, plan.compiled, plan.offload, plan.host_embedding, plan.liger) == (True, True, True, True, False)
    assert "Triton assumed" in plan.compiled_reason and plan.liger_reason.startswith("left out")
    no_ckpt = fast_path_plan(model_shape(Q7), _view(), grad_ckpt=False)  # nothing to offload, so no host embedding
    assert (no_ckpt.offload, no_ckpt.host_embedding) == (False, False)
    assert no_ckpt.host_embedding_reason == "on with the checkpoint offload only (TUNELAB_HOST_EMBEDDING=1 forces it)"
    from tunelab.model.fast import NO_CHECKPOINT_REASON

    assert (no_ckpt.compiled, no_ckpt.compiled_reason) == (False, NO_CHECKPOINT_REASON)  # eager without checkpoints
    monkeypatch.setenv("TUNELAB_FAST_COMPILE", "0")
    monkeypatch.setenv("TUNELAB_OFFLOAD_CHECKPOINTS", "0")
    plan = fast_path_plan(model_shape(Q7), _view(enable_liger_kernel=True))
    assert (plan.fused, plan.compiled, plan.offload, plan.host_embedding, plan.liger) == (True, False, False, False, True)
    monkeypatch.setenv("TUNELAB_HOST_EMBEDDING", "1")
    assert fast_path_plan(model_shape(Q7), _view()).host_embedding
    monkeypatch.delenv("TUNELAB_OFFLOAD_CHECKPOINTS")
    monkeypatch.setenv("TUNELAB_HOST_EMBEDDING", "0")
    plan = fast_path_plan(model_shape(Q7), _view())
    assert plan.offload and not plan.host_embedding and plan.host_embedding_reason == "TUNELAB_HOST_EMBEDDING=0"
    monkeypatch.delenv("TUNELAB_HOST_EMBEDDING")
    tied = fast_path_plan(model_shape("Qwen/Qwen2.5-1.5B"), _view())
    assert not tied.host_embedding and tied.host_embedding_reason == "the embedding is tied to the output head"
    off = fast_path_plan(model_shape(Q7), _view(lora_dropout=0.05))
    assert not (off.fused or off.compiled or off.offload) and off.compiled_reason.startswith("the fast path is off (lora_dropout 0.05")


@pytest.mark.parametrize("env", [None, "0", "1"])
@pytest.mark.parametrize("liger", [None, True, False])
@pytest.mark.parametrize("parallel", ["single", "ddp", "fsdp", "deepspeed-zero2"])
@pytest.mark.parametrize("change", [{}, {"use_dora": True}, {"quantization_bit": 8}, {"use_fast_kernels": False}, {"family": "mistral"}])
def test_planning_decisions_equal_the_trainers(monkeypatch, env, liger, parallel, change):
    """The planner's mirror of compile_decision (without its Triton import) and the calls of fast_path_decision and
    offload_decision give what model.fast gives, Triton answered yes (as on a CUDA GPU with torch's wheels)."""
    from dataclasses import replace

    import torch.utils._triton

    from tunelab.estimate.fastpath import fast_path_plan, stand_in_model, stand_in_resolved
    from tunelab.model.fast import compile_decision, fast_path_decision, offload_decision

    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    if env is None:
        monkeypatch.delenv("TUNELAB_FAST_COMPILE", raising=False)
    else:
        monkeypatch.setenv("TUNELAB_FAST_COMPILE", env)
    monkeypatch.setenv("TUNELAB_OFFLOAD_CHECKPOINTS", "1")
    family = change.get("family", "qwen2")
    change = {k: v for k, v in change.items() if k != "family"}
    shape = replace(model_shape(Q7), family=family)
    cfg = _view(enable_liger_kernel=liger, **change)
    plan = fast_path_plan(shape, cfg, parallel=parallel)
    model, resolved = stand_in_model(shape), stand_in_resolved(cfg, parallel=parallel)
    assert (plan.fused, plan.fused_reason) == fast_path_decision(model, cfg, resolved)
    real_on, real_reason = compile_decision(model, cfg, resolved)
    assert plan.compiled == real_on
    assert plan.compiled_reason == real_reason or plan.compiled_reason.startswith(real_reason)
    assert plan.offload == (plan.fused and offload_decision(cfg, resolved)[0])
    asked = fast_path_plan(shape, cfg, parallel=parallel, ask_triton=True)  # the train-time form: the real function
    assert (asked.compiled, asked.compiled_reason) == (real_on, real_reason)


@pytest.mark.parametrize("offload", [True, False])
@pytest.mark.parametrize("env,bits,parallel,tied", [
    (None, 4, "single", False), ("1", 4, "single", False), ("0", 4, "single", False), ("1", None, "single", False),
    ("1", 4, "ddp", False), (None, 4, "single", True)])
def test_host_embedding_checks_equal_the_trainers_up_to_the_device(monkeypatch, env, bits, parallel, tied, offload):
    """host_embedding_decision reads the loaded model (its embedding must be on a CUDA device): on a CPU model every
    config check it makes before that one agrees with the planner's, and where the planner says on, the trainer's
    function has passed them all and stops at the device."""
    import types

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tunelab.estimate.fastpath import host_embedding_checks
    from tunelab.model.fast.embed import host_embedding_decision

    if env is None:
        monkeypatch.delenv("TUNELAB_HOST_EMBEDDING", raising=False)
    else:
        monkeypatch.setenv("TUNELAB_HOST_EMBEDDING", env)
    config = Qwen2Config(hidden_size=64, intermediate_size=176, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, tie_word_embeddings=tied)
    model = Qwen2ForCausalLM(config).requires_grad_(False)
    cfg = types.SimpleNamespace(quantization_bit=bits, additional_target=None)
    resolved = types.SimpleNamespace(device="cuda", parallel=parallel)
    from dataclasses import replace

    mine = host_embedding_checks(replace(_tiny_shape(), tied=tied), cfg, resolved, offload)
    real = host_embedding_decision(model, cfg, resolved, offload=offload)
    assert torch.nn.Embedding is type(model.get_input_embeddings())
    if mine[0]:
        assert real == (False, "the embedding is on cpu")
    else:
        assert real == mine


def test_cli_names_each_fast_path_decision_and_follows_the_environment(monkeypatch, capsys):
    for var in ("TUNELAB_FAST_COMPILE", "TUNELAB_OFFLOAD_CHECKPOINTS", "TUNELAB_HOST_EMBEDDING"):
        monkeypatch.delenv(var, raising=False)
    rc, out, _ = _cli(capsys, Q7)
    assert rc == 0 and "compiled decoder layers: on" in out and "dequantized weights: all 7 of a layer (compiled)" in out
    assert "stack: tunelab (fused loss, compiled decoder layers, checkpoints offloaded, host embedding)" in out
    assert "input embedding: in pinned host memory" in out and "activations: 2 checkpoints + 1 layer output (offload)" in out
    monkeypatch.setenv("TUNELAB_FAST_COMPILE", "0")
    monkeypatch.setenv("TUNELAB_OFFLOAD_CHECKPOINTS", "0")
    rc, out, _ = _cli(capsys, Q7, "--json")
    doc = json.loads(out)
    assert doc["fast_path"]["compiled"] == {"on": False, "reason": "TUNELAB_FAST_COMPILE=0"}
    assert doc["fast_path"]["offload"] == {"on": False, "reason": "TUNELAB_OFFLOAD_CHECKPOINTS=0"}
    assert not (doc["settings"]["offload"] or doc["settings"]["compiled"] or doc["settings"]["host_embedding"])
    keys = [r["key"] for r in doc["breakdown"]]
    assert "dequant" in keys and doc["breakdown"][keys.index("activations")]["what"].startswith("activations: checkpoints (28")
    rc, out, _ = _cli(capsys, Q7, "--plain", "--json")
    assert json.loads(out)["fast_path"] is None


def test_training_config_keys_decide_the_fast_path(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TUNELAB_FAST_COMPILE", raising=False)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model_name_or_path: {Q7}\nquantization_bit: 4\nper_device_train_batch_size: 4\ncutoff_len: 1024\n")
    rc, out, _ = _cli(capsys, str(cfg), "--json")
    assert rc == 0 and json.loads(out)["settings"]["compiled"]
    rc, out, _ = _cli(capsys, str(cfg), "enable_liger_kernel=true", "--json")
    doc = json.loads(out)
    assert not doc["settings"]["compiled"] and doc["settings"]["liger"]
    assert doc["fast_path"]["compiled"]["reason"].startswith("enable_liger_kernel: true")
    rc, out, _ = _cli(capsys, str(cfg), "use_fast_kernels=false", "--json")
    doc = json.loads(out)
    assert doc["fast_path"]["fused"] == {"on": False, "reason": "use_fast_kernels: false"} and not doc["settings"]["compiled"]


# ---------------------------------------------------------------- rough edges


def test_a_model_folder_without_config_json(tmp_path, capsys):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    rc, out, err = _cli(capsys, str(tmp_path))
    assert rc == 1 and f"model folder '{tmp_path}' has no config.json." in err and "Traceback" not in err + out


def test_a_training_config_without_the_model(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("quantization_bit: 4\ncutoff_len: 512\n")
    rc, out, err = _cli(capsys, str(cfg))
    assert rc == 1 and "model_name_or_path is not set in the config" in err and "Traceback" not in err + out


def test_use_fast_kernels_true_where_it_cannot_apply_is_the_trainers_error(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model_name_or_path: {Q7}\nquantization_bit: 4\nlora_dropout: 0.05\nuse_fast_kernels: true\n")
    rc, out, err = _cli(capsys, str(cfg))
    assert rc == 1 and "use_fast_kernels: true, but the fast path cannot apply here: lora_dropout 0.05" in err


def test_a_compiled_setup_without_checkpointing_is_estimated_eager():
    """compile_decision keeps the layers eager without checkpointing (a compiled layer forward would save the 7
    dense weights of every layer: the CPU graphs): a compiled setup whose checkpointing fit turns off is the eager
    path with Liger's layer set, the final norm transformers' (as planned with Liger left out), one dequantized
    weight at a time, nothing saved per layer beyond the activations."""
    s = _tiny_shape()
    comp = estimate(s, Setup(batch=2, seq=16, compiled=True, grad_ckpt=False))
    eager = estimate(s, Setup(batch=2, seq=16, liger=True, grad_ckpt=False))
    assert [r.key for r in comp.rows] == [r.key for r in eager.rows]
    final = T.r512((4 * 64 + 4 + 256) * 32) - T.r512((4 + 256) * 32)  # transformers' final norm against Liger's
    assert comp.phases["loss"] - eager.phases["loss"] == final
    assert comp.phases["backward"] == eager.phases["backward"]
    assert comp.row("dequant") == eager.row("dequant")


def _graph_tool():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "tools", "estimate_compiled_graph.py")
    spec = importlib.util.spec_from_file_location("estimate_compiled_graph", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_cpu_graphs_behind_the_compiled_terms():
    """What the no-checkpointing term rests on, in AOTAutograd's graphs on the CPU (NF4 through bitsandbytes' CPU
    backend, inductor's partitioner; ~10 s): a compiled layer forward with no checkpoint around it saves all 7 dense
    weights for grad x (0.434 GiB a layer at 7B) and the backward dequantizes nothing. (The checkpointed form, where
    the recompute and grad x share one dequantize: `python tools/estimate_compiled_graph.py --quantized`, and the
    GPU points of docs/estimate.md.)"""
    tool = _graph_tool()
    flat = tool.analyse(quantized=True, ckpt=False)
    assert flat["fw"]["dequantize_4bit"] == 7 and flat["bw"]["dequantize_4bit"] == 0
    assert flat["fw"]["saved_for_backward"]["dense_weights"] == 7
    assert flat["fw"]["saved_for_backward"]["dense_weights_scaled_gib"] == round(T.compiled_dequant_bytes(model_shape(Q7), 4, 2) / T.GiB, 3)


def test_fit_turning_checkpointing_off_drops_the_offload_and_the_host_embedding_with_it(monkeypatch):
    """The trainer installs the host embedding where the offload is, and the offload where there are checkpoints: a
    setup without checkpointing keeps the table on the GPU (unless TUNELAB_HOST_EMBEDDING=1 forces it)."""
    from dataclasses import replace

    from tunelab.estimate.from_config import apply_plan

    for var in ("TUNELAB_FAST_COMPILE", "TUNELAB_OFFLOAD_CHECKPOINTS", "TUNELAB_HOST_EMBEDDING"):
        monkeypatch.delenv(var, raising=False)
    s = model_shape(Q7)
    u, plan = apply_plan(s, Setup(batch=1, seq=512))
    assert u.offload and u.host_embedding_on() and plan.offload and plan.host_embedding
    off = replace(u, grad_ckpt=False)
    assert not off.host_embedding_on()
    table = T.r512(2 * 152064 * 3584)
    assert estimate(s, off).row("weights_16bit") - estimate(s, u).row("weights_16bit") == table
    u2, plan2 = apply_plan(s, Setup(batch=1, seq=512, grad_ckpt=False))  # planned without checkpointing
    assert not (plan2.offload or plan2.host_embedding) and u2.offload and not u2.host_embedding_on()
    assert replace(u2, grad_ckpt=True).host_embedding_on()  # fit turning checkpointing on gets both, as the trainer
    monkeypatch.setenv("TUNELAB_HOST_EMBEDDING", "1")
    forced, _ = apply_plan(s, Setup(batch=1, seq=512, grad_ckpt=False))
    assert forced.host_embedding_on()


def test_a_16_bit_base_keeps_its_embedding_on_the_gpu(monkeypatch):
    """The trainer puts the table on the host for a 4-bit base only: fit's 16-bit alternative counts it on the GPU,
    and a 16-bit setup switched to 4-bit gets it."""
    from dataclasses import replace

    from tunelab.estimate.from_config import apply_plan

    for var in ("TUNELAB_FAST_COMPILE", "TUNELAB_OFFLOAD_CHECKPOINTS", "TUNELAB_HOST_EMBEDDING"):
        monkeypatch.delenv(var, raising=False)
    s = model_shape(Q7)
    q, _ = apply_plan(s, Setup(batch=1, seq=512))
    sixteen = replace(q, method="lora", bits=None)
    assert q.host_embedding_on() and not sixteen.host_embedding_on()
    assert estimate(s, sixteen).row("weights_16bit") == T.r512(2 * 152064 * 3584) * 2 + 28 * 2 * 7168 + 7168
    lora, plan = apply_plan(s, Setup(method="lora", bits=None, batch=1, seq=512))
    assert not plan.host_embedding and not lora.host_embedding_on()
    assert replace(lora, method="qlora", bits=4).host_embedding_on()
    rc_doc = estimate(s, sixteen).to_json()["settings"]
    assert rc_doc["host_embedding"] is False


def test_pinned_host_memory_follows_the_split_recomputes_switches(monkeypatch):
    """The residuals the split recompute keeps on the host are counted as the trainer installs it: not with
    TUNELAB_SPLIT_RECOMPUTE=0, not under TUNELAB_SPLIT_MIN_TOKENS tokens a step."""
    s = model_shape(Q7)
    setup = Setup(batch=4, seq=1024, compiled=True, offload=True)
    inputs = 28 * 4096 * 3584 * 2  # the layer inputs (no host embedding in this setup)
    assert estimate(s, setup).host_pinned == 2 * inputs
    monkeypatch.setenv("TUNELAB_SPLIT_MIN_TOKENS", "8192")
    assert estimate(s, setup).host_pinned == inputs
    monkeypatch.setenv("TUNELAB_SPLIT_MIN_TOKENS", "4096")
    assert estimate(s, setup).host_pinned == 2 * inputs
    monkeypatch.setenv("TUNELAB_SPLIT_RECOMPUTE", "0")
    assert estimate(s, setup).host_pinned == inputs


def test_pinned_host_memory_is_reported():
    """Offloaded checkpoints (L x N x H x b) and the host embedding table live in pinned CPU RAM: reported apart."""
    s = model_shape(Q7)
    est = estimate(s, Setup(batch=4, seq=1024, compiled=True, offload=True, host_embedding=True))
    # the layer inputs and (split recompute, from 2,048 tokens) each layer's post-attention residual
    assert est.host_pinned == 2 * 28 * 4096 * 3584 * 2 + T.r512(2 * 152064 * 3584)
    assert estimate(s, Setup(batch=4, seq=1024, compiled=True)).host_pinned == 0
    small = estimate(s, Setup(batch=1, seq=1024, compiled=True, offload=True, host_embedding=True))
    assert small.host_pinned == 28 * 1024 * 3584 * 2 + T.r512(2 * 152064 * 3584)  # under 2,048 tokens: no split
    assert est.to_json()["host_pinned_gib"] == round(est.host_pinned / T.GiB, 3)
