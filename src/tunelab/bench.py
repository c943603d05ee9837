"""`tunelab bench`: training speed and memory of tunelab's fast and plain paths (and the plain stack), one GPU.

    tunelab bench --arch qwen2.5-7b --method qlora --path fast,plain --shapes 4x1024,1x1024,2x4096
    tunelab bench --arch qwen2.5-7b --variants plain-autocast,tunelab-fast --profiles full,alpaca,alpaca-packed

Method (the same as the peers' figures in the README): a random-init model of the published architecture is
saved as safetensors and loaded with from_pretrained (qlora: 4-bit NF4 + double quantization, bf16 compute;
lora: bf16 weights); LoRA r=8, alpha=16, dropout 0 on every linear layer; gradient checkpointing
(non-reentrant); fused AdamW; full-length random token sequences with labels = inputs; 13 optimizer steps, the
median of the last 10; peak = torch.cuda.max_memory_allocated (and _reserved) over the steps (tunelab's cases
also record each step's peak, the steady peak of the steps after the first three, and the memory allocated
before step 1). Speed and memory do not depend on the weights' values. Each case runs in its own process.

Variants (--path fast,plain is short for tunelab-fast,tunelab-plain):
  tunelab-fast   tunelab's loader and TunelabTrainer (what `tunelab train` runs) with use_fast_kernels: true
                 (fused projections, compiled decoder layers and the checkpoint offload on one GPU, with the
                 input embedding in host memory for a 4-bit base)
  tunelab-plain  the same with use_fast_kernels: false (PEFT's LoRA layers over bitsandbytes)
  tunelab        the same with use_fast_kernels left to auto
  plain-autocast transformers + PEFT + bitsandbytes, model(**batch).loss under bf16 autocast, a hand-written loop
  plain          the same without autocast;  plain-trainer: the plain model in the stock transformers Trainer
  +liger / +noliger  appended: Liger's RMSNorm/RoPE/SwiGLU forced on / off (default: on where installed, except
                 under the compiled layers, where inductor fuses the same; forcing Liger on keeps the layers eager)
  +nocompile     appended: eager decoder layers (TUNELAB_FAST_COMPILE=0); Liger's kernels then apply
  +hostembed / +nohostembed  appended: the input embedding in pinned host memory forced on / off
                 (TUNELAB_HOST_EMBEDDING=1 / 0; 4-bit; default: on with the offload)
  +offload / +nooffload      appended: checkpointed layer inputs in pinned CPU memory forced on / off
                 (TUNELAB_OFFLOAD_CHECKPOINTS=1 / 0; default on)
  +split / +nosplit          appended: the offload's backward without the o and down products recomputed
                 (split.py; TUNELAB_SPLIT_RECOMPUTE=1 / 0; default on)
  +fusedfirst / +nofusedfirst  appended: the offload's first pass through the fused projections, or PEFT's
                 no-grad path (TUNELAB_FUSED_FIRST_PASS=1 / 0; default on since run 14)
  +groupgu / +nogroupgu      appended: gate and up as one fused function (model/fast/group.py;
                 TUNELAB_GROUP_GATE_UP=1 / 0; default on since run 14)
  +celoss / +noceloss        appended: the loss and its gradient as one Triton kernel per chunk, or torch's ops
                 (model/fast/ce_triton.py; TUNELAB_CE_TRITON=1 / 0; default on with CUDA and Triton)
  +augment / +noaugment      appended: gate/up's forward as one GEMM with the LoRA columns appended, or the
                 rank-r product added by a second GEMM (lora._augment; TUNELAB_PAIR_AUGMENT=1 / 0; default on)
  +groupqkv / +nogroupqkv    appended: q, k and v as one fused function (group.group_qkv; TUNELAB_GROUP_QKV=1 / 0;
                 default off)
  +keepdense / +nokeepdense  appended: the offload's recompute keeps its dense base weights for the backward, or
                 the backward dequantizes again (lora.keep_dense; TUNELAB_KEEP_DENSE=1 / 0; default off)
  +below / +nobelow          appended: down's backward as one augmented GEMM [g, s g B] @ [W; A], or the rank-r
                 term added over grad x (lora.dense_below; TUNELAB_BELOW=1 / 0; default off)
  +augpad<N>     appended: the augmented GEMM's rank-r columns padded to a multiple of N (lora.AUGMENT_PAD;
                 TUNELAB_AUGMENT_PAD; default 8): +augpad64 makes 7B gate/up's augmented width 3,648, not 3,600
  +keepgu<N>     appended: the checkpoint offload keeps gate/up's output from the first pass for the last layer and
                 every Nth below it, so their backward skips the pair's GEMM (split.keep_layers; TUNELAB_KEEP_GATE_UP;
                 +keepgu0: none, the default)
  +keepgpu<K>    appended: the last K layers keep gate/up's output on the GPU (no copies; split.keep_plan;
                 TUNELAB_KEEP_GATE_UP_ON_GPU; default 0)
  +blockrows / +noblockrows  appended: the NF4 kernel's strided store (the stacked gate/up weight) per block with
                 a constant divisor, or per element (nf4_triton.BLOCK_ROWS; TUNELAB_NF4_BLOCK_ROWS=1 / 0; default on)
  Each case also reports the host link's copy rate before its first step (host_link_gb_s: d2h / h2d over a
                 pinned 256 MiB buffer; the offload's copies ride it), and per step the training thread's CPU time (step_cpu_s: the forward and the optimizer,
                 and its wait for the GPU at the step's end; not the backward, which autograd runs on its own CUDA
                 device thread), the time by which the host had queued the step's work (step_issue_s: near the
                 step time, the host is the bound) with the whole process's CPU time by then (step_proc_cpu_s, all
                 threads), the garbage collector's [full collections, ms] (step_gc), and over the timed
                 steps the GPU's median SM clock and power and the share of samples at its power cap (gpu;
                 nvidia-smi sampled every 0.5 s, TUNELAB_BENCH_GPU_SAMPLE=0: not; the matmul rate MFU divides by is a
                 full-clock figure)
  +varlen / +novarlen  appended: packed rows' attention per sample through FlashAttention's varlen kernel, or
                 the masked SDPA path (model/fast/varlen.py; TUNELAB_VARLEN=1 / 0; default on; with :alpaca-packed)
  +packfull      appended: packed batches padded to the rows' capacity (one static shape for the compiled layers;
                 data/collator.py full_pack_length; TUNELAB_PACK_FULL=1; opt-in; with :alpaca-packed)
  +splitgraphs / +nosplitgraphs  appended: the split recompute's calls replayed as CUDA graphs too, or not
                 (model/fast/graphs.py split_enabled; TUNELAB_SPLIT_GRAPHS=1 / 0; default on, below 4,096 tokens)
  +pad<N>        appended: padded batches' lengths rounded up to a multiple of N, not 8 (data/collator.py
                 pad_multiple; TUNELAB_PAD_MULTIPLE; with :alpaca): fewer distinct shapes for the layer graphs
  +splitmin<N>   appended: the split recompute from N tokens a step, not 2,048, and the layer graphs below N
                 (split.min_tokens; TUNELAB_SPLIT_MIN_TOKENS)
  +sdpa<name>    appended: SDPA tries that backend first: +sdpacudnn, +sdpaflash, +sdpaefficient, +sdpadefault
                 (model/fast/attention.py; TUNELAB_SDPA_FIRST)
  +lorafirst     appended: each projection's rank-r product first, added by the big GEMM's epilogue
                 (TUNELAB_LORA_FIRST=1; opt-in)
  +ce<MiB>       appended: the fused loss's logits chunk budget (default 256)
  :alpaca / :alpaca-packed appended (or --profiles): the alpaca-like length profile, each batch padded to its
           longest sample (prompt tokens masked) or the samples packed into rows; reports real tokens per second.
Each case prints one JSON line (tokens/s, step time, peak allocated and reserved GiB, MFU against --matmul-tflops,
the loss and gradient norm of every step); a table is printed last and everything is written as JSON (--out).
MFU counts 6 FLOP per layer weight per token (forward, checkpoint recompute, activation gradient; the frozen base
gets no weight gradient), 4 per output-head weight (no recompute), and causal attention (8 x seq/2 x heads x
head_dim per layer and token, same three passes); the LoRA matmuls are left out (<0.5%).
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import time
from typing import Any

_START = time.perf_counter()  # this module is imported first in a `--single` measurement process
QWEN2 = dict(model_type="qwen2", max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)
ARCHS: dict[str, dict[str, Any]] = {
    # published configs (hidden, intermediate, layers, heads, KV heads, vocab, tied head); speed and memory depend
    # on the shapes only, so no weights are downloaded
    "qwen2.5-0.5b": dict(QWEN2, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(QWEN2, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-3b": dict(QWEN2, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(QWEN2, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "qwen2.5-14b": dict(QWEN2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                        num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False, rms_norm_eps=1e-5),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False,
                     max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "tiny": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=False),
}


def flops_per_token(arch: str, seq: int) -> float:
    """Training FLOPs per token with gradient checkpointing and a frozen base (see the module docstring)."""
    a = ARCHS[arch]
    h, inter, layers = a["hidden_size"], a["intermediate_size"], a["num_hidden_layers"]
    head_dim = a.get("head_dim", h // a["num_attention_heads"])
    q, kv = a["num_attention_heads"] * head_dim, a["num_key_value_heads"] * head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * inter
    attention = 8 * (seq / 2) * q  # QK^T and PV, 2 FLOP per MAC, causal half, x (forward + recompute + 2 backward)
    return 6 * layers * per_layer + 4 * h * a["vocab_size"] + layers * attention


def build_random_model(arch: str, out_dir: str) -> str:
    """Save a random-init model of the architecture (bf16 safetensors); reuse it if already there."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    fields = dict(ARCHS[arch])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields, torch_dtype="bfloat16")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(out_dir, max_shard_size="5GB")
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out_dir


