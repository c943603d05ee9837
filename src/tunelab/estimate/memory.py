"""The memory model: which tensors exist at each moment of a training step, and the largest of those moments.

    est = estimate(model_shape("Qwen/Qwen2.5-7B-Instruct"), Setup(method="qlora", batch=4, seq=1024))
    est.peak_allocated      # bytes, what torch.cuda.max_memory_allocated reports
    est.nvidia_smi          # bytes, what nvidia-smi shows for the process

A step goes through three moments that can each be the peak (the optimizer states exist in all of them from
the second step on, and the weights always):

* loss:     the forward has finished; the checkpoints (or all activations) are held and the loss is computed
            (full logits for the plain stack, one chunk for tunelab's fused loss);
* backward: the first decoder layer to run backward has been recomputed: all checkpoints, that layer's saved
            activations, its gradient temporaries and a dequantized weight (for full fine-tuning also the
            moment where every gradient exists and one checkpoint is left);
* step:     the optimizer update: gradients, states and the update's temporaries.

Two stacks: `plain` = transformers + PEFT + bitsandbytes with model(**batch).loss (the loop of the Hugging Face
Trainer, which does not keep the outputs); otherwise tunelab's path as `tunelab train` runs it (fused loss, and
the fast path's parts as fastpath.py decides them: eager layers with Liger when installed, or compiled decoder
layers (the default on one CUDA GPU), checkpoint offload and host embedding (both on by default on one process)).
The fast path's terms, each its own row:

* compiled: the recomputed layer's saved set as Liger's (inductor fuses the norms and SwiGLU and recomputes the
  pointwise ops, as Liger does), all of the layer's dequantized weights at its backward (compiled_dequant_bytes)
  instead of one; the final norm stays transformers' (outside the layers, and Liger is left out). Where the
  layer's forward is compiled without a checkpoint around it (under the offload, or with checkpointing off), the
  forward saves o_proj's output too (b H per token) and, without checkpointing, every layer's dense weights;
* offload: checkpoints in host memory: none on the GPU at the loss, 3 x N x H x b at the backward
  (offload_gpu_checkpoints); from 2,048 tokens a step (Qwen2 / Qwen3 / Llama) the split recompute keeps each layer's
  post-attention residual there too (twice the pinned host memory; its GPU side, one half of a layer's saved
  tensors at a time, measured 0.18 GiB lower at 7B, is not modelled: the estimate stays on the high side);
* host embedding: the embedding table leaves the GPU (measured: run 8).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tunelab.errors import ConfigError
from tunelab.estimate import terms as T
from tunelab.estimate.archs import ModelShape

# Calibrated on an H200 (torch 2.11, CUDA 13; docs/estimate.md, 32 cases): the caching allocator reserves more than
# it hands out (about 0.35 GiB, plus three quarters of one fp32 N x V block when the plain stack's logits fragment
# it), and the process holds the CUDA context, cuBLAS workspaces and loaded kernels outside it (0.74 GiB after a
# training step, read as nvidia-smi's per-process figure minus torch's reserved memory).
RESERVED_FIXED = 0.35 * T.GiB
RESERVED_LOGITS = 0.75
# The checkpoint offload reserves more (its prefetches allocate on a side stream, whose freed blocks stay in that
# stream's pool): reserved - allocated was 0.50-0.91 GiB on its four measured points (runs 5 and 8) against 0.21-0.61
# without it; 0.33 GiB more is the mean of the four's excess over RESERVED_FIXED (calibrated, not derived).
RESERVED_OFFLOAD = 0.33 * T.GiB
CUDA_CONTEXT = 0.74 * T.GiB


@dataclass(frozen=True)
class Setup:
    method: str = "qlora"  # full | freeze | lora | qlora
    bits: int | None = 4  # 4 | 8 | None (16-bit base)
    rank: int = 8
    targets: tuple[str, ...] = T.LORA_TARGETS
    dropout: float = 0.0
    batch: int = 4
    seq: int = 1024
    grad_ckpt: bool = True
    optim: str = "adamw_torch"
    attn: str = "sdpa"
    plain: bool = False
    liger: bool = False
    double_quant: bool = True
    compute_bytes: int = 2
    mask: bool = False  # an explicit attention mask: padded batches or packed rows
    labelled_fraction: float = 1.0  # share of positions with a trained label (the fused loss runs only on those)
    freeze_layers: int = 2
    extra_trainable: tuple[str, ...] = ()  # additional_target: modules PEFT trains as full fp32 copies (embed_tokens, lm_head)
    compiled: bool = False  # the fast path's compiled decoder layers (fastpath.py decides; Liger is then left out)
    offload: bool = False  # checkpoint offload to host memory (the default on one process; needs checkpointing)
    host_embedding: bool = False  # input embedding in pinned host memory (model.fast.embed), for a 4-bit base
    host_embedding_with_offload: bool = False  # on only where the offload is installed (the trainer's default)

    def host_embedding_on(self) -> bool:
        """The host embedding as installed: a 4-bit base only, and where it follows the offload, only with the
        offload (and checkpoints)."""
        four_bit = self.method == "qlora" and (self.bits or 4) == 4
        return self.host_embedding and four_bit and (not self.host_embedding_with_offload or (self.offload and self.grad_ckpt))

    def check(self, shape: ModelShape) -> None:
        """Impossible settings as sentences."""
        if self.method not in ("full", "freeze", "lora", "qlora"):
            raise ConfigError(f"method '{self.method}' is not one of full, freeze, lora, qlora.")
        if self.batch < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch}.")
        if self.seq < 2:
            raise ConfigError(f"cutoff_len must be at least 2 tokens, got {self.seq}.")
        if self.bits not in (None, 4, 8):
            raise ConfigError(f"bits must be 4 or 8 (bitsandbytes), got {self.bits}.")
        if self.bits and self.method in ("full", "freeze"):
            raise ConfigError(f"{self.bits}-bit weights cannot be trained directly: {self.method} fine-tuning needs a 16-bit "
                              "base. Use --method qlora (LoRA on the quantized base) or drop --bits.")
        if self.method in ("lora", "qlora") and self.rank < 1:
            raise ConfigError(f"LoRA rank must be at least 1, got {self.rank}.")
        if shape.max_positions and self.seq > shape.max_positions and not shape.rope_scaling:
            raise ConfigError(f"cutoff_len {self.seq} is beyond {shape.name}'s context of {shape.max_positions} tokens "
                              "(max_position_embeddings) and the config sets no rope_scaling; lower cutoff_len or set rope_scaling.")
        odd = [m for m in self.extra_trainable if m not in ("embed_tokens", "lm_head")]
        if odd:
            raise ConfigError(f"additional_target '{odd[0]}' is not modelled by the estimate; it knows embed_tokens and lm_head.")
        unknown = [t for t in self.targets if t not in T.LORA_TARGETS]
        if unknown:
            raise ConfigError(f"LoRA target '{unknown[0]}' is not a projection of this decoder; use all or names among {', '.join(T.LORA_TARGETS)}.")


@dataclass
class Row:
    key: str
    label: str
    bytes: int
    note: str = ""


@dataclass
class Estimate:
    shape: ModelShape
    setup: Setup
    rows: list[Row]
    phase: str
    phases: dict[str, int]
    peak_allocated: int
    peak_reserved: int
    nvidia_smi: int
    trainable: int
    warnings: list[str] = field(default_factory=list)
    plan: Any = None  # the fast path's decisions (fastpath.FastPathPlan) when the caller made them
    host_pinned: int = 0  # pinned host memory of the fast path: offloaded checkpoints and the embedding table

    def row(self, key: str) -> int:
        return sum(r.bytes for r in self.rows if r.key == key)

    def to_json(self) -> dict[str, Any]:
        g = lambda n: round(n / T.GiB, 3)  # noqa: E731
        return {
            "peak_allocated_gib": g(self.peak_allocated), "nvidia_smi_gib": g(self.nvidia_smi),
            "peak_reserved_gib": g(self.peak_reserved), "peak_phase": self.phase, "host_pinned_gib": g(self.host_pinned),
            "model": self.shape.name, "model_source": self.shape.source, "trainable_params": self.trainable,
            "settings": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.setup).items()},
                         "host_embedding": self.setup.host_embedding_on()},
            "breakdown": [{"key": r.key, "what": r.label, "gib": g(r.bytes), "bytes": r.bytes, "note": r.note} for r in self.rows],
            "phases_gib": {k: g(v) for k, v in self.phases.items()}, "warnings": self.warnings,
            "fast_path": self.plan.to_json() if self.plan is not None else None,
        }


def _kernels(u: Setup, layer: bool = True) -> T.Kernels:
    """The decoder layers' kernels (layer=True: compiled layers save Liger's set) or the final norm's (outside the
    layers: Liger's only when Liger is applied)."""
    liger = (u.liger or (layer and u.compiled)) and not u.plain
    return T.Kernels(liger=liger, attn=u.attn, gqa_repeat=u.mask and u.attn == "sdpa")


