"""gate and up as one fused function (lora.LoraGroup): on by default where the fast path is (TUNELAB_GROUP_GATE_UP=0
turns it off). Run 14 on the H200 (docs/fastpath.md): +3.1% at 7B 4 x 1024 (11,961 against 11,599 tok/s) and
+17.7% at 1 x 1024 (4,219 against 3,584). Its forward is one augmented GEMM (lora._augment; run 16: 12,769 against
12,692 tok/s and 5.56 against 5.79 GiB at 4 x 1024).
4-bit bases only (group_gate_up says why).

    n = group_gate_up(model)   # every covered MLP (Qwen2 / Qwen3 / Llama) whose gate, up and down are patched

The two projections read the same input, so per pass one GEMM makes both base products (their weights stacked,
each 4-bit weight dequantized straight into its rows), one makes both x @ A^T and one adds both rank-r products;
the backward's grad x is one GEMM over both. Per layer and pass that is about half the launches of the two
separate projections (docs/fastpath.md: the host's launches bind the small steps). The MLP's forward becomes
`down(act(gate_up(x)[:, :I]) * gate_up(x)[:, I:])`, its own arithmetic; any call outside the fused case (no
gradient, adapters off, a bias, two scales or dtypes) runs the MLP's own forward with the patched projections.

q, k and v likewise (group_qkv; opt-in, TUNELAB_GROUP_QKV=1; 4-bit and 16-bit bases; run 17 measured no gain at
7B 4 x 1024 and a loss at 1 x 1024, 4,581 against 4,876 tok/s, so it is off by default):

    n = group_qkv(model)   # every covered attention (Qwen2 / Qwen3 / Llama) whose q, k and v are patched

The attention's own forward stays (RoPE, q/k norms, the attention call are the model's): q's call computes all
three outputs as one function (lora.lora_group: one GEMM for the three x A^T, one augmented GEMM for the three base
and rank-r products with the stacked biases, one GEMM for grad x) and hands k's and v's outputs to their calls, which
return them when they get the same input tensor (`_tunelab_pending`; any other input, they compute their own).
The covered attentions call q, k, v in that order on one tensor. A 16-bit stack copies the three weights at each use
(33 MB at 7B, where gate/up's would be 272 MB: why that pair stays 4-bit only).
"""
from __future__ import annotations

import os
import types

MLPS = ("Qwen2MLP", "Qwen3MLP", "LlamaMLP")


def enabled() -> bool:
    """Whether the fast path groups gate and up (TUNELAB_GROUP_GATE_UP not "0")."""
    return os.environ.get("TUNELAB_GROUP_GATE_UP", "1") != "0"


def pair_args(mlp):
    """(gate's fused arguments, up's) when a call of this grouped MLP now is the pair's fused case (no bias, one
    scale and compute dtype), else None."""
    from tunelab.model.fast import Passes, fused_args

    gate, up = mlp.gate_proj, mlp.up_proj
    if not hasattr(mlp, "_tunelab_mlp_forward") or not Passes.fused_now() or gate._tunelab_skip or up._tunelab_skip:
        return None
    first, second = fused_args(gate), fused_args(up)
    if (first is not None and second is not None and first[2] is None and second[2] is None
            and first[5] == second[5] and first[6] == second[6]):
        return first, second
    return None


def act_of(mlp, gu, pair):
    """down's input from the pair's output gu [..., gate's out + up's out]: act(g) * u, the MLP's own arithmetic."""
    g, u = gu.split([pair[0][4].shape[0], pair[1][4].shape[0]], dim=-1)
    return mlp.act_fn(g) * u


def pair_output(mlp, x):
    """(gu, the pair's arguments) for input x, gu gate's and up's outputs side by side, when the call is the fused
    case now, else None (split.first_pass_keep: the checkpoint offload keeps gu for the backward)."""
    from tunelab.model.fast.lora import lora_pair

    pair = pair_args(mlp)
    return None if pair is None else (lora_pair(x, *pair), pair)


def _grouped_forward(self, x):
    made = pair_output(self, x)
    if made is None:
        return self._tunelab_mlp_forward(x)
    return self.down_proj(act_of(self, *made))


def group_gate_up(model) -> int:
    """Route every covered MLP whose three projections are patched (fast.patch_lora_layers) and whose gate and up
    are 4-bit through the pair. A 16-bit pair stays two projections: stacking two dense weights is a copy of both
    at each use (run 15: +0.40 GiB at 7B 4 x 1024, past Unsloth's peak), where 4-bit ones are dequantized straight
    into the stacked rows (lora.dense_pair)."""
    count = 0
    for module in model.modules():
        if type(module).__name__ not in MLPS or hasattr(module, "_tunelab_mlp_forward"):
            continue
        projections = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(hasattr(p, "_tunelab_plain_forward") for p in projections):
            continue
        if not (projections[0]._tunelab_quantized and projections[1]._tunelab_quantized):
            continue
        module._tunelab_mlp_forward = module.forward
        module.forward = types.MethodType(_grouped_forward, module)
        count += 1
    return count


def ungroup(model) -> None:
    for module in model.modules():
        if hasattr(module, "_tunelab_mlp_forward"):
            module.forward = module._tunelab_mlp_forward
            del module._tunelab_mlp_forward
        if getattr(module, "_tunelab_group", None) is not None:
            module._tunelab_group = None


ATTENTIONS = ("Qwen2Attention", "Qwen3Attention", "LlamaAttention")


def qkv_enabled() -> bool:
    """Whether the fast path groups q, k and v (TUNELAB_GROUP_QKV=1; off by default, see the module's docstring)."""
    return os.environ.get("TUNELAB_GROUP_QKV", "0") == "1"


def qkv_forward(q_proj, x, q_args):
    """q's output, with k's and v's left for their calls (their `_tunelab_pending`), or None when the three are
    not one fused case now (the caller then runs q alone, and k and v run their own)."""
    from tunelab.model.fast import fused_args
    from tunelab.model.fast.lora import lora_group

    k_proj, v_proj = q_proj._tunelab_group
    if k_proj._tunelab_skip or v_proj._tunelab_skip:
        return None
    k_args, v_args = fused_args(k_proj), fused_args(v_proj)
    if k_args is None or v_args is None:
        return None
    three = (q_args, k_args, v_args)
    if any(p[5] != q_args[5] or p[6] != q_args[6] or (p[2] is None) != (q_args[2] is None) for p in three):
        return None
    qkv = lora_group(x, *three)
    q, k, v = qkv.split([p[4].shape[0] for p in three], dim=-1)
    k_proj._tunelab_pending, v_proj._tunelab_pending = (x, k), (x, v)
    return q


def group_qkv(model) -> int:
    """Mark every covered attention whose q, k and v are patched (fast.patch_lora_layers), all 4-bit or all
    16-bit, biases on all or none: q's call then makes the three outputs (qkv_forward)."""
    count = 0
    for module in model.modules():
        if type(module).__name__ not in ATTENTIONS:
            continue
        projections = [getattr(module, n, None) for n in ("q_proj", "k_proj", "v_proj")]
        if not all(hasattr(p, "_tunelab_plain_forward") for p in projections) or projections[0]._tunelab_group:
            continue
        if len({p._tunelab_quantized for p in projections}) != 1:
            continue
        if len({p._tunelab_base.bias is None for p in projections}) != 1:
            continue
        projections[0]._tunelab_group = (projections[1], projections[2])
        count += 1
    return count
