"""The fast path's fused LoRA projection (tunelab.model.fast.lora) against its torch reference and against PEFT,
forward and backward, and the fast path's selection (off on CPU with the reason, forced off, required).

CPU tests use bitsandbytes' CPU backend for the real NF4 layer; the same checks run on the GPU in bf16 and fp16
(marked gpu). Tolerances: float32 compute agrees to rounding (1e-5 relative); bf16/fp16 operands to 1e-2
relative (each side rounds its bf16 products differently: the fused op accumulates the LoRA term in fp32).
"""
from __future__ import annotations

import types

import pytest
import torch

from helpers_train import offline_session, tiny_model  # noqa: F401
from test_fast_split import _stepper
from tunelab.model.fast import fast_path_decision, patch_lora_layers, unpatch_lora_layers
from tunelab.model.fast.lora import lora_linear, lora_linear_reference

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _nf4_layer(fan_in, fan_out, device, dtype=torch.bfloat16, seed=0):
    import bitsandbytes as bnb

    g = torch.Generator().manual_seed(seed)
    layer = bnb.nn.Linear4bit(fan_in, fan_out, bias=True, compute_dtype=dtype, quant_type="nf4",
                              compress_statistics=True, quant_storage=dtype)
    layer.weight = bnb.nn.Params4bit((torch.randn(fan_out, fan_in, generator=g) * 0.05).to(dtype), requires_grad=False,
                                     quant_type="nf4", compress_statistics=True, quant_storage=dtype)
    layer.bias = torch.nn.Parameter((torch.randn(fan_out, generator=g) * 0.05).to(dtype), requires_grad=False)
    layer = layer.to(device)
    if device == "cpu":
        layer(torch.zeros(1, fan_in, dtype=dtype))  # the CPU backend quantizes on first use
    return layer


def _lora(fan_in, fan_out, rank, device, seed):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(rank, fan_in, generator=g) * 0.1).to(device).requires_grad_(True)
    b = (torch.randn(fan_out, rank, generator=g) * 0.1).to(device).requires_grad_(True)
    return a, b