def trainable_params(shape: ModelShape, u: Setup) -> tuple[int, list[tuple[int, int]]]:
    """(trainable parameter count, their matrix shapes): LoRA A/B of the targets, the last n layers (freeze),
    or everything (full)."""
    lins = T.layer_linears(shape)
    if u.method in ("lora", "qlora"):
        mats = [(u.rank, l.fan_in) for l in lins if l.name in u.targets] + [(l.fan_out, u.rank) for l in lins if l.name in u.targets]
        extra = [(shape.vocab, shape.hidden)] * len(u.extra_trainable)
        return T.lora_params(shape, u.rank, u.targets) + shape.vocab * shape.hidden * len(u.extra_trainable), mats * shape.layers + extra
    per_layer = sum(l.fan_in * l.fan_out + (l.fan_out if l.bias else 0) for l in lins) + 2 * shape.hidden
    mats = [(l.fan_out, l.fan_in) for l in lins]
    if u.method == "freeze":
        n = min(abs(u.freeze_layers), shape.layers)
        return n * per_layer, mats * n
    return T.total_params(shape), mats * shape.layers + [(shape.vocab, shape.hidden)] * (1 if shape.tied else 2)


def weight_rows(shape: ModelShape, u: Setup, trainable: int) -> list[Row]:
    b = u.compute_bytes
    rest = T.sixteen_bit_rest(shape, b)
    bits = u.bits if u.method == "qlora" or (u.method == "lora" and u.bits) else None
    what = {4: "NF4 codes + absmax" + (" (double-quantized) + absmax2 + offset" if u.double_quant else " (fp32)"),
            8: "LLM.int8: int8 weights + fp32 row scales (SCB)", None: f"{8 * b}-bit"}[bits]
    rows = [Row("base_weights", f"base weights: {shape.layers} x 7 projections", T.quantized_linear_bytes(shape, bits, u.double_quant, b), what),
            Row("weights_16bit", "embeddings, output head, norms (16-bit)", rest["embeddings"] + rest["head"] + rest["norms"],
                "tied head = embeddings" if shape.tied else "head untied: its own V x H")]
    if u.host_embedding_on() and not u.plain and not shape.tied:  # the table lives in pinned host memory (model.fast.embed)
        rows[-1] = Row("weights_16bit", "output head, norms (16-bit; embeddings on the host)", rest["head"] + rest["norms"],
                       "head untied: its own V x H")
        rows.append(Row("host_embedding", "input embedding: in pinned host memory", 0,
                        f"{rest['embeddings'] / T.GiB:.2f} GiB off the GPU; the step's rows are copied in"))
    if u.method in ("full", "freeze"):  # trainable weights are upcast to fp32 master copies (tunelab, LLaMA-Factory)
        rows.append(Row("master_weights", "fp32 copies of the trainable weights (beyond 16-bit)", 2 * trainable, "4 B instead of 2 per trainable parameter"))
    else:
        extra = len(u.extra_trainable) * T.r512(4 * shape.vocab * shape.hidden)
        rows.append(Row("adapter", f"LoRA adapter r={u.rank}" + (" + " + ", ".join(u.extra_trainable) if u.extra_trainable else "")
                        + f" ({trainable:,} params, fp32)", T.lora_param_bytes(shape, u.rank, u.targets) + extra, "4 B per parameter"))
    return rows