def alpaca_like_lengths(n: int, cutoff_len: int, seed: int = 0):
    """Prompt/response token lengths of an Alpaca-GPT4-shaped set (lognormal medians 40 and 180, +20 template tokens)."""
    import numpy as np

    rng = np.random.Generator(np.random.PCG64(seed))
    prompt = np.clip(np.rint(rng.lognormal(np.log(40), 0.7, n)), 8, 512).astype(int) + 20
    response = np.clip(np.rint(rng.lognormal(np.log(180), 0.8, n)), 4, 2048).astype(int)
    response = np.minimum(response, np.maximum(cutoff_len - prompt, 1))
    return prompt.tolist(), response.tolist()


def synthetic_samples(kind: str, batch: int, seq: int, steps: int, vocab: int, seed: int = 0) -> list[dict]:
    import numpy as np

    rng = np.random.Generator(np.random.PCG64(seed + 1))
    n = batch * steps
    if kind == "full":
        out = []
        for _ in range(n):
            ids = rng.integers(1000, min(vocab, 150000), seq).tolist()
            out.append({"input_ids": ids, "labels": list(ids)})
        return out
    prompt, response = alpaca_like_lengths(n, seq, seed)
    out = []
    for p, r in zip(prompt, response):
        ids = rng.integers(1000, min(vocab, 150000), p + r).tolist()
        out.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return out