def _rel(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def _check(weight, quant_state, bias, device, dtype, seed, tol):
    fan_out, fan_in = quant_state.shape if quant_state is not None else weight.shape
    a, b = _lora(fan_in, fan_out, 8, device, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(3, 37, fan_in, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    gy = torch.randn(3, 37, fan_out, generator=g).to(device=device, dtype=dtype)
    y = lora_linear(x, weight, quant_state, bias, a, b, 2.0, dtype)
    grads = torch.autograd.grad(y, (x, a, b), gy)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = lora_linear_reference(x_ref, weight, quant_state, bias, a, b, 2.0, dtype)
    refs = torch.autograd.grad(y_ref, (x_ref, a, b), gy)
    assert y.shape == y_ref.shape and y.dtype == dtype
    assert grads[0].dtype == dtype and grads[1].dtype == torch.float32 and grads[2].dtype == torch.float32
    for got, ref in zip((y, *grads), (y_ref, *refs)):
        assert torch.isfinite(got).all()
        assert _rel(got, ref) < tol


def test_fused_nf4_projection_matches_reference_fp32_cpu():
    layer = _nf4_layer(64, 96, "cpu")
    _check(layer.weight, layer.weight.quant_state, layer.bias, "cpu", torch.float32, seed=1, tol=1e-5)


def test_fused_dense_projection_matches_reference_bf16_cpu():
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(48, 40, generator=g) * 0.05).bfloat16()
    _check(w, None, None, "cpu", torch.bfloat16, seed=4, tol=1e-2)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_lora_first_order_matches_reference_cpu(monkeypatch, dtype, tol):
    """TUNELAB_LORA_FIRST's order (rank-r product first, the big GEMM adds it): the same function, forward and
    backward; a biased projection keeps the default order."""
    from tunelab.model.fast import lora

    monkeypatch.setattr(lora, "LORA_FIRST", True)
    calls = []
    mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: calls.append(tuple(b.shape)) or mm(a, b))
    g = torch.Generator().manual_seed(21)
    w = (torch.randn(48, 40, generator=g) * 0.05).to(dtype)
    _check(w, None, None, "cpu", dtype, seed=22, tol=tol)
    assert (8, 48) in calls and (8, 40) in calls  # forward and grad x: the rank-r products ran first, alone
    layer = _nf4_layer(64, 96, "cpu")
    _check(layer.weight, layer.weight.quant_state, layer.bias, "cpu", torch.float32, seed=23, tol=1e-5)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("lora_first", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_nf4_and_dense_projection_match_reference_on_gpu(dtype, lora_first, monkeypatch):
    from tunelab.model.fast import lora

    monkeypatch.setattr(lora, "LORA_FIRST", lora_first)
    layer = _nf4_layer(512, 1536, "cuda", dtype=dtype, seed=5)
    _check(layer.weight, layer.weight.quant_state, layer.bias, "cuda", dtype, seed=6, tol=1e-2)
    w = (torch.randn(768, 512, device="cuda") * 0.05).to(dtype)
    _check(w, None, None, "cuda", dtype, seed=7, tol=1e-2)


def _tiny_peft(device, quantized: bool):
    """A 2-layer hidden-64 Qwen2 with LoRA r=8 on all seven projections (B nonzero so every gradient is live)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    if quantized:
        from tunelab.model.tiny import quantize_decoder_linears_nf4

        quantize_decoder_linears_nf4(model)
    model = model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))).mul(0.05).to(device)
    return model


def _step(model, ids, device):
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    return loss, torch.autograd.grad(loss, params)


def _whole_step_fast_vs_plain(device, quantized):
    model = _tiny_peft(device, quantized)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(9)).to(device)
    loss_plain, grads_plain = _step(model, ids, device)
    assert patch_lora_layers(model) == 14  # 7 projections x 2 layers
    loss_fast, grads_fast = _step(model, ids, device)
    assert abs(loss_fast.item() - loss_plain.item()) < 2e-3 * loss_plain.item()
    for gf, gp in zip(grads_fast, grads_plain):
        assert _rel(gf, gp) < 3e-2
    unpatch_lora_layers(model)
    loss_again, _ = _step(model, ids, device)  # unpatched: PEFT's forward again, the plain loss again
    assert abs(loss_again.item() - loss_plain.item()) <= 1e-6 * loss_plain.item()


def test_whole_step_fast_matches_plain_cpu_nf4():
    _whole_step_fast_vs_plain("cpu", quantized=True)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("quantized", [True, False])
def test_whole_step_fast_matches_plain_on_gpu(quantized):
    _whole_step_fast_vs_plain("cuda", quantized)


def test_patched_layer_keeps_peft_forward_without_grad():
    model = _tiny_peft("cpu", quantized=False)
    patch_lora_layers(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    calls = []
    plain = layer._tunelab_plain_forward
    layer._tunelab_plain_forward = lambda *a, **k: calls.append(1) or plain(*a, **k)
    with torch.no_grad():
        layer(x)
    assert calls == [1]  # generation/evaluation: PEFT's own path (bitsandbytes' inference kernels)
    layer(x.requires_grad_(True))
    assert calls == [1]  # training: the fused function


def _cfg(**kw):
    base = dict(use_fast_kernels=None, finetuning_type="lora", use_dora=False, lora_dropout=0.0, quantization_bit=4)
    return types.SimpleNamespace(**{**base, **kw})


def _model(model_type):
    return types.SimpleNamespace(config=types.SimpleNamespace(model_type=model_type))


CUDA = types.SimpleNamespace(device="cuda", device_name="NVIDIA H200")


@pytest.mark.parametrize("cfg, resolved, model_type, expect", [
    (_cfg(), types.SimpleNamespace(device="cpu", device_name="CPU"), "qwen2", "the device is cpu: the fast path needs a CUDA GPU"),
    (_cfg(use_fast_kernels=False), CUDA, "qwen2", "use_fast_kernels: false"),
    (_cfg(lora_dropout=0.1), CUDA, "qwen2", "lora_dropout 0.1: only dropout 0 is fused"),
    (_cfg(use_dora=True), CUDA, "qwen2", "use_dora: DoRA is not fused"),
    (_cfg(quantization_bit=8), CUDA, "qwen2", "quantization_bit 8: the fast path covers 4-bit and 16-bit base weights"),
    (_cfg(finetuning_type="full"), CUDA, "qwen2", "finetuning_type full: the fast path covers LoRA"),
    (_cfg(), CUDA, "gemma2", "architecture gemma2 is not covered yet (covered: qwen2, qwen3, llama)"),
    (_cfg(), types.SimpleNamespace(device="cuda", device_name="H200", parallel="fsdp"), "qwen2",
     "parallel fsdp shards the weights: the fast path covers unsharded ones (one GPU, DDP, ZeRO-1/2)"),
])
def test_decision_off_with_reason(cfg, resolved, model_type, expect):
    assert fast_path_decision(_model(model_type), cfg, resolved) == (False, expect)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "llama"])
def test_decision_on_for_covered_architectures(model_type):
    assert fast_path_decision(_model(model_type), _cfg(), CUDA) == (True, f"{model_type} LoRA on NVIDIA H200")


def test_required_fast_path_on_cpu_is_an_error_and_auto_logs_off(caplog):
    import logging

    from tunelab.errors import ConfigError
    from tunelab.model.fast import apply_fast_path

    cpu = types.SimpleNamespace(device="cpu", device_name="CPU")
    with pytest.raises(ConfigError, match="use_fast_kernels: true, but the fast path cannot apply here: the device is cpu"):
        apply_fast_path(_model("qwen2"), _cfg(use_fast_kernels=True), cpu)
    with caplog.at_level(logging.INFO, logger="tunelab.model.fast"):
        assert apply_fast_path(_model("qwen2"), _cfg(), cpu) == []
    assert "fast path: off (the device is cpu: the fast path needs a CUDA GPU)" in caplog.text


def test_patching_adds_no_module_or_state_dict_key():
    model = _tiny_peft("cpu", quantized=False)
    keys = list(model.state_dict())
    names = [n for n, _ in model.named_modules()]
    patch_lora_layers(model)
    assert list(model.state_dict()) == keys and [n for n, _ in model.named_modules()] == names


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[gpu, pytest.mark.gpu])])
def test_offloaded_checkpoints_give_the_plain_checkpointing_gradients(device):
    from tunelab.model.fast.offload import offload_checkpoints

    model = _tiny_peft(device, quantized=device == "cuda")
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.base_model.model.enable_input_require_grads()
    model.train()
    backward_step = _stepper(model, device, seed=11)  # .backward() as the Trainer does: the recompute fills .grad

    loss_plain, grads_plain = backward_step()
    assert offload_checkpoints(model) == 2  # the two decoder layers
    for _ in range(2):  # a second step reuses the stash
        loss, grads = backward_step()
        assert loss == loss_plain
        for g, gp in zip(grads, grads_plain):  # the same arithmetic in the same order: equal (CPU and GPU)
            assert torch.equal(g, gp)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[gpu, pytest.mark.gpu])])
def test_loader_installs_the_fast_path_where_it_applies(tiny_model, device):  # noqa: F811
    import dataclasses

    from tunelab.config import load_config
    from tunelab.config.resolve import resolve
    from tunelab.model.loader import load_model

    quant = {"quantization_bit": 4, "bf16": True} if device == "cuda" else {}
    cfg = load_config({"model_name_or_path": tiny_model, "do_train": True, "lora_target": "all", **quant})
    resolved = dataclasses.replace(resolve(cfg), device=device)
    model = load_model(cfg, resolved, for_training=True)
    patched = [m for m in model.modules() if hasattr(m, "_tunelab_plain_forward")]
    if device == "cpu":
        assert model.tunelab_fast_path == [] and patched == []
    else:  # the defaults on one GPU: fused projections, 4-bit gate/up as one, the host embedding with the offload, compiled layers
        assert model.tunelab_fast_path == ["fast-lora(14 projections)", "group-gate-up(2 layers)", "host-embedding",
                                           "offload(2 layers)", "split-recompute(2 layers)", "compile(2 layers)"]
        assert len(patched) == 14
        assert model.get_base_model().get_input_embeddings().weight.device.type == "cpu"
        assert resolved.fast_path.startswith("on (qwen2 LoRA on ") and "2 decoder layers compiled" in resolved.fast_path
        model.to("cuda")  # as the Trainer does after loading: the table stays on the host
        assert model.get_base_model().get_input_embeddings().weight.device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_loader_without_the_memory_levers_keeps_the_embedding_on_the_gpu(tiny_model, monkeypatch):  # noqa: F811
    from tunelab.config import load_config
    from tunelab.config.resolve import resolve
    from tunelab.model.loader import load_model

    monkeypatch.setenv("TUNELAB_OFFLOAD_CHECKPOINTS", "0")
    cfg = load_config({"model_name_or_path": tiny_model, "do_train": True, "lora_target": "all", "quantization_bit": 4, "bf16": True})
    model = load_model(cfg, resolve(cfg), for_training=True)
    assert model.tunelab_fast_path == ["fast-lora(14 projections)", "group-gate-up(2 layers)", "compile(2 layers)"]
    assert model.get_base_model().get_input_embeddings().weight.device.type == "cuda"


def test_compile_decision_and_liger_left_out(monkeypatch, caplog):
    import logging

    import torch.utils._triton

    from tunelab.model.fast import compile_decision
    from tunelab.model.kernels import apply_kernels

    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    single = types.SimpleNamespace(device="cuda", device_name="NVIDIA H200", parallel="single")
    assert compile_decision(_model("qwen2"), _cfg(), single) == (True, "decoder layers compiled")
    cpu = types.SimpleNamespace(device="cpu", device_name="CPU")
    assert compile_decision(_model("qwen2"), _cfg(), cpu) == (False, "the fast path is off (the device is cpu: the fast path needs a CUDA GPU)")
    assert compile_decision(_model("qwen2"), _cfg(enable_liger_kernel=True), single)[1].startswith("enable_liger_kernel: true")
    ddp = types.SimpleNamespace(device="cuda", device_name="H200", parallel="ddp")
    assert compile_decision(_model("qwen2"), _cfg(), ddp) == (False, "parallel ddp: compiled layers are measured on one GPU only")
    no_ckpt = types.SimpleNamespace(device="cuda", device_name="H200", parallel="single", gradient_checkpointing=False)
    assert compile_decision(_model("qwen2"), _cfg(), no_ckpt) == (
        False, "gradient checkpointing is off: a compiled layer would keep its dequantized weights for the backward "
               "(~12 GiB more at 7B), so the layers run eager")
    with caplog.at_level(logging.INFO, logger="tunelab.model.kernels"):  # training: inductor fuses what Liger would
        assert apply_kernels(_model("qwen2"), _cfg(enable_liger_kernel=None), single, for_training=True) == []
    assert "Liger left out: the compiled decoder layers fuse RMSNorm, RoPE and SwiGLU" in caplog.text
    monkeypatch.setenv("TUNELAB_FAST_COMPILE", "0")
    assert compile_decision(_model("qwen2"), _cfg(), single) == (False, "TUNELAB_FAST_COMPILE=0")
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)
    monkeypatch.delenv("TUNELAB_FAST_COMPILE")
    assert compile_decision(_model("qwen2"), _cfg(), single) == (False, "Triton is not available for torch.compile")


def test_host_embedding_decision(monkeypatch):
    from tunelab.model.fast.embed import host_embedding_decision

    model = _tiny_peft("cpu", quantized=False)
    single = types.SimpleNamespace(device="cuda", parallel="single")
    monkeypatch.delenv("TUNELAB_HOST_EMBEDDING", raising=False)
    assert host_embedding_decision(model, _cfg(), single) == (
        False, "on with the checkpoint offload only (TUNELAB_HOST_EMBEDDING=1 forces it)")
    assert host_embedding_decision(model, _cfg(), single, offload=True) == (False, "the embedding is on cpu")
    monkeypatch.setenv("TUNELAB_HOST_EMBEDDING", "0")
    assert host_embedding_decision(model, _cfg(), single, offload=True) == (False, "TUNELAB_HOST_EMBEDDING=0")
    monkeypatch.setenv("TUNELAB_HOST_EMBEDDING", "1")
    assert host_embedding_decision(model, _cfg(quantization_bit=None), single)[1].startswith("the base is not 4-bit")
    assert host_embedding_decision(model, _cfg(), types.SimpleNamespace(parallel="ddp")) == (False, "parallel ddp: one process only")
    assert host_embedding_decision(model, _cfg(), single) == (False, "the embedding is on cpu")
    base = model.get_base_model()
    base.lm_head.weight = base.model.embed_tokens.weight
    assert host_embedding_decision(model, _cfg(), single) == (False, "the embedding is tied to the output head")


def test_host_embedding_stays_on_the_host_when_the_model_moves():
    from tunelab.model.fast.embed import keep_embedding_on_host

    model = _tiny_peft("cpu", quantized=False)
    emb = model.get_base_model().get_input_embeddings()
    rows = emb.weight[[3, 7]].clone()
    assert keep_embedding_on_host(model) == 512 * 64 * 2
    model.to("meta")  # a move to another device (as the Trainer's .to("cuda")) leaves the table on the host
    assert emb.weight.device.type == "cpu" and torch.equal(emb.weight[[3, 7]], rows)
    assert model.get_base_model().lm_head.weight.device.type == "meta"  # the rest moved
    model.to(torch.float16)  # a dtype change still applies, on the host
    assert emb.weight.device.type == "cpu" and emb.weight.dtype == torch.float16
    assert torch.equal(emb.weight[[3, 7]], rows.to(torch.float16))


@gpu
@pytest.mark.gpu
def test_host_embedding_gives_the_same_step_on_gpu(monkeypatch):
    from tunelab.model.fast.embed import host_embedding_decision, keep_embedding_on_host

    model = _tiny_peft("cuda", quantized=True)
    patch_lora_layers(model)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(13)).cuda()
    loss_gpu, grads_gpu = _step(model, ids, "cuda")
    monkeypatch.setenv("TUNELAB_HOST_EMBEDDING", "1")
    assert host_embedding_decision(model, _cfg(), types.SimpleNamespace(parallel="single")) == (True, "input embedding in pinned host memory")
    assert keep_embedding_on_host(model) == 512 * 64 * 2
    weight = model.get_base_model().get_input_embeddings().weight
    assert weight.device.type == "cpu" and weight.is_pinned()
    loss_host, grads_host = _step(model, ids, "cuda")
    assert loss_host.item() == loss_gpu.item()  # a gather copies rows: the same numbers
    for a, b in zip(grads_host, grads_gpu):
        assert torch.equal(a, b)
    from tunelab.model.fast import embed

    before = embed.RETURNS[0]
    weight.data = weight.data.cuda()  # as a later model.to("cuda") would: the next forward returns it to the host
    loss_again, _ = _step(model, ids, "cuda")
    assert weight.device.type == "cpu" and embed.RETURNS[0] == before + 1 and loss_again.item() == loss_gpu.item()


def _checkpointed_nf4_on_gpu(seed):
    """The 4-bit tiny model with fused projections and non-reentrant checkpointing on the GPU, and a function that
    runs one bf16 step on fixed ids and returns (loss, LoRA gradients)."""
    model = _tiny_peft("cuda", quantized=True)
    patch_lora_layers(model)
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.base_model.model.enable_input_require_grads()
    model.train()
    return model, _stepper(model, "cuda", seed=seed)


@gpu
@pytest.mark.gpu
def test_compiled_decoder_layers_train_like_eager_on_gpu():
    from tunelab.model.fast.compile import compile_decoder_layers

    model, backward_step = _checkpointed_nf4_on_gpu(12)
    loss_eager, grads_eager = backward_step()
    assert compile_decoder_layers(model) == 2
    loss, grads = backward_step()
    assert abs(loss - loss_eager) < 1e-3 * loss_eager
    for g, ge in zip(grads, grads_eager):  # inductor fuses the bf16 elementwise work differently
        assert _rel(g, ge) < 3e-2


@gpu
@pytest.mark.gpu
def test_offload_with_compiled_forwards_trains_like_eager_on_gpu():
    from tunelab.model.fast.offload import offload_checkpoints

    model, backward_step = _checkpointed_nf4_on_gpu(14)
    loss_eager, grads_eager = backward_step()
    assert offload_checkpoints(model, compiled=True) == 2
    for _ in range(2):  # the second step reuses the stash and both compiled graphs
        loss, grads = backward_step()
        assert abs(loss - loss_eager) < 1e-3 * loss_eager
        for g, ge in zip(grads, grads_eager):
            assert _rel(g, ge) < 3e-2


def test_offload_decision(monkeypatch):
    from tunelab.model.fast import offload_decision

    single = types.SimpleNamespace(device="cuda", parallel="single")
    monkeypatch.delenv("TUNELAB_OFFLOAD_CHECKPOINTS", raising=False)
    assert offload_decision(_cfg(), single) == (True, "checkpointed layer inputs in pinned host memory")
    assert offload_decision(_cfg(), types.SimpleNamespace(parallel="ddp")) == (
        False, "parallel ddp: its reentrant-style backward bypasses DDP/FSDP hooks")
    monkeypatch.setenv("TUNELAB_OFFLOAD_CHECKPOINTS", "0")
    assert offload_decision(_cfg(), single) == (False, "TUNELAB_OFFLOAD_CHECKPOINTS=0")


def test_compiled_layers_trace_as_one_graph_with_the_fused_ops_cpu():
    """What the compiled default relies on, checked without code generation (AOTAutograd's graphs, run eagerly):
    one graph for both layers, no graph break, the products as tunelab's opaque op (no functionalized addmm, whose
    input copy cost 15 ms a 7B step), and the same loss and gradients as eager."""
    import collections

    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from tunelab.model.fast.compile import compile_counters, compile_decoder_layers

    ops = collections.Counter()

    def count(gm, _):
        ops.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    model = _tiny_peft("cpu", quantized=False)
    patch_lora_layers(model)
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.base_model.model.enable_input_require_grads()  # as the loader does: every layer input needs its gradient
    model.train()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(15))
    loss_eager, grads_eager = _step(model, ids, "cpu")
    before = compile_counters()
    assert compile_decoder_layers(model, backend=aot_autograd(fw_compiler=count, bw_compiler=count)) == 2
    loss, grads = _step(model, ids, "cpu")
    after = compile_counters()
    assert after["unique_graphs"] - before["unique_graphs"] == 1 and after["graph_breaks"] == before["graph_breaks"]
    # 7 in the forward; in the backward the recompute (6: no gradient needs down_proj's output, so it is dropped)
    # and grad x of all 7
    assert ops["tunelab.two_products.default"] == 7 + 6 + 7
    assert ops["aten.addmm.default"] == 0
    assert abs(loss.item() - loss_eager.item()) < 1e-3 * loss_eager.item()
    for g, ge in zip(grads, grads_eager):
        assert _rel(g, ge) < 2e-2


def test_a_layer_that_fails_to_compile_runs_eager_and_dynamo_stays_strict(caplog):
    """compile_decoder_layers' fallback is scoped to its layers: a backend that fails leaves the step eager (same
    loss and gradients, a warning), the layers uncompiled afterwards, and dynamo's process-wide suppress_errors
    untouched."""
    import logging

    from tunelab.model.fast.compile import compile_decoder_layers

    def broken(gm, _):
        raise RuntimeError("backend says no")

    torch._dynamo.reset()
    strict = torch._dynamo.config.suppress_errors
    model = _tiny_peft("cpu", quantized=False)
    patch_lora_layers(model)
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.base_model.model.enable_input_require_grads()
    model.train()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(16))
    loss_eager, grads_eager = _step(model, ids, "cpu")
    assert compile_decoder_layers(model, backend=broken) == 2
    with caplog.at_level(logging.WARNING, logger="tunelab.model.fast.compile"):
        loss, grads = _step(model, ids, "cpu")
    assert torch._dynamo.config.suppress_errors == strict
    assert "decoder layer 0 did not compile (BackendCompilerFailed" in caplog.text
    layers = model.base_model.model.model.layers
    assert all(layer._compiled_call_impl is None for layer in layers)
    assert loss.item() == loss_eager.item()
    for g, ge in zip(grads, grads_eager):
        assert torch.equal(g, ge)
    torch._dynamo.reset()


def _train(model, steps: int, seed: int):
    """AdamW with gradient clipping for `steps` steps on seeded random batches: (losses, pre-clip grad norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, 512, (2, 16), generator=g) for _ in range(4)]  # cycled: the loss falls
    losses, norms = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is several times faster on a shared machine
    try:
        for step in range(steps):
            ids = batches[step % len(batches)]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            norms.append(torch.nn.utils.clip_grad_norm_(params, 1.0).item())
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    return losses, norms