def activation_moments(shape: ModelShape, u: Setup, trainable: int) -> dict[str, list[Row]]:
    """The transient rows of each candidate peak moment (weights and optimizer states are added to all)."""
    b, k = u.compute_bytes, _kernels(u)
    n = u.batch * u.seq
    labelled = max(1, int(u.batch * (u.seq - 1) * u.labelled_fraction))
    lora = u.method in ("lora", "qlora")  # full / freeze: every projection's weight is trainable, so keeps its input
    saved = T.layer_saved(shape, k, b, u.seq, u.rank if lora else 0, u.targets if lora else T.LORA_TARGETS, u.dropout if lora else 0.0)
    offload = u.offload and u.grad_ckpt and not u.plain
    # compile_decision keeps the layers eager without checkpointing (a compiled layer forward would save all 7
    # dequantized weights of every layer: the CPU graphs, docs/estimate.md), as the offload needs checkpoints
    compiled = u.compiled and not u.plain and u.grad_ckpt
    forward_compiled = compiled and offload
    if forward_compiled:  # the partitioner's saved set of a compiled layer forward: o_proj's output too (CPU graphs)
        saved += b * shape.hidden
    if offload:
        held = Row("activations", f"activations: {shape.layers} checkpoints in host memory", 0,
                   f"{T.checkpoint_bytes(shape, n, b) / T.GiB:.2f} GiB pinned host memory")
    elif u.grad_ckpt:
        held = Row("activations", f"activations: checkpoints ({shape.layers} layer inputs)", T.checkpoint_bytes(shape, n, b),
                   f"L x N x H x {b} B")
    else:
        held = Row("activations", f"activations: all {shape.layers} layers (no checkpointing)",
                   shape.layers * T.r512((saved + b * shape.hidden) * n), f"{saved + b * shape.hidden:,} B per token per layer")
    common = [held]
    qbits = u.bits if u.method == "qlora" else None
    if u.mask:
        common.append(Row("mask", "attention mask (B x T x T)", T.mask_bytes(u.batch, u.seq)))
    final = T.r512((T.norm_saved(shape, _kernels(u, layer=False), b) + 2 * b * shape.hidden) * n)  # final norm, its output and input
    if u.plain:
        loss = Row("logits", "logits and loss (full vocab x tokens)", T.plain_loss_bytes(shape, n, b), "3 x fp32 N x V in the loss backward")
    else:
        from tunelab.model.fast import ce_triton  # torch-free, as the fused loss's own chunking
        from tunelab.model.kernels import _chunk_rows

        # on a GPU the loss and its gradient are one Triton kernel over the b-byte logits (no fp32 block)
        one_kernel = ce_triton.switched_on()
        rows = _chunk_rows(shape.vocab, element_bytes=b if one_kernel else 4)
        loss = Row("logits", f"fused loss: one chunk of {min(rows, labelled)} rows",
                   T.fused_loss_bytes(shape, labelled, b, rows, one_kernel=one_kernel),
                   "tunelab.model.kernels, labelled rows only" + ("; loss kernel" if one_kernel else ""))
    casts = Row("temporaries", "final norm, hidden states, autocast weight copies", final + T.autocast_copies(trainable, b))
    moments = {"loss": common + [loss, casts]}
    recompute = T.r512(saved * n) if u.grad_ckpt else 0
    temp = T.r512(T.layer_backward_temp(shape, k, b) * n)
    # the offload's recompute keeps its dense weights for the backward (tunelab.model.fast.lora.keep_dense, eager or
    # compiled; opt-in with TUNELAB_KEEP_DENSE=1), as a compiled checkpointed layer does
    kept = offload and __import__("os").environ.get("TUNELAB_KEEP_DENSE", "0") == "1"
    if compiled or kept:
        dequant = Row("dequant", f"dequantized weights: all 7 of a layer ({'compiled' if compiled else 'offload'})",
                      T.compiled_dequant_bytes(shape, qbits, b),
                      "kept from the recompute to grad x" + (" (saved by the compiled forward)" if forward_compiled else ""))
    else:
        dequant = Row("dequant", "dequantized weight: the largest, one at a time", T.dequant_temp(shape, qbits, b))
    grads_one_layer = trainable // shape.layers if u.method in ("lora", "qlora") else 0
    backward_common = common
    if offload:
        backward_common = [Row("activations", "activations: 2 checkpoints + 1 layer output (offload)",
                               T.offload_gpu_checkpoints(shape, n, b), f"on the GPU; the other {shape.layers - 2} checkpoints in host memory")] + common[1:]
    what = "compiled" if compiled else "recomputed"
    moments["backward"] = backward_common + [
        Row("recompute", f"activations: the layer in backward ({what})" if u.grad_ckpt else "activations: layer gradients",
            recompute, f"{saved:,} B per token" + (" (Liger's set + o_proj's output: a compiled forward's)" if forward_compiled else
                                                   " (Liger's saved set: inductor fuses the same)" if compiled else "")),
        Row("temporaries", "gradient temporaries", temp), dequant,
        Row("grads", "gradients (fp32), so far", 4 * grads_one_layer)]
    on_gpu, on_host = _kept_gate_up(shape, u)
    if on_gpu:  # split.keep_plan (opt-in): the last layers' outputs stay on the GPU through the loss; in backward
        # those, and where some are in host memory the next one arriving (HostStash's big slots)
        one = T.r512(n * 2 * shape.intermediate * b)
        moments["loss"].append(Row("kept", f"kept gate/up outputs of the last {on_gpu} layer(s) (TUNELAB_KEEP_GATE_UP)",
                                   on_gpu * one, f"{on_gpu} x N x 2I"))
        held = on_gpu + (1 if on_host else 0)
        moments["backward"].append(Row("kept", "kept gate/up outputs: those on the GPU" +
                                       (" and the next arriving" if on_host else "") + " (TUNELAB_KEEP_GATE_UP)",
                                       held * one, f"{held} x N x 2I"))
    if u.method in ("full", "freeze"):
        last = [Row("activations", "activations: one checkpoint left", T.r512(b * n * shape.hidden)),
                Row("recompute", "activations: first layer recomputed", recompute), Row("temporaries", "gradient temporaries", temp), dequant,
                Row("grads", "gradients (fp32), all", 4 * trainable)]
        moments["backward_end"] = last
    moments["step"] = [Row("grads", "gradients (fp32)", 4 * trainable),
                       Row("temporaries", "optimizer step temporaries", T.optimizer_step_temp(u.optim, trainable))]
    if compiled and offload and _graphs(shape, n):  # model.fast.graphs: the recompute and backward replay as CUDA
        # graphs whose intermediates live in one pool reserved for the whole run (every layer's graphs share it and
        # replay one at a time): the backward's transients become one row held at every moment
        pooled = [r for r in moments["backward"] if r.key in ("recompute", "temporaries", "dequant")]
        pool = Row("graphs", "CUDA graphs' pool: the layer's recompute and backward (layer graphs)",
                   sum(r.bytes for r in pooled), "reserved for the graphs at every moment; TUNELAB_LAYER_GRAPHS=0: off")
        moments["backward"] = [r for r in moments["backward"] if r not in pooled] + [pool]
        moments["loss"].append(pool)
        moments["step"].append(pool)
    return moments