def _bench_config(model_dir: str, variant: str, method: str):
    from tunelab.config import load_config

    fast = None if variant.startswith("tunelab+") or variant == "tunelab" else variant.startswith("tunelab-fast")
    quant = {"quantization_bit": 4, "quantization_type": "nf4", "double_quantization": True} if method == "qlora" else {}
    return load_config({
        "model_name_or_path": model_dir, **quant, "do_train": True,
        "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0, "lora_target": "all", "bf16": True,
        "optim": "adamw_torch_fused", "learning_rate": 1e-4, "use_fast_kernels": fast,
        "enable_liger_kernel": False if "noliger" in variant else (True if "+liger" in variant else None),
        "output_dir": "/tmp/tunelab-bench-out", "report_to": "none", "save_strategy": "no", "logging_steps": 1,
    })


def plain_model(model_dir: str, method: str = "qlora"):
    """The plain stack's model: from_pretrained (qlora: 4-bit NF4, double quant, bf16) + PEFT LoRA r=8 on all linear layers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = {}
    if method == "qlora":
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map={"": 0}, attn_implementation="sdpa", **kw)
    for p in model.parameters():
        p.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))


def hand_loop(model, samples: list[dict], batch: int, loss_fn, autocast: bool) -> dict[str, list[float]]:
    """Forward, backward, clip, fused AdamW step; each step timed between CUDA synchronisations."""
    import torch

    from tunelab.data.collator import Collator

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    collate = Collator(pad_token_id=0)
    times, losses, norms = [], [], []
    torch.cuda.reset_peak_memory_stats()
    for i in range(0, len(samples), batch):
        b = {k: v.cuda() if hasattr(v, "cuda") else v for k, v in collate(samples[i : i + batch]).items()}
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(model, b)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        norms.append(norm.item())
    del opt
    return {"times": times, "losses": losses, "grad_norms": norms}


def run_plain(model_dir: str, samples: list[dict], batch: int, autocast: bool, method: str) -> dict[str, Any]:
    """The plain stack in a hand-written loop: model(**batch).loss."""
    model = plain_model(model_dir, method)

    def loss_fn(m, b):
        return m(**{k: v for k, v in b.items() if k not in ("loss_rows", "num_tokens")}).loss

    out = hand_loop(model, samples, batch, loss_fn, autocast)
    del model
    return out


def gpu_timeline(events) -> dict[str, Any]:
    """How busy the GPU was in a profiled step: the union of its kernels' intervals (copies and memsets apart: the
    offload's copies run on the copy engines beside the kernels) against the step's span from its first host event
    to its last device event, and the idle gaps between kernels (a step bound by the host shows many). `events`:
    the profiler's kineto events (objects with name(), device_type(), start_ns(), duration_ns())."""
    kernels, copies, first, last = [], 0.0, None, None
    for e in events:
        start, dur = e.start_ns(), e.duration_ns()
        first = start if first is None else min(first, start)
        last = start + dur if last is None else max(last, start + dur)
        if "CUDA" not in str(e.device_type()):
            continue
        if e.name().startswith(("Memcpy", "Memset")):
            copies += dur
        else:
            kernels.append((start, start + dur))
    kernels.sort()
    busy, gaps, end = 0, [], None
    for a, b in kernels:
        if end is not None and a > end:
            gaps.append(a - end)
        if end is None or a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    span = (last - first) if kernels else 0
    big = [g for g in gaps if g >= 20_000]
    return {"span_ms": round(span / 1e6, 3), "kernel_busy_ms": round(busy / 1e6, 3), "kernels": len(kernels),
            "copy_ms": round(copies / 1e6, 3), "idle_gaps_ms": round(sum(gaps) / 1e6, 3),
            "gaps_over_20us": len(big), "gaps_over_20us_ms": round(sum(big) / 1e6, 3)}


