"""torch.compile of the decoder layers over the fused projections: the launch-overhead lever, on by default.

    n = compile_decoder_layers(model)   # each transformers decoder layer compiled in place; returns how many

The profile of the eager 7B step (docs/fastpath.md) showed the GPU idle 25-40% of each step while Python issued
thousands of small launches. Compiling each decoder layer (its checkpoint wrapper included: dynamo traces
non-reentrant checkpointing as a higher-order op, so the recompute is compiled too) fuses the norms, RoPE,
SwiGLU, residual adds and casts into a few kernels, turns the layer's Python into one graph call, and lets the
recompute and the backward share one dequantize per projection. The fused projection (lora.py) and
bitsandbytes' dequantize ops trace without a graph break, and all layers share one graph.

Measured on an H200 (Qwen2.5-7B QLoRA 4 x 1024, 50 steps, run 5): one graph, no graph break, 10,510 against
8,994 tok/s eager, loss within 0.023% and gradient norms within 0.16% of the plain path at every step; the first
step takes ~11 s (compilation), 35 s from the process start. mode="reduce-overhead" (CUDA graphs over the
compiled layer) failed there: the 28 calls of the one graph per step overwrite each other's outputs
(torch 2.11: "accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run").
With the checkpoint offload (on by default since run 8), offload.py compiles each layer's forward instead, and
that form measured faster at 7B (run 8: 11,103 against 10,113 tok/s at 4 x 1024); this function then is not used.
"""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def compile_decoder_layers(model, backend=None) -> int:
    """Compile every decoder layer in place, checkpoint included (the recompute and the backward in one compiled
    graph); returns how many. Under the checkpoint offload, offload.py compiles the layers' forwards instead.
    backend: torch.compile's (None: inductor; the CPU tests pass a counting one that skips code generation)."""
    import torch._dynamo.config
    from transformers.modeling_layers import GradientCheckpointingLayer

    # transformers >= 5.2x wraps the attention's forward in the `kernels` package's hub dispatch, which sets and resets
    # a module-level variable around the call: inside the checkpoint's higher-order op dynamo refuses that side effect
    # (a graph break, the layer in pieces) unless told not to replay it in the recompute. Setting and resetting the
    # dispatch table has no effect to replay; forward hooks (transformers' output capturing) then fire once per
    # forward, not again in the recompute. Process-wide dynamo state, as torch offers it; older torch lacks the flag.
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    count = 0
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.compile() if backend is None else module.compile(backend=backend)
            module._compiled_call_impl = eager_on_failure(module._compiled_call_impl, module._call_impl,
                                                          _uncompile(module), f"decoder layer {count}")
            count += 1
    return count


def _uncompile(module):
    def off():
        module._compiled_call_impl = None  # nn.Module.__call__ runs the eager layer from now on

    return off


def eager_on_failure(compiled, eager, give_up, what: str):
    """`compiled`, or `eager` (with a warning, and `give_up()` called so later calls skip compiling) when dynamo or
    inductor cannot compile it: a model or setting not measured here still trains; compiling is a speed lever,
    never a requirement. Only compilation errors (dynamo's exception family: Unsupported, BackendCompilerFailed,
    ...) are caught; anything the call itself raises (out of memory, a shape error eager would hit too) propagates.
    Scoped to these calls, unlike dynamo's process-wide `suppress_errors`."""
    import torch._dynamo.exc

    def call(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as e:  # raised before the compiled code ran: safe to rerun
            logger.warning("fast path: %s did not compile (%s: %s); it runs eager", what, type(e).__name__,
                           str(e).strip().splitlines()[0][:200] if str(e).strip() else "")
            give_up()
            return eager(*args, **kwargs)

    return call


def compile_counters() -> dict:
    """What dynamo did so far: distinct graphs, graph breaks, recompilations (for the bench record)."""
    from torch._dynamo.utils import counters

    return {"unique_graphs": counters["stats"].get("unique_graphs", 0),
            "frames_ok": counters["frames"].get("ok", 0), "frames_total": counters["frames"].get("total", 0),
            "graph_breaks": sum(counters["graph_break"].values())}