def _kept_gate_up(shape: ModelShape, u: Setup) -> tuple[int, int]:
    """How many layers keep gate/up's output for the backward on the GPU and in host memory (model.fast.split.keep_plan:
    TUNELAB_KEEP_GATE_UP and TUNELAB_KEEP_GATE_UP_ON_GPU, opt-in): split layers of a 4-bit QLoRA under the offload,
    whose gate and up are one grouped pair."""
    from tunelab.model.fast import split

    if not (u.offload and u.grad_ckpt and not u.plain and u.method == "qlora" and u.bits == 4
            and _splits(shape, u.batch * u.seq)):
        return 0, 0
    plan = split.keep_plan(shape.layers, split.keep_every(), split.keep_on_gpu())
    on_gpu = sum(1 for where in plan.values() if where == "device")
    return on_gpu, len(plan) - on_gpu


def _splits(shape: ModelShape, tokens: int) -> bool:
    """Whether the offload's split recompute applies, as model.fast.split decides it (its switch and threshold from
    the environment: no torch is imported) for the families whose layers it covers."""
    from tunelab.model.fast import ARCHITECTURES, split

    return split.enabled() and shape.family in ARCHITECTURES and tokens >= split.min_tokens()


def _graphs(shape: ModelShape, tokens: int) -> bool:
    """Whether the offload's layer graphs apply, as model.fast.offload decides it: on (model.fast.graphs's switch),
    for the full recompute's calls under the split recompute's threshold and the split's under
    graphs.split_max_tokens() (graphs.split_enabled), for the families the fast path covers."""
    from tunelab.model.fast import ARCHITECTURES, graphs, split

    if not graphs.enabled() or shape.family not in ARCHITECTURES:
        return False
    if tokens < split.min_tokens():
        return True
    return split.enabled() and graphs.split_enabled() and tokens < graphs.split_max_tokens()