def run_tunelab(model_dir: str, samples: list[dict], batch: int, variant: str, method: str,
                pack_to: int | None = None, cutoff_len: int | None = None) -> dict[str, Any]:
    """tunelab's path: its loader and TunelabTrainer (the code `tunelab train` runs), timed per optimizer step."""
    import torch
    from transformers import TrainerCallback

    from tunelab.config.resolve import resolve
    from tunelab.data.collator import Collator, PackedSet, full_pack_length, pad_multiple
    from tunelab.data.processing import EncodedSet
    from tunelab.model.kernels import select_loss
    from tunelab.model.loader import load_model
    from tunelab.train.trainer import TunelabTrainer
    from tunelab.train.workflow import training_arguments

    import re

    budget = re.search(r"\+ce(\d+)", variant)
    if budget:  # e.g. +ce1024: the fused loss's logits chunk budget in MiB (default 256)
        from tunelab.model import kernels

        kernels.CHUNK_BUDGET_BYTES = int(budget.group(1)) << 20
    data = EncodedSet([s["input_ids"] for s in samples], [s["labels"] for s in samples])
    train_set = PackedSet(data, pack_to) if pack_to else data
    cfg = _bench_config(model_dir, variant, method).replace(max_steps=len(train_set) // batch, per_device_train_batch_size=batch,
                                                            packing=bool(pack_to))
    resolved = resolve(cfg)
    stock = variant.startswith("plain-trainer")  # the plain stack's model in the stock transformers Trainer
    from transformers import set_seed

    if "+nocompile" in variant:  # eager decoder layers (and Liger's kernels)
        os.environ["TUNELAB_FAST_COMPILE"] = "0"
    if "+lorafirst" in variant:  # the rank-r product first, the big GEMM adds it (lora.LORA_FIRST, opt-in)
        from tunelab.model.fast import lora

        os.environ["TUNELAB_LORA_FIRST"] = "1"
        lora.LORA_FIRST = True
    for flag, env in (("offload", "TUNELAB_OFFLOAD_CHECKPOINTS"), ("hostembed", "TUNELAB_HOST_EMBEDDING"),
                      ("split", "TUNELAB_SPLIT_RECOMPUTE"), ("fusedfirst", "TUNELAB_FUSED_FIRST_PASS"),
                      ("groupgu", "TUNELAB_GROUP_GATE_UP"), ("celoss", "TUNELAB_CE_TRITON"),
                      ("augment", "TUNELAB_PAIR_AUGMENT"), ("groupqkv", "TUNELAB_GROUP_QKV"),
                      ("keepdense", "TUNELAB_KEEP_DENSE"), ("below", "TUNELAB_BELOW"),
                      ("blockrows", "TUNELAB_NF4_BLOCK_ROWS"), ("varlen", "TUNELAB_VARLEN"),
                      ("packfull", "TUNELAB_PACK_FULL"), ("graphs", "TUNELAB_LAYER_GRAPHS"),
                      ("splitgraphs", "TUNELAB_SPLIT_GRAPHS")):
        if f"+no{flag}" in variant:  # the memory levers (tunelab.model.fast.offload, .embed), forced off / on
            os.environ[env] = "0"
        elif f"+{flag}" in variant:
            os.environ[env] = "1"
    if "+noaugment" in variant or "+augment" in variant:  # read when lora.py is imported: set it if it already was
        from tunelab.model.fast import lora

        lora.AUGMENT = "+augment" in variant
    # also read when their module is imported: set them if it already was
    for flag, module, attr in (("keepdense", "lora", "KEEP_DENSE"), ("below", "lora", "BELOW"),
                               ("blockrows", "nf4_triton", "BLOCK_ROWS")):
        if f"+no{flag}" in variant or f"+{flag}" in variant:
            import importlib

            setattr(importlib.import_module(f"tunelab.model.fast.{module}"), attr, f"+{flag}" in variant)
    augpad = re.search(r"\+augpad(\d+)\b", variant)
    if augpad:  # read at lora.py's import: set it if it already was
        from tunelab.model.fast import lora

        os.environ["TUNELAB_AUGMENT_PAD"] = augpad.group(1)
        lora.AUGMENT_PAD = int(augpad.group(1))
    for flag, env in (("keepgu", "TUNELAB_KEEP_GATE_UP"), ("keepgpu", "TUNELAB_KEEP_GATE_UP_ON_GPU")):
        number = re.search(rf"\+{flag}(\d+)\b", variant)
        if number:  # read when the offload is installed (split.keep_every, split.keep_on_gpu)
            os.environ[env] = number.group(1)
    for flag, env in (("pad", "TUNELAB_PAD_MULTIPLE"), ("splitmin", "TUNELAB_SPLIT_MIN_TOKENS")):
        number = re.search(rf"\+{flag}(\d+)\b", variant)
        if number:  # read by the collator below (data/collator.py pad_multiple) and per call (split.min_tokens)
            os.environ[env] = number.group(1)
    sdpa = re.search(r"\+sdpa(cudnn|flash|efficient|default)\b", variant)
    if sdpa:  # read when the fast path is installed (model/fast/attention.py)
        os.environ["TUNELAB_SDPA_FIRST"] = sdpa.group(1)
    set_seed(cfg.seed)  # as `tunelab train` does before loading: the adapter's initialisation is seeded too
    t_load = time.perf_counter()
    model = plain_model(model_dir, method) if stock else load_model(cfg, resolved, for_training=True)
    load_s = time.perf_counter() - t_load
    from tunelab.model.fast import varlen

    # as `tunelab train` builds it (+packfull above: TUNELAB_PACK_FULL, read here)
    graphed = getattr(model, "_tunelab_layer_graphs", None) is not None  # padded lengths bucketed under the graphs
    collator = Collator(0, pad_multiple("cuda", cutoff_len, graphs=graphed), varlen=varlen.active(model),
                        pack_length=full_pack_length(pack_to))
    out: dict[str, Any] = {"times": [], "losses": [], "grad_norms": [], "step_peaks": [], "load_s": round(load_s, 1),
                           "fast_path": getattr(model, "tunelab_fast_path", None), "step_cpu_s": [], "step_gc": [],
                           "step_issue_s": [], "step_proc_cpu_s": []}
    host_clock = HostClock()
    gc_clock = GcClock()  # the time the cyclic garbage collector takes inside each step (a source of step jitter?)
    windows: list[tuple[float, float]] = []  # each step's (start, end) on perf_counter, for the GPU's samples
    profile_dir = os.environ.get("TUNELAB_BENCH_PROFILE")  # a folder: profile step 6 into <variant>.txt there

    class Timer(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kw):
            torch.cuda.synchronize()
            out["step_peaks"].append(None)  # this step's peak, filled in at its end (the overall peak is their max)
            if profile_dir and state.global_step == 5:
                acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                self.prof = torch.profiler.profile(activities=acts)
                self.prof.__enter__()
            gc_clock.reset()
            host_clock.reset()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            # before waiting for the GPU: when the host had queued the step's work, and the CPU time of all the
            # process's threads by then (autograd's CUDA device thread, which runs the backward, included)
            issued, _, proc = host_clock.lap()
            out["step_issue_s"].append(round(issued, 4))
            out["step_proc_cpu_s"].append(round(proc, 4))
            torch.cuda.synchronize()
            out["times"].append(time.perf_counter() - self.t0)
            windows.append((self.t0, time.perf_counter()))
            # the host's share: the training thread's CPU time in the step (its forward and optimizer: autograd runs a CUDA
            # backward on its own device thread, not counted here), and the
            # garbage collector's [full collections, ms in all collections] in it
            out["step_cpu_s"].append(round(host_clock.lap()[1], 4))
            out["step_gc"].append([gc_clock.full, round(gc_clock.seconds * 1000, 2)])
            # step 1 also holds compilation's transients: the steady peak (of the later steps) is kept beside it
            out["step_peaks"][-1] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            torch.cuda.reset_peak_memory_stats()
            if len(out["times"]) == 1:  # from the process's start (imports, load, compile) to the first step's end
                out["to_first_step_s"] = round(time.perf_counter() - _START, 1)
            if self.prof is not None:
                self.prof.__exit__(None, None, None)
                name = os.path.join(profile_dir, variant.replace(":", "_").replace("+", "_") + ".txt")
                try:  # the timeline's summary first: is the step bound by the GPU or by the host?
                    out["profile_gpu"] = gpu_timeline(self.prof.profiler.kineto_results.events())
                except Exception as exc:  # a profiler without kineto results: the tables below still come
                    out["profile_gpu"] = {"error": repr(exc)[:200]}
                if os.environ.get("TUNELAB_BENCH_TRACE") == "1":  # the step's timeline too, gzipped (chrome trace)
                    import gzip
                    import shutil

                    self.prof.export_chrome_trace(name[:-4] + ".json")
                    with open(name[:-4] + ".json", "rb") as src, gzip.open(name[:-4] + ".json.gz", "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    os.remove(name[:-4] + ".json")
                with open(name, "w") as fh:
                    fh.write(f"GPU timeline of the step: {json.dumps(out['profile_gpu'])}\n\n")
                    fh.write(self.prof.key_averages().table(sort_by="cuda_time_total", row_limit=45))
                    fh.write("\n\nby self CUDA time\n")
                    fh.write(self.prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=45))
                    fh.write("\n\nby self CPU time (the host's share)\n")
                    fh.write(self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=45))
                self.prof = None

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                out["losses"].append(logs["loss"])
                out["grad_norms"].append(logs.get("grad_norm"))

        def on_train_begin(self, args, state, control, **kw):
            torch.cuda.reset_peak_memory_stats()
            out["static_gib"] = round(torch.cuda.memory_allocated() / 2**30, 3)  # weights, adapter: before step 1

    args = training_arguments(cfg, resolved, has_eval=False)
    args.train_sampling_strategy = "sequential"
    if stock:
        from transformers import Trainer

        trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=collator, callbacks=[Timer()])
    else:
        loss_impl = "plain" if "plainloss" in variant else select_loss(model)
        trainer = TunelabTrainer(model=model, args=args, train_dataset=train_set, data_collator=collator,
                                 callbacks=[Timer()], loss_impl=loss_impl)
    out["host_link_gb_s"] = host_link()  # before step 1 (its peaks are reset at the train's start)
    # TUNELAB_BENCH_GPU_SAMPLE=0: no nvidia-smi beside the case (the A/B of whether sampling itself costs a step)
    sampler = GpuSampler(command="" if os.environ.get("TUNELAB_BENCH_GPU_SAMPLE", "1") == "0" else "nvidia-smi")
    try:
        trainer.train()
    finally:
        gc_clock.close()
        sampler.close()
    # the GPU's clock and power over the timed steps (after the 3 warm-up steps the median is taken over)
    out["gpu"] = sampler.summary(windows[3:] if len(windows) > 3 else windows)
    if hasattr(trainer, "check_pending_losses"):
        trainer.check_pending_losses()
    if "host-embedding" in (out["fast_path"] or []):
        from tunelab.model.fast import embed

        out["host_embedding_returns"] = embed.RETURNS[0]  # > 0: something moved it back to the GPU after loading
    if any(str(a).startswith("compile(") for a in out["fast_path"] or []):
        from tunelab.model.fast.compile import compile_counters

        out["dynamo"] = compile_counters()
    graphs = getattr(model, "_tunelab_layer_graphs", None)  # set by the offload on the model the loader returns
    if graphs is not None:  # the CUDA graphs' pool (model/fast/graphs.py): replays allocate nothing, so the peaks
        out["graph_captures"] = graphs.captures  # above miss it; the result adds it to them (an upper bound)
        out["graph_pool_gib"] = round(graphs.pool_bytes() / 2**30, 3)
    del trainer, model
    return out


