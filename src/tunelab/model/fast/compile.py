"""torch.compile of the decoder layers over the fused projections (the launch-overhead lever; opt-in, unmeasured).

    n = compile_decoder_layers(model)   # each transformers decoder layer compiled in place; returns how many

The profile of the 7B step (docs/fastpath.md) shows the GPU idle 25-40% of each step while Python issues
thousands of small launches. Compiling each decoder layer (its checkpoint wrapper included: dynamo traces
non-reentrant checkpointing as a higher-order op, so the recompute is compiled too) fuses the norms, RoPE,
SwiGLU, residual adds and casts into a few kernels and turns the layer's Python into one graph call. The fused
projection (lora.py) and bitsandbytes' dequantize ops trace without a graph break, and all layers share one
graph (checked on CPU: tiny Qwen2, NF4 and bf16, loss equal to 3e-5, LoRA gradients to 1.2e-2 relative after
inductor's bf16 fusion; about 75-180 s of compilation on this 2-core machine).

Status: `tunelab bench` variant `+compile` only; GPU speed and compile time not measured yet, so the default
training path does not compile.
"""
from __future__ import annotations


def compile_decoder_layers(model, mode: str | None = None) -> int:
    """Compile every decoder layer in place (mode: None = inductor's default, "reduce-overhead" = CUDA graphs)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    count = 0
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.compile(mode=mode)
            count += 1
    return count


def compile_counters() -> dict:
    """What dynamo did so far: distinct graphs, graph breaks, recompilations (for the bench record)."""
    from torch._dynamo.utils import counters

    return {"unique_graphs": counters["stats"].get("unique_graphs", 0),
            "frames_ok": counters["frames"].get("ok", 0), "frames_total": counters["frames"].get("total", 0),
            "graph_breaks": sum(counters["graph_break"].values())}
