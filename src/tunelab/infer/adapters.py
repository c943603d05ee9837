"""Several LoRA adapters on one base model, chosen per batch row: the API server's multi-adapter decoding.

PEFT loads the adapters (`PeftModel.load_adapter(path, adapter_name=...)`), one set of base weights for all.
PEFT's own mixed-batch path (`adapter_names=[...]`) indexes sub-batches with Python lists inside every layer,
which cannot be captured in a CUDA graph and copies index lists to the GPU in every layer. The router instead
replaces each LoRA layer's forward (while routing is on) with the same arithmetic as PEFT's, applied to the whole
batch once per adapter and multiplied by a per-row 0/1 scale:

    result = base_layer(x);  for each adapter a:  result += (lora_B_a(lora_A_a(x)) * scaling_a) * row_scale_a

The base weights are read once per step whatever the adapters. A row with scale 1.0 gets exactly PEFT's value
(x * 1.0 == x, y + 0.0 == y, and the dtype casts are PEFT's), so one request answers the same whether it shares
the batch with other adapters or not. The scales are fixed-address buffers that a captured CUDA graph reads.
Outside `rows()` / `prefill()` the layers run PEFT's own forward (chat, eval, training are untouched).
Supported: plain LoRA on Linear layers (16-bit, bitsandbytes 4/8-bit bases); DoRA and other variants are refused.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator, Sequence

from tunelab.errors import ModelError


class AdapterRouter:
    """Per-row adapter selection for the LoRA layers of a PEFT model (see the module docstring)."""

    def __init__(self, model: Any, names: Sequence[str], max_rows: int, device: Any) -> None:
        import torch
        from peft.tuners.lora import LoraLayer

        self.names = list(names)
        self.layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        if not self.layers:
            raise ModelError("adapters were named for routing but the model holds no LoRA layer.")
        for layer in self.layers:
            variants = getattr(layer, "lora_variant", {}) or {}
            if any(n in variants for n in self.names):
                raise ModelError(f"adapter variants (DoRA, ...) are not supported by the multi-adapter decoder (layer {type(layer).__name__}).")
            if not hasattr(layer, "base_layer") or type(layer).__name__ not in ("Linear", "Linear4bit", "Linear8bitLt"):
                raise ModelError(f"LoRA on {type(layer).__name__} layers is not supported by the multi-adapter decoder (Linear layers only).")
        loaded = set().union(*(set(layer.lora_A.keys()) for layer in self.layers))
        missing = [n for n in self.names if n not in loaded]
        if missing:
            raise ModelError(f"adapter '{missing[0]}' is not loaded in the model (loaded: {', '.join(sorted(loaded))}).")
        self.scales = {n: torch.zeros((max_rows, 1, 1), dtype=torch.float32, device=device) for n in self.names}
        self.one = {n: torch.zeros((1, 1, 1), dtype=torch.float32, device=device) for n in self.names}
        self.current: dict[str, Any] | None = None
        for layer in self.layers:
            layer.forward = functools.partial(_routed_forward, layer, self, layer.forward)

    def check(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self.scales:
            raise ModelError(f"unknown adapter '{adapter}' (loaded: {', '.join(self.names)}).")

    def set_row(self, row: int, adapter: str | None) -> None:
        """Give batch row `row` the adapter `adapter` (None: the base model alone)."""
        self.check(adapter)
        for name, buf in self.scales.items():
            buf[row] = 1.0 if name == adapter else 0.0

    @contextlib.contextmanager
    def rows(self, n: int) -> Iterator[None]:
        """Route a forward over the first n rows by the per-row scales."""
        self.current = {name: buf[:n] for name, buf in self.scales.items()}
        try:
            yield
        finally:
            self.current = None

    @contextlib.contextmanager
    def prefill(self, adapter: str | None) -> Iterator[None]:
        """Route a one-row forward (a prompt's prefill) through `adapter` alone."""
        self.check(adapter)
        for name, buf in self.one.items():
            buf.fill_(1.0 if name == adapter else 0.0)
        self.current = dict(self.one)
        try:
            yield
        finally:
            self.current = None


def _routed_forward(layer: Any, router: AdapterRouter, original: Any, x: Any, *args: Any, **kwargs: Any):
    """PEFT's LoRA Linear forward (plain and bitsandbytes flavours), one term per adapter scaled per row."""
    import torch

    # Routing decides by the scales alone (not PEFT's disable flag): a captured graph must not bake that flag in.
    if router.current is None or layer.merged:
        return original(x, *args, **kwargs)
    result = layer.base_layer(x, *args, **kwargs)
    dtype = result.dtype
    quantized = type(layer).__name__ != "Linear"
    for name, scale in router.current.items():
        if name not in layer.lora_A:
            continue  # this adapter does not target this layer
        lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
        out = lora_b(lora_a(layer._cast_input_dtype(x, lora_a.weight.dtype))) * layer.scaling[name]
        out = out * scale.view(-1, *([1] * (out.dim() - 1))).to(out.dtype)
        if quantized and not torch.is_autocast_enabled():
            result = result + out.to(dtype)  # as peft.tuners.lora.bnb: cast the LoRA term, then add
        else:
            result = (result + out).to(dtype)  # as peft.tuners.lora.layer.Linear: add, then cast
    return result
