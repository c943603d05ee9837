"""Selective recomputation for the checkpoint offload: the backward recomputes a decoder layer without its o and
down products.

    split_plan(layer)                     # False where the layer is not one this covers (full recompute then)
    out, h2 = first_pass(layer, kwargs, x)  # the layer's forward, also returning h2 (the residual after attention)
    grad_x = split_backward(layer, get_x, h2, grad_out, autocast, run_attn, run_mlp)   # (offload.py calls these)

Checkpointing recomputes a layer's whole forward before its backward. Two of the seven products are not needed
again: the backward of `y = x W^T + s (x A^T) B^T` needs x (for the LoRA gradients) and W, never y. The o product
only feeds the residual h2 = x + o(attn(x)) and the down product only the layer output out = h2 + down(act(h2)),
so with h2 kept beside the layer input (in host memory, as offload.py keeps the input), the recompute stops at o's
input and at down's input, and the two backwards run from those (lora.lora_backward):

    MLP half:        act = silu(gate(n2)) * up(n2), n2 = norm2(h2)    recomputed, down's output skipped
                     grad act = down backward (grad out)               LoRA gradients of down accumulated
                     autograd through act                              -> grad h2 (+ grad out: the residual)
    attention half:  o_in = attention(norm1(x))                        recomputed, o's output skipped
                     grad o_in = o backward (grad h2)                  LoRA gradients of o accumulated
                     autograd through o_in                             -> grad x (+ grad h2: the residual)

At Qwen2.5-7B that is 161.5 MFLOP of the layer's 466 a token (35% of the recompute, 11% of the step's
41.7 GFLOP) and two of seven dequantizes fewer, for one more [tokens, hidden] tensor a layer on the host (the
same size as the input the offload keeps; PCIe in both directions, overlapped with compute).

The two halves run the model's own modules (attention, norms, MLP) with o and down set to pass their input through
(their `_tunelab_skip`, read by the patched forward): only the residual wiring of the decoder layer is written
here, for the layer classes whose forward is exactly `h2 = x + attn(norm1(x)); out = h2 + mlp(norm2(h2))` (Qwen2,
Qwen3 dense, Llama: tests/test_fast_split.py checks `first_pass` against each class's forward). Anything else (other
layers, hooks on the layer, o or down not patched or outside the fused case) keeps the full recompute, as do
batches under MIN_TOKENS tokens (below). TUNELAB_SPLIT_RECOMPUTE=0 turns it off.
"""
from __future__ import annotations

import os

LAYERS = ("Qwen2DecoderLayer", "Qwen3DecoderLayer", "LlamaDecoderLayer")


def enabled() -> bool:
    return os.environ.get("TUNELAB_SPLIT_RECOMPUTE", "1") != "0"


# Below this many tokens a step (rows x length) the split costs more than it saves: its backward makes three
# compiled calls a layer instead of two, two autograd passes instead of one and the two projection backwards eager
# (~3 ms of host time a layer on the H200's host), while the GPU time it saves scales with the tokens (~0.25 ms a
# layer at 1,024). Measured (runs 12-13, Qwen2.5-7B QLoRA, docs/fastpath.md): 1 x 1024 3,276 tok/s with it against
# 4,476 without (one lease); 4 x 1024 12,334 against 10,828 (one lease); packed alpaca-like rows (4 rows of up to
# 1,024 tokens, ~4,000 a step) 8,765 real tok/s with a threshold of 4,096 (steps alternating between the two forms)
# and 11,126 with 2,048 (same lease). 2,048 is between the measured loss at 1,024 and the gains from ~4,000; sizes
# between were not measured.
MIN_TOKENS = 2048