def host_link(mib: int = 256, reps: int = 3):
    """The host link's copy rate now, {"d2h": GB/s, "h2d": GB/s} over `reps` copies of one pinned `mib` MiB buffer
    each way (the checkpoint offload's copies ride it; runs 25-26 saw cases of one lease differ by the link's load,
    shared with the host's other GPUs), or None off CUDA. Its device buffer is freed and returned to the driver."""
    import time

    import torch

    if not torch.cuda.is_available():
        return None
    n = mib * 2**20
    device = torch.empty(n, dtype=torch.uint8, device="cuda")
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    rates = {}
    for name, dst, src in (("d2h", host, device), ("h2d", device, host)):
        dst.copy_(src, non_blocking=True)  # warm
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        rates[name] = round(reps * n / (time.perf_counter() - start) / 1e9, 1)
    del device, host
    torch.cuda.empty_cache()
    return rates


class GpuSampler:
    """The GPU's SM clock, power draw and clock-throttle reasons, sampled by `nvidia-smi -lms` in the background
    while a case runs (runs 18-20 found every timed step at the 700 W software power cap, the clock ~1,650 instead
    of 1,980 MHz: the figure a step time needs beside it). Each line is stamped with time.perf_counter() when read
    (the sampler's own clock is not used); summary(windows) gives the medians over the samples inside the timed
    steps' (start, end) windows. Without nvidia-smi (or off CUDA) it samples nothing and summary() is None."""

    SW_POWER_CAP = 0x4  # nvidia-smi's clocks_throttle_reasons.active bits
    HW_SLOWDOWN = 0x8 | 0x40 | 0x80  # hardware slowdown, hardware thermal, power brake
    SW_THERMAL = 0x20

    def __init__(self, period_ms: int = 500, command: str = "nvidia-smi"):
        import shutil
        import subprocess
        import threading

        self.samples: list[tuple[float, int, float, int]] = []  # (perf_counter, MHz, W, reasons)
        self.proc = None
        exe = shutil.which(command) if command else None  # "": sampling off
        if exe is None:
            return
        self.proc = subprocess.Popen(
            [exe, "--query-gpu=clocks.sm,power.draw,clocks_throttle_reasons.active", "--format=csv,noheader,nounits",
             "-lms", str(period_ms), "-i", os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        for line in self.proc.stdout:
            parsed = self.parse(line)
            if parsed is not None:
                self.samples.append((time.perf_counter(), *parsed))

    @staticmethod
    def parse(line: str):
        """(MHz, W, reasons) from one `clocks.sm, power.draw, clocks_throttle_reasons.active` line, or None."""
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3:
            return None
        try:
            return int(float(parts[0])), float(parts[1]), int(parts[2], 16)
        except ValueError:  # "[N/A]", a header, a message
            return None

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except Exception:
                self.proc.kill()

    def summary(self, windows) -> dict | None:
        inside = [s for s in self.samples if any(a <= s[0] <= b for a, b in windows)]
        if not inside:
            return None
        n = len(inside)
        return {"samples": n, "sm_mhz_median": int(statistics.median(s[1] for s in inside)),
                "sm_mhz_min": min(s[1] for s in inside),
                "power_w_median": round(statistics.median(s[2] for s in inside), 1),
                "power_capped_share": round(sum(bool(s[3] & self.SW_POWER_CAP) for s in inside) / n, 3),
                "thermal_or_hw_slowdown_share": round(
                    sum(bool(s[3] & (self.HW_SLOWDOWN | self.SW_THERMAL)) for s in inside) / n, 3)}


class HostClock:
    """Wall time, this thread's CPU time and the whole process's CPU time (every thread) since reset(); lap()
    returns the three deltas in seconds. The bench reads it at a step's end before waiting for the GPU: a step
    whose work was all queued (step_issue_s) well before its end (the step time) is bound by the GPU; one queued
    up to its end, by the host. Process CPU time counts spin-waits too (CUDA synchronisation spins by default
    when CPU cores outnumber the GPUs' contexts)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self._t = (time.perf_counter(), time.thread_time(), time.process_time())

    def lap(self) -> tuple[float, float, float]:
        now = (time.perf_counter(), time.thread_time(), time.process_time())
        return tuple(b - a for a, b in zip(self._t, now))


class GcClock:
    """Counts, through gc.callbacks, the time the cyclic garbage collector runs and its full (generation 2)
    collections, since the last reset(); close() unhooks it."""

    def __init__(self):
        self.reset()
        self._t = None
        gc.callbacks.append(self._cb)

    def reset(self):
        self.seconds, self.full = 0.0, 0

    def _cb(self, phase, info):
        if phase == "start":
            self._t = time.perf_counter()
        elif self._t is not None:
            self.seconds += time.perf_counter() - self._t
            self.full += info.get("generation") == 2
            self._t = None

    def close(self):
        if self._cb in gc.callbacks:
            gc.callbacks.remove(self._cb)


def run_variant(variant: str, model_dir: str, batch: int, seq: int, steps: int = 13, method: str = "qlora",
                arch: str | None = None, matmul_tflops: float = 790.0) -> dict[str, Any]:
    """One measurement. `profile` after a colon: alpaca (padded batches) or alpaca-packed (samples packed into rows)."""
    import torch

    name, _, profile = variant.partition(":")
    kind = "alpaca" if profile.startswith("alpaca") else "full"
    packed = profile == "alpaca-packed"
    # packing puts ~3.4 alpaca-like samples in a 1024-token row: draw enough samples for `steps` full batches
    n_steps = steps * max(1, int(seq / 250)) if packed else steps
    samples = synthetic_samples(kind, batch, seq, n_steps, vocab=150000)
    if name.startswith("plain-trainer") or name.startswith("tunelab"):
        run = run_tunelab(model_dir, samples, batch, name, method, pack_to=seq if packed else None, cutoff_len=seq)
    elif name.startswith("plain"):
        run = run_plain(model_dir, samples, batch, "autocast" in name, method)
    else:
        from tunelab.errors import ConfigError

        raise ConfigError(f"unknown bench variant '{name}': use tunelab-fast, tunelab-plain, tunelab, plain-autocast, plain or plain-trainer.")
    times = run.pop("times")
    peaks = [p for p in run.get("step_peaks", []) if p is not None]
    # tunelab's cases reset the peak at each step: the overall peak is the largest step's
    # the CUDA graphs' pool (model/fast/graphs.py), which the allocator's peaks do not see during replays, added
    pool = run.get("graph_pool_gib", 0.0)
    peak = max(peaks + [torch.cuda.max_memory_allocated() / 2**30]) + pool
    reserved = torch.cuda.max_memory_reserved() / 2**30
    gc.collect()
    torch.cuda.empty_cache()
    tail = times[3:] if len(times) > 3 else times
    step = statistics.median(tail)
    if kind == "full":
        tokens_per_s = round(batch * seq / step, 1)
    else:  # real (non-pad) tokens of the timed steps after warm-up, over their time
        if packed:
            from tunelab.data.collator import PackedSet
            from tunelab.data.processing import EncodedSet

            rows = PackedSet(EncodedSet([s["input_ids"] for s in samples], [s["labels"] for s in samples]), seq)
            lengths = [len(rows[i]["input_ids"]) for i in range(len(rows))]
        else:
            lengths = [len(s["input_ids"]) for s in samples]
        real_tokens = [sum(lengths[i : i + batch]) for i in range(0, len(lengths), batch)][: len(times)]
        tokens_per_s = round(sum(real_tokens[3:]) / sum(tail), 1)
    mfu = round(tokens_per_s * flops_per_token(arch, seq) / (matmul_tflops * 1e12), 4) if arch in ARCHS else None
    return {"variant": variant, "arch": arch, "method": method, "batch": batch, "seq": seq, "steps": len(times),
            "median_step_s": round(step, 4), "tokens_per_s": tokens_per_s, "peak_gib": round(peak, 2),
            "reserved_gib": round(reserved, 2),
            "steady_peak_gib": round(max(peaks[3:]) + pool, 2) if len(peaks) > 3 else None, "mfu": mfu, "matmul_tflops": matmul_tflops, "profile": profile or "full",
            "step_times": [round(t, 4) for t in times],
            "losses": [round(x, 5) for x in run.pop("losses")],
            "grad_norms": [None if x is None else round(float(x), 5) for x in run.pop("grad_norms")], **run}


def _run_isolated(variant: str, model_dir: str, batch: int, seq: int, steps: int, method: str, arch: str,
                  matmul_tflops: float) -> dict[str, Any]:
    """Each measurement in its own process: a fresh CUDA context and allocator, and no monkey-patching (Liger
    patches transformers' classes process-wide) leaking from one variant into the next."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "tunelab.bench", "--single", variant, "--model-dir", model_dir, "--arch", arch,
           "--method", method, "--shapes", f"{batch}x{seq}", "--steps", str(steps), "--matmul-tflops", str(matmul_tflops)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(out.stdout.splitlines()):
        if line.startswith('{"variant"') and '"tokens_per_s"' in line:
            return json.loads(line)
    return {"variant": variant, "arch": arch, "method": method, "batch": batch, "seq": seq, "error": (out.stderr or out.stdout)[-3000:]}


def _variants(args) -> list[str]:
    names = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else []
    names += [f"tunelab-{p.strip()}" for p in (args.path or "").split(",") if p.strip()]
    if not names:
        names = ["tunelab-fast", "tunelab-plain"]
    profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
    return [n if ":" in n or p == "full" else f"{n}:{p}" for p in profiles for n in names]


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="tunelab bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="qwen2.5-7b", choices=sorted(ARCHS))
    p.add_argument("--method", default="qlora", choices=["qlora", "lora"], help="qlora: NF4 4-bit base; lora: bf16 base")
    p.add_argument("--path", default=None, help="comma list of fast,plain: tunelab with use_fast_kernels true / false")
    p.add_argument("--model-dir", default=None, help="where the random-init model is saved (default /tmp/tunelab-bench-<arch>)")
    p.add_argument("--shapes", default="4x1024", help="comma list of BATCHxSEQ")
    p.add_argument("--variants", default=None, help="comma list (see above); default tunelab-fast,tunelab-plain")
    p.add_argument("--profiles", default="full", help="comma list of full, alpaca, alpaca-packed")
    p.add_argument("--steps", type=int, default=13)
    p.add_argument("--repeat", type=int, default=1, help="measure the variant list this many times, alternating")
    p.add_argument("--matmul-tflops", type=float, default=790.0, help="the bf16 matmul rate MFU is stated against (H200/H100 measured: 790)")
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)  # internal: one measurement in this process
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    import torch

    from tunelab.errors import TunelabError

    if not torch.cuda.is_available():
        raise TunelabError("tunelab bench measures GPU training speed and needs a CUDA GPU; none is visible here.")
    model_dir = args.model_dir or f"/tmp/tunelab-bench-{args.arch}"
    if args.single:
        batch, seq = (int(x) for x in args.shapes.lower().split("x"))
        print(json.dumps(run_variant(args.single, model_dir, batch, seq, args.steps, args.method, args.arch, args.matmul_tflops)), flush=True)
        return 0
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        import subprocess
        import sys

        subprocess.run([sys.executable, "-c", f"from tunelab.bench import build_random_model; build_random_model({args.arch!r}, {model_dir!r})"], check=True)
    results = []
    for shape in args.shapes.split(","):
        batch, seq = (int(x) for x in shape.lower().split("x"))
        for _ in range(args.repeat):
            for variant in _variants(args):
                r = _run_isolated(variant, model_dir, batch, seq, args.steps, args.method, args.arch, args.matmul_tflops)
                results.append(r)
                print(json.dumps(r), flush=True)
    print(f"\n{args.arch} {args.method}\n{'variant':<30}{'shape':>10}{'tokens/s':>10}{'peak GiB':>9}{'rsv GiB':>8}{'step s':>8}{'MFU':>6}")
    for r in results:
        shape = f"{r['batch']}x{r['seq']}"
        if "error" in r:
            print(f"{r['variant']:<30}{shape:>10}  failed: {r['error'].strip().splitlines()[-1][:80] if r['error'].strip() else '?'}")
            continue
        print(f"{r['variant']:<30}{shape:>10}{r['tokens_per_s']:>10,.0f}{r['peak_gib']:>9.2f}{r['reserved_gib']:>8.2f}"
              f"{r['median_step_s']:>8.3f}{(r['mfu'] or 0):>6.1%}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(__import__("sys").argv[1:]))
