"""tunelab's opaque operators for torch.compile (`tunelab::two_products`, `tunelab::dequantize_4bit`).

    op = define("two_products", "(Tensor a1, Tensor b1, ...) -> Tensor", impl, fake)   # torch.ops.tunelab.<name>

Inside a compiled graph these run as one opaque call each (inductor calls them from its wrapper through the
dispatcher). They are defined with `torch.library.Library` + `impl` rather than `torch.library.custom_op`:
custom_op's Python wrapper (its autograd and aliasing handling) costs ~18 us a call on this project's CPU box
against ~4 us for a Library-defined op with the same body (tools/op_overhead.py), and a compiled 7B step makes
~560 such calls (the recompute's and the backward's products and dequantizes), all on the host's critical path
when the step is bound by the host (1 x 1024). The ops need no autograd formula: they run inside the fused
projection's own forward and backward (lora.LoraLinear), never under autograd. A fake implementation gives
their output's shape to the compiler.
"""
from __future__ import annotations

import torch

_LIB = torch.library.Library("tunelab", "FRAGMENT")  # a fragment: serving's decode-attention op shares the namespace


def define(name: str, schema: str, impl, fake):
    """Define tunelab::<name> with `schema` (the argument list and return, as in native_functions.yaml), `impl`
    for every device and `fake` for the compiler; returns the op's default overload. TUNELAB_CUSTOM_OP=1 (read at
    import) defines it through torch.library.custom_op instead, the form before, for an A/B on the GPU."""
    import os

    if os.environ.get("TUNELAB_CUSTOM_OP") == "1":
        op = torch.library.custom_op(f"tunelab::{name}", impl, mutates_args=(), schema=schema)
        op.register_fake(fake)
    else:
        _LIB.define(name + schema)
        _LIB.impl(name, impl, "CompositeExplicitAutograd")
        torch.library.register_fake(f"tunelab::{name}", fake, lib=_LIB)
    return getattr(torch.ops.tunelab, name).default
