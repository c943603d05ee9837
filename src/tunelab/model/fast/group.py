"""gate and up as one fused function (lora.LoraPair): on by default where the fast path is (TUNELAB_GROUP_GATE_UP=0
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
"""
from __future__ import annotations

import os
import types

MLPS = ("Qwen2MLP", "Qwen3MLP", "LlamaMLP")


def enabled() -> bool:
    """Whether the fast path groups gate and up (TUNELAB_GROUP_GATE_UP not "0")."""
    return os.environ.get("TUNELAB_GROUP_GATE_UP", "1") != "0"


def _grouped_forward(self, x):
    from tunelab.model.fast import Passes, fused_args
    from tunelab.model.fast.lora import lora_pair

    gate, up = self.gate_proj, self.up_proj
    if Passes.fused_now() and not (gate._tunelab_skip or up._tunelab_skip):
        first, second = fused_args(gate), fused_args(up)
        if (first is not None and second is not None and first[2] is None and second[2] is None
                and first[5] == second[5] and first[6] == second[6]):
            gu = lora_pair(x, first, second)
            g, u = gu.split([first[4].shape[0], second[4].shape[0]], dim=-1)
            return self.down_proj(self.act_fn(g) * u)
    return self._tunelab_mlp_forward(x)


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