def test_fifty_steps_fast_train_like_plain_cpu():
    # issue 9's parity bounds (loss within 1% at every step, grad norm within 2%) on the tiny bf16 model (the NF4
    # CPU backend is too slow for 100 steps in CI; its single step is checked above); the 7B check on the GPU is
    # tools/fast_parity.py over `tunelab bench --steps 50`
    plain_losses, plain_norms = _train(_tiny_peft("cpu", quantized=False), 50, seed=21)
    fast = _tiny_peft("cpu", quantized=False)
    assert patch_lora_layers(fast) == 14
    fast_losses, fast_norms = _train(fast, 50, seed=21)
    assert plain_losses[-1] < plain_losses[0] - 0.3  # it trained (6.28 -> ~5.85)
    for a, b in zip(fast_losses, plain_losses):
        assert abs(a - b) <= 0.01 * b
    for a, b in zip(fast_norms, plain_norms):
        assert abs(a - b) <= 0.02 * b


def test_the_recompute_keeps_its_dense_weight_for_the_backward_and_nothing_else_does(monkeypatch):
    """lora.keep_dense: inside the offload's recompute (split.recomputing) the backward reuses the weight the forward
    dequantized (one dequantize per forward + backward, not two) with the same gradients; outside it, and with
    TUNELAB_KEEP_DENSE's switch off (the default), the backward dequantizes again (nothing held across layers)."""
    from tunelab.model.fast import lora
    from tunelab.model.fast.split import recomputing

    assert lora.KEEP_DENSE is (__import__("os").environ.get("TUNELAB_KEEP_DENSE") == "1")
    monkeypatch.setattr(lora, "KEEP_DENSE", True)

    layer = _nf4_layer(64, 96, "cpu")
    w, qs = layer.weight, layer.weight.quant_state
    a, b = _lora(64, 96, 8, "cpu", seed=31)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(32))
    gy = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(33))
    calls = []
    dense = lora.dense_weight
    monkeypatch.setattr(lora, "dense_weight", lambda *args: calls.append(1) or dense(*args))

    def run(inside: bool):
        calls.clear()
        xs = x.clone().requires_grad_(True)
        if inside:
            with recomputing():
                y = lora_linear(xs, w, qs, None, a, b, 2.0, torch.float32)
        else:
            y = lora_linear(xs, w, qs, None, a, b, 2.0, torch.float32)
        grads = torch.autograd.grad(y, (xs, a, b), gy)
        return len(calls), grads

    n_out, grads_out = run(False)
    n_in, grads_in = run(True)
    assert (n_out, n_in) == (2, 1)
    for g_in, g_out in zip(grads_in, grads_out):
        assert torch.equal(g_in, g_out)
    monkeypatch.setattr(lora, "KEEP_DENSE", False)
    assert run(True)[0] == 2


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_the_augmented_backward_gives_the_same_grad_x(dtype, tol):
    """lora_backward with `below` (down's backward: [g, s g B] @ [W; A], rank 5 padded to 8) against the
    two-product form, and both against autograd through the reference."""
    from tunelab.model.fast.lora import lora_backward

    g = torch.Generator().manual_seed(41)
    w = (torch.randn(24, 72, generator=g) * 0.05).to(dtype)  # out 24 < in 72, as down's
    a, b = (torch.randn(5, 72, generator=g) * 0.1).to(dtype), (torch.randn(24, 5, generator=g) * 0.1).to(dtype)
    x2 = torch.randn(9, 72, generator=g).to(dtype)
    gy = torch.randn(9, 24, generator=g).to(dtype)
    xa = x2 @ a.t()
    seen = []

    def below(rows):
        seen.append(tuple(rows.shape))
        return torch.cat([w, rows])

    aug = lora_backward(gy, x2, xa, a, b, lambda: w, 2.0, dtype, below=below)
    two = lora_backward(gy, x2, xa, a, b, lambda: w, 2.0, dtype)
    assert seen == [(8, 72)]
    xs = x2.float().clone().requires_grad_(True)
    y = xs @ w.float().t() + 2.0 * (xs @ a.float().t()) @ b.float().t()
    (ref,) = torch.autograd.grad(y, xs, gy.float())
    assert aug[0].shape == (9, 72) and _rel(aug[0], ref) < tol and _rel(two[0], ref) < tol
    assert torch.equal(aug[1], two[1]) and torch.equal(aug[2], two[2])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_augmented_backward_through_the_nf4_kernel_on_gpu(dtype, monkeypatch):
    """dense_below's [W; A] from the NF4 kernel (W dequantized into the top rows), switched on as TUNELAB_BELOW=1
    does (opt-in since run 17): grad x of a down-shaped projection (out < in) against the reference's, and the
    two-product form's."""
    from tunelab.model.fast import lora as lora_mod
    from tunelab.model.fast import nf4_triton
    from tunelab.model.fast.lora import dense_below, dense_weight, lora_backward

    monkeypatch.setattr(lora_mod, "BELOW", True)

    layer = _nf4_layer(512, 128, "cuda", dtype=dtype, seed=42)
    w, qs = layer.weight, layer.weight.quant_state
    qs.tunelab_triton = nf4_triton.enabled_for(w, qs)
    assert qs.tunelab_triton
    below = dense_below(w, qs, dtype, 128, 512)
    assert below is not None and dense_below(w, qs, dtype, 512, 128) is None
    a, b = _lora(512, 128, 8, "cuda", seed=43)
    a, b = a.detach().to(dtype), b.detach().to(dtype)
    x2 = torch.randn(300, 512, device="cuda", dtype=dtype)
    gy = torch.randn(300, 128, device="cuda", dtype=dtype)
    xa = x2 @ a.t()
    aug = lora_backward(gy, x2, xa, a, b, lambda: dense_weight(w, qs, dtype), 2.0, dtype, below=below)
    two = lora_backward(gy, x2, xa, a, b, lambda: dense_weight(w, qs, dtype), 2.0, dtype)
    wd = dense_weight(w, qs, dtype).float()
    ref = gy.float() @ wd + 2.0 * (gy.float() @ b.float()) @ a.float()
    assert _rel(aug[0], ref) < 1e-2 and _rel(two[0], ref) < 1e-2


def test_sdpa_backend_first_sets_torchs_priority_order(monkeypatch):
    """model/fast/attention.py: TUNELAB_SDPA_FIRST puts that backend first and keeps the others after it in their
    order; unset leaves the order; an unknown name is a ConfigError naming the variable."""
    from torch.nn.attention import SDPBackend

    from tunelab.errors import ConfigError
    from tunelab.model.fast.attention import prefer_sdpa_backend

    before = torch._C._get_sdp_priority_order()
    try:
        monkeypatch.delenv("TUNELAB_SDPA_FIRST", raising=False)
        assert prefer_sdpa_backend() is None and torch._C._get_sdp_priority_order() == before
        monkeypatch.setenv("TUNELAB_SDPA_FIRST", "cudnn")
        assert prefer_sdpa_backend() == "cudnn"
        cudnn = int(SDPBackend.CUDNN_ATTENTION)
        assert torch._C._get_sdp_priority_order() == [cudnn] + [b for b in before if b != cudnn]
        monkeypatch.setenv("TUNELAB_SDPA_FIRST", "fastest")
        with pytest.raises(ConfigError, match="TUNELAB_SDPA_FIRST='fastest'"):
            prefer_sdpa_backend()
    finally:
        torch._C._set_sdp_priority_order(before)