def _whole(name: str, default: int, expected: str) -> int:
    """The environment's whole number `name` (>= 0), `default` when unset; anything else is a ConfigError saying
    what was expected."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    if not raw.strip().isdigit():
        from tunelab.errors import ConfigError

        raise ConfigError(f"{name}={raw!r}: expected {expected}")
    return int(raw)


def min_tokens() -> int:
    """TUNELAB_SPLIT_MIN_TOKENS or MIN_TOKENS; a value that is not a whole number >= 0 is a ConfigError."""
    return _whole("TUNELAB_SPLIT_MIN_TOKENS", MIN_TOKENS, "a whole number of tokens (rows x length) >= 0")


def keep_on_gpu() -> int:
    """TUNELAB_KEEP_GATE_UP_ON_GPU: how many of the last layers keep gate/up's output on the GPU for the backward (no
    copies: each costs one [tokens, 2I] buffer from its forward to its backward; at 7B 4 x 1024 310 MB, at 2 x 4096
    620 MB); 0, the default: none. Opt-in, not yet measured (tools/fast_run28.sh)."""
    return _whole("TUNELAB_KEEP_GATE_UP_ON_GPU", 0, "a whole number of layers >= 0 (0: off; K: the last K layers "
                  "keep gate/up's output on the GPU)")


def keep_plan(n: int, every: int, on_gpu: int) -> dict[int, str]:
    """Layer index -> "device" or "host" for the layers (of n) that keep gate/up's output: the last `on_gpu` on the
    GPU, and keep_layers(n, every) (the last layer on the GPU, the others in host memory)."""
    plan = {i: "host" for i in keep_layers(n, every)}
    for i in range(max(0, n - max(on_gpu, 1 if plan else 0)), n):
        plan[i] = "device"
    return plan


def keep_every() -> int:
    """TUNELAB_KEEP_GATE_UP: every how many layers the offload keeps gate/up's output from the first pass for the
    backward (keep_layers; 0: none, the default); a value that is not a whole number >= 0 is a ConfigError.

    Opt-in because it did not pay reliably (runs 25-26 on the H200, 7B QLoRA, docs/fastpath.md): with N=3 at
    2 x 4096 12,689 against 12,337 tok/s (one pair); at 4 x 1024 from 9,357 to 12,746 against the default's
    10,797-12,365 in the same leases (ABBA in lease T: 12,746 / 10,777 against 12,181 / 12,365); packed 10,693 /
    11,121 against 11,632 / 12,343. The slow cases ran below the power cap at higher clocks (the GPU waiting: the
    host link, shared with the host's other GPUs, is the suspect). It costs one or two [tokens, 2I] buffers of peak
    (+0.48 GiB at 4 x 1024, +0.97 at 2 x 4096: still under Unsloth's), ~2 GiB more reserved, and the kept outputs
    in pinned host memory (2.8 GiB at 4 x 1024). The 50-step parity held with it (lease T: losses within 0.028%
    of the plain path's, gradient norms within 0.14%). Those runs had a prefetch defect since fixed (below each
    kept layer the next h2 came back only when asked for: ~1.5% of the step at N=3; docs/fastpath.md)."""
    return _whole("TUNELAB_KEEP_GATE_UP", 0, "a whole number of layers >= 0 (0: off; N: the last layer and every Nth "
                  "one below it keep gate/up's output)")


def keep_layers(n: int, every: int) -> list[int]:
    """The layer indices (of n, ascending) whose gate/up output the offload keeps in host memory, with the last layer
    (kept on the GPU: keep_plan): the last layer and every `every`-th below it (every 0: none). Spaced so that one layer's copy to the host (at 7B, 4 x 1024: 310 MB, ~6 ms
    over PCIe, longer than a layer's forward) is done before the next kept layer's starts, and in backward each
    kept layer's copy back has the layers between to arrive in; the last layer's stays on the GPU (its backward
    comes first, right after the forward)."""
    return [] if every <= 0 else list(range(n - 1, -1, -every))[::-1]


def split_plan(layer) -> bool:
    """Whether `layer` is one whose backward can skip the o and down products (checked at install time; the fused
    case of both projections is checked again at each call, `_fused`)."""
    if type(layer).__name__ not in LAYERS:
        return False
    if layer._forward_hooks or layer._forward_pre_hooks or hasattr(layer, "_hf_hook"):
        return False  # the first pass calls the submodules itself: a hook on the layer would be skipped
    try:
        o, down = layer.self_attn.o_proj, layer.mlp.down_proj
        layer.input_layernorm, layer.post_attention_layernorm  # noqa: B018 (present: the wiring below uses them)
    except AttributeError:
        return False
    return all(hasattr(m, "_tunelab_plain_forward") for m in (o, down))


def _fused(layer):
    """(o's fused arguments, down's) when both calls are the fused case now, else None."""
    from tunelab.model.fast import fused_args

    o, down = fused_args(layer.self_attn.o_proj), fused_args(layer.mlp.down_proj)
    return None if o is None or down is None else (o, down)


def first_pass(layer, kwargs, x):
    """The decoder layer's forward (its own arithmetic, op for op), returning (out, h2)."""
    h = layer.self_attn(hidden_states=layer.input_layernorm(x), **kwargs)[0]
    h2 = x + h
    return h2 + layer.mlp(layer.post_attention_layernorm(h2)), h2


def first_pass_keep(layer, kwargs, x):
    """first_pass, also returning gate/up's output gu (None when the MLP's call was not the grouped pair's fused
    case): (out, h2, gu). The same arithmetic as first_pass, op for op (group._grouped_forward's MLP)."""
    from tunelab.model.fast.group import act_of, pair_output

    h = layer.self_attn(hidden_states=layer.input_layernorm(x), **kwargs)[0]
    h2 = x + h
    n2 = layer.post_attention_layernorm(h2)
    made = pair_output(layer.mlp, n2)
    if made is None:
        return h2 + layer.mlp(n2), h2, None
    return h2 + layer.mlp.down_proj(act_of(layer.mlp, *made)), h2, made[0]


def mlp_replay(layer, h2, gu):
    """The MLP half up to down's input from gu, gate/up's output kept from the first pass: the norm is recomputed
    (its backward and the pair's need it), the pair's GEMM is not (lora.lora_pair_replay); None when the pair is not
    the fused case now (the caller then recomputes)."""
    from tunelab.model.fast.group import act_of, pair_args
    from tunelab.model.fast.lora import lora_pair_replay

    pair = pair_args(layer.mlp)
    if pair is None:
        return None
    return act_of(layer.mlp, lora_pair_replay(layer.post_attention_layernorm(h2), *pair, gu), pair)


def attn_input(layer, kwargs, x):
    """The attention half up to o's input (o passes its input through: `_tunelab_skip`, set by the caller)."""
    return layer.self_attn(hidden_states=layer.input_layernorm(x), **kwargs)[0]


def mlp_input(layer, h2):
    """The MLP half up to down's input, act(gate(n2)) * up(n2) (down passes its input through)."""
    return layer.mlp(layer.post_attention_layernorm(h2))


def _projection_backward(args, x_in, grad_y):
    """grad of the projection's input, and its LoRA gradients accumulated into A's and B's .grad."""
    import torch

    from tunelab.model.fast.lora import dense_below, dense_weight, lora_backward

    weight, quant_state, bias, lora_a, lora_b, scale, dtype = args
    x2 = x_in.reshape(-1, x_in.shape[-1])
    if x2.dtype != dtype:
        x2 = x2.to(dtype)
    a, b = lora_a.to(dtype), lora_b.to(dtype)
    with torch.no_grad():
        xa = torch.mm(x2, a.t())  # as the forward would have made it (the same GEMM on the same rows)
        below = dense_below(weight, quant_state, dtype, grad_y.shape[-1], x2.shape[1])  # down: one augmented GEMM
        grad_x, grad_a, grad_b = lora_backward(grad_y, x2, xa, a, b, lambda: dense_weight(weight, quant_state, dtype),
                                               float(scale), dtype, True, lora_a.requires_grad,
                                               lora_b.requires_grad, below)
        for p, g in ((lora_a, grad_a), (lora_b, grad_b)):
            if g is not None:
                g = g.to(p.dtype)
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad += g
    return grad_x.view(*x_in.shape[:-1], grad_x.shape[-1])


def forward_mode(autocast):
    """The forward's grad mode and autocast, for a recompute inside backward (which runs without them); autocast:
    the forward's (device, enabled, dtype) list, as the offload records it."""
    import contextlib

    import torch

    stack = contextlib.ExitStack()
    stack.enter_context(torch.enable_grad())
    for device, enabled, dtype in autocast:
        stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
    return stack


class recomputing:
    """fast.Passes.recompute while inside: the fused functions keep their dense weights for the backward that
    follows (lora.keep_dense)."""

    def __enter__(self):
        from tunelab.model.fast import Passes

        self.before, Passes.recompute = Passes.recompute, True

    def __exit__(self, *exc):
        from tunelab.model.fast import Passes

        Passes.recompute = self.before


def split_backward(layer, get_x, h2, grad_out, autocast, run_attn, run_mlp, gu=None):
    """grad of the layer input from grad_out, recomputing the two halves without o's and down's products, or None
    (before anything ran) when o or down is not the fused case now: the caller then recomputes the whole layer.
    get_x(): the layer input, back on the device (fetched after the MLP half); h2: the residual after attention;
    autocast: the forward's (device, enabled, dtype) list; run_attn(x) / run_mlp(h2): attn_input / mlp_input
    (compiled or not) bound to the layer and its kwargs; gu: gate/up's output kept from the first pass
    (first_pass_keep), which the MLP half then replays (mlp_replay) instead of recomputing gate and up, or None."""
    import torch

    def recompute(run, inp, module):
        inp = inp.detach().requires_grad_(True)
        with forward_mode(autocast), recomputing():
            module._tunelab_skip = True
            try:
                return inp, run(inp)
            finally:
                module._tunelab_skip = False

    with forward_mode(autocast):
        fused = _fused(layer)  # inside the forward's autocast: the compute dtype is its
    if fused is None:
        return None
    o_args, down_args = fused
    # the projections' backwards run as LoraLinear.backward does: outside autocast, in the dtypes they name
    act = None
    if gu is not None:  # mlp_replay: None when the pair left the fused case (then recomputed below)
        h2_in, act = recompute(lambda h, kept=gu: mlp_replay(layer, h, kept), h2, layer.mlp.down_proj)
    del gu  # (the replay's autograd graph holds it until its backward below)
    if act is None:
        h2_in, act = recompute(run_mlp, h2, layer.mlp.down_proj)
    h2 = h2_in
    grad_act = _projection_backward(down_args, act.detach(), grad_out)
    torch.autograd.backward([act], [grad_act.to(act.dtype)])
    grad_h2 = grad_out + h2.grad  # the residual's share and the MLP's
    del act, grad_act, h2
    x, o_in = recompute(run_attn, get_x(), layer.self_attn.o_proj)
    grad_o_in = _projection_backward(o_args, o_in.detach(), grad_h2)
    torch.autograd.backward([o_in], [grad_o_in.to(o_in.dtype)])
    return grad_h2 + x.grad