def estimate(shape: ModelShape, u: Setup, plan: Any = None) -> Estimate:
    """The breakdown at the peak moment, the peak allocated, reserved and nvidia-smi figures."""
    u.check(shape)
    if u.method == "qlora" and not u.bits:
        u = replace(u, bits=4)
    if u.method in ("full", "freeze"):
        u = replace(u, bits=None)
    trainable, matrices = trainable_params(shape, u)
    static = weight_rows(shape, u, trainable)
    state = T.optimizer_state_bytes(u.optim, trainable, matrices)
    paged = u.optim.startswith("paged_")
    opt_row = Row("optimizer", f"optimizer states ({u.optim})", 0 if paged else state,
                  "paged: in CUDA managed memory, outside torch's allocator" if paged else
                  f"{T.OPTIM_STATE.get(u.optim) or 'factored'} B per trainable parameter")
    static.append(opt_row)
    moments = activation_moments(shape, u, trainable)
    base = sum(r.bytes for r in static)
    phases = {name: base + sum(r.bytes for r in rows) for name, rows in moments.items()}
    phase = max(phases, key=phases.get)
    peak = phases[phase]
    reserved = peak + int(RESERVED_FIXED) + (int(RESERVED_LOGITS * 4 * u.batch * u.seq * shape.vocab) if u.plain else 0)
    if u.offload and u.grad_ckpt and not u.plain:
        reserved += int(RESERVED_OFFLOAD)
    # the layer graphs' warm-up (the signature's first sighting) runs on the capture stream, whose freed blocks the
    # caching allocator keeps apart from the default stream's: about one more pool's worth held reserved
    reserved += sum(r.bytes for r in moments["step"] if r.key == "graphs")
    smi = reserved + int(CUDA_CONTEXT) + (state if paged else 0)
    warnings = [shape.warning] if shape.warning else []
    b, n = u.compute_bytes, u.batch * u.seq
    host = (T.checkpoint_bytes(shape, n, b) if u.offload and u.grad_ckpt and not u.plain else 0)
    if host and _splits(shape, n):
        host *= 2  # the split recompute (model.fast.split) also keeps each layer's h2, the same size, on the host
        host += _kept_gate_up(shape, u)[1] * n * 2 * shape.intermediate * b  # the kept gate/up outputs off the GPU
    host += T.sixteen_bit_rest(shape, b)["embeddings"] if u.host_embedding_on() and not u.plain and not shape.tied else 0
    return Estimate(shape, u, static + moments[phase], phase, phases, peak, reserved, smi, trainable, warnings, plan, host)
