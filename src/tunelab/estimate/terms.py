"""The terms of the memory model: each a small function of the model shape and the settings, in bytes.

Notation in the formulas: H hidden, I intermediate, Q = heads x head_dim, KV = kv_heads x head_dim, L layers,
V vocab, r LoRA rank, B batch, T tokens per row (cutoff_len), N = B x T tokens, b = bytes of the compute dtype
(2 for bf16/fp16). Every tensor is counted as the CUDA caching allocator counts it (sizes rounded up to 512 B).

Where each term comes from is the code that runs: transformers' Qwen2/Llama modules, PEFT's LoRA layers,
bitsandbytes' Linear4bit / Linear8bitLt storage, torch's AdamW, and tunelab's fused loss
(tunelab.model.kernels). docs/estimate.md walks through the arithmetic and the measured check.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from tunelab.estimate.archs import ModelShape

GiB = 2**30
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def r512(n: float) -> int:
    """Bytes the caching allocator hands out for a request of n bytes (multiples of 512)."""
    return int(math.ceil(max(n, 1) / 512) * 512)


@dataclass(frozen=True)
class Linear:
    name: str
    fan_in: int
    fan_out: int
    bias: bool


def layer_linears(s: ModelShape) -> list[Linear]:
    """The seven projections of one decoder layer: q [H->Q], k, v [H->KV], o [Q->H], gate, up [H->I], down [I->H]."""
    return [
        Linear("q_proj", s.hidden, s.q_dim, s.qkv_bias), Linear("k_proj", s.hidden, s.kv_dim, s.qkv_bias),
        Linear("v_proj", s.hidden, s.kv_dim, s.qkv_bias), Linear("o_proj", s.q_dim, s.hidden, False),
        Linear("gate_proj", s.hidden, s.intermediate, False), Linear("up_proj", s.hidden, s.intermediate, False),
        Linear("down_proj", s.intermediate, s.hidden, False),
    ]


def total_params(s: ModelShape) -> int:
    """All parameters: L x (projections + biases + 2 norms [+ q/k norms]) + final norm + embeddings (+ head if untied)."""
    per_layer = sum(l.fan_in * l.fan_out + (l.fan_out if l.bias else 0) for l in layer_linears(s)) + 2 * s.hidden
    per_layer += 2 * s.head_dim if s.qk_norm else 0
    return s.layers * per_layer + s.hidden + s.vocab * s.hidden * (1 if s.tied else 2)


# ---------------------------------------------------------------- weights


def nf4_bytes(n: int, double_quant: bool = True, blocksize: int = 64) -> dict[str, int]:
    """bitsandbytes 4-bit storage of one weight of n elements, tensor by tensor (as Params4bit keeps it):

    codes  ceil(n/2) bytes (two 4-bit codes per byte, in a uint8 or quant_storage tensor)
    absmax fp32 per 64-element block: 4 x ceil(n/64)                               (no double quantization)
           or uint8 per block, ceil(n/64), plus absmax2 fp32 per 256 blocks: 4 x ceil(ceil(n/64)/256),
           plus the offset (fp32 scalar)                                          (double quantization)
    code   the 16-entry NF4/FP4 table, fp32 (64 B), one per weight
    (the 256-entry fp32 table of the second quantization is one tensor shared by every layer)
    """
    blocks = math.ceil(n / blocksize)
    out = {"codes": math.ceil(n / 2), "code": 64}
    if double_quant:
        out.update(absmax=blocks, absmax2=4 * math.ceil(blocks / 256), offset=4)
    else:
        out["absmax"] = 4 * blocks
    return out


def int8_bytes(rows: int, cols: int) -> dict[str, int]:
    """LLM.int8 (Linear8bitLt, frozen): int8 weight rows x cols, plus SCB, the fp32 absmax of each row (4 x rows)."""
    return {"codes": rows * cols, "SCB": 4 * rows}


def quantized_linear_bytes(s: ModelShape, bits: int | None, double_quant: bool, b: int) -> int:
    """The L x 7 projection weights (+ their biases, kept in 16-bit) as stored: 16-bit b x n, NF4, or int8."""
    total = 0
    for lin in layer_linears(s):
        n = lin.fan_in * lin.fan_out
        if bits == 4:
            w = sum(r512(v) for v in nf4_bytes(n, double_quant).values())
        elif bits == 8:
            w = sum(r512(v) for v in int8_bytes(lin.fan_out, lin.fan_in).values())
        else:
            w = r512(b * n)
        total += w + (r512(b * lin.fan_out) if lin.bias else 0)
    shared = r512(1024) if bits == 4 and double_quant else 0
    return s.layers * total + shared


def sixteen_bit_rest(s: ModelShape, b: int) -> dict[str, int]:
    """What bitsandbytes leaves in the compute dtype: embeddings b x V x H, the head (untied) b x V x H, the norms
    b x H each (2 per layer + final; Qwen3 adds q/k norms of head_dim)."""
    norms = s.layers * (2 * r512(b * s.hidden) + (2 * r512(b * s.head_dim) if s.qk_norm else 0)) + r512(b * s.hidden)
    return {"embeddings": r512(b * s.vocab * s.hidden), "head": 0 if s.tied else r512(b * s.vocab * s.hidden), "norms": norms}


def lora_params(s: ModelShape, rank: int, targets: tuple[str, ...]) -> int:
    """LoRA parameters: r x (fan_in + fan_out) per targeted projection, x L (A is r x in, B is out x r)."""
    return s.layers * sum(rank * (l.fan_in + l.fan_out) for l in layer_linears(s) if l.name in targets)


def lora_param_bytes(s: ModelShape, rank: int, targets: tuple[str, ...]) -> int:
    """Trainable LoRA weights in fp32 (tunelab and LLaMA-Factory upcast them; PEFT does too): 4 B each, per tensor."""
    return s.layers * sum(r512(4 * rank * l.fan_in) + r512(4 * rank * l.fan_out) for l in layer_linears(s) if l.name in targets)


# ---------------------------------------------------------------- optimizer


OPTIM_STATE = {  # bytes of state per trainable parameter
    "adamw_torch": 8.0, "adamw_torch_fused": 8.0, "paged_adamw_32bit": 8.0,
    "adamw_8bit": 2.0 + 8 / 256, "adamw_bnb_8bit": 2.0 + 8 / 256, "paged_adamw_8bit": 2.0 + 8 / 256,
    "sgd": 0.0, "adafactor": None,
}


def optimizer_state_bytes(optim: str, trainable: int, matrices: list[tuple[int, int]]) -> int:
    """AdamW keeps exp_avg and exp_avg_sq in fp32: 8 B per trainable parameter. bitsandbytes' 8-bit AdamW keeps
    both as uint8 with an fp32 absmax per 256-element block: 2 + 8/256 B. SGD (momentum 0): none. Adafactor:
    factored second moment, 4 x (rows + cols) per matrix. Paged variants hold the same bytes in CUDA managed
    memory (outside torch's allocator: they count in nvidia-smi, not in max_memory_allocated)."""
    per = OPTIM_STATE.get(optim)
    if optim == "adafactor":
        return sum(4 * (a + c) for a, c in matrices)
    if per is None:
        per = 8.0
    return int(per * trainable)


def optimizer_step_temp(optim: str, trainable: int) -> int:
    """Temporaries of one optimizer step: torch's foreach AdamW (adamw_torch) builds sqrt(exp_avg_sq) for every
    parameter (4 B each); the fused and bitsandbytes kernels update in place."""
    return 4 * trainable if optim == "adamw_torch" else 0


# ---------------------------------------------------------------- activations (bytes per token unless noted)


@dataclass(frozen=True)
class Kernels:
    liger: bool  # Liger RMSNorm / RoPE / SwiGLU (tunelab's path on CUDA when liger-kernel is installed)
    attn: str  # sdpa | fa2 | eager
    gqa_repeat: bool  # sdpa with an explicit mask repeats k, v to all heads (no enable_gqa)


def norm_saved(s: ModelShape, k: Kernels, b: int) -> int:
    """One RMSNorm, per token, for its own backward: transformers' Qwen2RMSNorm upcasts to fp32 and keeps that copy
    (4H) and its fp32 rstd (4); Liger's keeps its input (bH: new only for the second norm, whose input is the
    residual sum; the first one's is the layer input) and rstd. The b-byte output is kept by the consumers
    (LoRA's A, a trainable weight) and counted there."""
    return 4 if k.liger else 4 * s.hidden + 4


def attention_saved(s: ModelShape, k: Kernels, b: int, seq: int, o_in: bool) -> int:
    """Attention of one layer, per token: q after RoPE (bQ), k and v (2 b KV; 2 b Q when an explicit mask makes SDPA
    repeat them to all heads), the attention output (bQ; SDPA writes it token-major, so o_proj's input is the same
    storage), the fp32 log-sum-exp per head (4 heads). Eager attention keeps instead q, k and v repeated to all
    heads (3 b Q), the fp32 softmax and its b-byte copy ((4 + b) x heads x T), and o_proj's input is a transposed
    copy of the output (bQ when o_proj has LoRA). Qwen3's per-head q/k norms keep their fp32 input copies
    (4 (Q + KV); Liger's keep the b-byte input, b (Q + KV)) and an fp32 rstd per head (4 (heads + kv_heads))."""
    if k.attn == "eager":
        out = 3 * b * s.q_dim + (4 + b) * s.heads * seq + (b * s.q_dim if o_in else 0)
    else:
        out = 2 * b * s.q_dim + 2 * b * (s.q_dim if k.gqa_repeat else s.kv_dim) + 4 * s.heads
    if s.qk_norm:
        out += (b if k.liger else 4) * (s.q_dim + s.kv_dim) + 4 * (s.heads + s.kv_heads)
    return out


def mlp_saved(s: ModelShape, k: Kernels, b: int, down_in: bool) -> int:
    """Gated MLP, per token: gate and up (2 b I), transformers' SiLU output too (b I; Liger's SwiGLU recomputes it),
    and, when down_proj has LoRA, down's input gate x act (b I)."""
    return ((2 if k.liger else 3) + (1 if down_in else 0)) * b * s.intermediate


def lora_saved(s: ModelShape, rank: int, targets: tuple[str, ...], dropout: float, b: int) -> int:
    """LoRA per token: x @ A.T of each targeted projection (b r); with lora_dropout > 0 each projection also keeps
    its dropped-out input and the mask ((b + 1) x fan_in)."""
    lins = [l for l in layer_linears(s) if l.name in targets]
    out = sum(b * rank for _ in lins)
    if dropout > 0:
        out += sum((b + 1) * l.fan_in for l in lins)
    return out


def layer_saved(s: ModelShape, k: Kernels, b: int, seq: int, rank: int, targets, dropout: float) -> int:
    """Everything one decoder layer keeps for its backward, per token (its input is the checkpoint, not counted):
    2 norms + attention + MLP + LoRA; the norms' outputs when LoRA (or a trainable weight) reads them (bH each);
    Liger's second RMSNorm also keeps its input, the residual sum (bH). Checked on the CPU against the tensors
    autograd saves (torch.autograd.graph.saved_tensors_hooks) for transformers' Qwen2 layer."""
    t = set(targets)
    outputs = b * s.hidden * (bool(t & {"q_proj", "k_proj", "v_proj"}) + bool(t & {"gate_proj", "up_proj"}))
    return (2 * norm_saved(s, k, b) + outputs + (b * s.hidden if k.liger else 0)
            + attention_saved(s, k, b, seq, "o_proj" in t) + mlp_saved(s, k, b, "down_proj" in t)
            + lora_saved(s, rank, targets, dropout, b))


def layer_backward_temp(s: ModelShape, k: Kernels, b: int) -> int:
    """Gradients alive while a layer runs backward, per token: in the MLP the gradients of down's input, of up and
    of gate (3 b I; Liger writes them in place of its inputs: b I), plus the gradient flowing between layers and
    the residual's (2 b H)."""
    return (1 if k.liger else 3) * b * s.intermediate + 2 * b * s.hidden


def checkpoint_bytes(s: ModelShape, tokens: int, b: int) -> int:
    """Gradient checkpointing keeps each layer's input: L x N x H x b."""
    return s.layers * r512(b * tokens * s.hidden)


def dequant_temp(s: ModelShape, bits: int | None, b: int) -> int:
    """A quantized projection is dequantized to a dense b-byte weight for each matmul (forward and backward):
    the largest one, b x H x max(I, Q); LLM.int8 also keeps the int8 copy of the activations' outliers (ignored)."""
    if not bits:
        return 0
    return r512(b * s.hidden * max(s.intermediate, s.q_dim))


def compiled_dequant_bytes(s: ModelShape, bits: int | None, b: int) -> int:
    """The compiled decoder layer (tunelab.model.fast.compile) recomputes and backpropagates a layer in one graph, in
    which each projection's dequantized weight is made once and used by both the recompute and grad x: all of the
    layer's dense b-byte weights exist at once at its backward, sum of b x fan_in x fan_out over the quantized
    projections (7B: 0.434 GiB) where the eager path holds one at a time (dequant_temp). 16-bit base: nothing.
    Without checkpointing the compiled forward saves the same weights of every layer for grad x (inductor's
    partitioner does not recompute the opaque dequantize; tools/estimate_compiled_graph.py): L x this."""
    if not bits:
        return 0
    return sum(r512(b * l.fan_in * l.fan_out) for l in layer_linears(s))


def offload_gpu_checkpoints(s: ModelShape, tokens: int, b: int) -> int:
    """Checkpoint offload (tunelab.model.fast.offload): the layer inputs live in pinned host memory; in backward the
    GPU holds the input of the layer in backward and the prefetched input of the one before it (2 x N x H x b),
    and the layer's recomputed output, referenced through its backward (N x H x b): 3 x N x H x b in all."""
    return 3 * r512(b * tokens * s.hidden)


def plain_loss_bytes(s: ModelShape, tokens: int, b: int) -> int:
    """transformers' loss on full logits: the head gives b x N x V logits, the loss upcasts them to fp32 and
    log_softmax keeps its fp32 output; backward then holds that output, the fp32 gradient nll_loss writes and
    the fp32 gradient of log_softmax at once: 3 x 4 x N x V bytes (the largest moment; the forward's
    b + 4 + 4 is below it)."""
    return 3 * r512(4 * tokens * s.vocab)


def fused_loss_bytes(s: ModelShape, labelled: int, b: int, chunk_rows: int, one_kernel: bool = False) -> int:
    """tunelab's fused linear + cross-entropy (tunelab.model.kernels) over the labelled rows only, a chunk of
    `chunk_rows` at a time: the chunk's fp32 logits (4 V per row) and logsumexp's fp32 temporary (4 V); from the
    second chunk on, the previous chunk's b-byte probabilities are still referenced while the next chunk's
    logits are computed (b V more). With `one_kernel` (model/fast/ce_triton.py, on a GPU) the chunk is its b-byte
    logits alone, overwritten by their gradient (b V per row), and from the second chunk on the previous chunk's
    (b V more). Plus the labelled rows of the hidden states gathered (b H per row), their gradient (b H per row,
    kept until backward) and the shifted, flattened hidden states (b H per row: reshape copies them when
    batch > 1)."""
    rows = min(labelled, chunk_rows)
    if one_kernel:
        per_row = (b if labelled <= chunk_rows else 2 * b) * s.vocab
    else:
        per_row = (8 if labelled <= chunk_rows else 8 + b) * s.vocab
    return r512(per_row * rows) + 3 * r512(b * labelled * s.hidden)


def autocast_copies(trainable: int, b: int) -> int:
    """Mixed precision casts each fp32 trainable weight to b bytes once per forward and caches the copy until the
    autocast region ends (the loss is computed inside it): b bytes per trainable parameter at the loss."""
    return b * trainable if b < 4 else 0


def mask_bytes(batch: int, seq: int) -> int:
    """An explicit attention mask (padded or packed rows): B x T x T booleans, built once and shared by all layers."""
    return r512(batch * seq * seq)
