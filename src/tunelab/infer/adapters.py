"""Several LoRA adapters on one base model, chosen per batch row: the API server's multi-adapter decoding.

PEFT loads the adapters (`PeftModel.load_adapter(path, adapter_name=...)`), one set of base weights for all.
PEFT's own mixed-batch path (`adapter_names=[...]`) indexes sub-batches with Python lists inside every layer,
which cannot be captured in a CUDA graph and copies index lists to the GPU in every layer. The router instead
replaces each LoRA layer's forward (while routing is on) with the same arithmetic as PEFT's, applied to the whole
batch once per adapter and multiplied by a per-row 0/1 scale:

    result = base_layer(x);  for each adapter a:  result += (lora_B_a(lora_A_a(x)) * scaling_a) * row_scale_a

The base weights are read once per step whatever the adapters. With one adapter a row with scale 1.0 gets exactly
PEFT's value (x * 1.0 == x, y + 0.0 == y, and the dtype casts are PEFT's). With two or more, the per-adapter loop
would cost two small matmuls per adapter per layer (kernel launches that add up at decode time), so the adapters
are stacked: A's concatenated ([sum of ranks, in]), B's concatenated ([out, sum of ranks]), and a per-row mask
over the rank blocks that carries each row's adapter scaling selects that row's block:

    result = base_layer(x) + ((x @ A_cat^T) * row_mask) @ B_cat^T          (2 matmuls per layer, any adapter count)

The other blocks are exact zeros, so a row gets its own adapter's LoRA term; only the rounding of the products may
differ from PEFT's separate ones (tested: the same greedy tokens). The masks/scales are fixed-address buffers that a
captured CUDA graph reads.
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
        self.stacked = _stack(self.layers, self.names, max_rows, device) if len(self.names) > 1 else None
        # Per-adapter scaling folded into the row scales when it is one number for all layers (x * s once, the
        # same float product PEFT computes); else the scales are 0/1 and the layer's scaling is applied apart.
        self.folded: dict[str, float] = {}
        for n in self.names:
            values = {float(layer.scaling[n]) for layer in self.layers if n in layer.lora_A}
            if len(values) == 1:
                self.folded[n] = values.pop()
        self._cast: tuple[Any, Any] | None = None
        for layer in self.layers:
            layer.forward = functools.partial(_routed_forward, layer, self, layer.forward)

    def cast(self, x: Any, dtype: Any) -> Any:
        """x in the adapters' dtype, cast once for the projections that share an input (q/k/v, gate/up)."""
        if x.dtype == dtype:
            return x
        if self._cast is not None and self._cast[0] is x and self._cast[1].dtype == dtype:
            return self._cast[1]
        y = x.to(dtype)
        self._cast = (x, y)
        return y

    def check(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self.scales:
            raise ModelError(f"unknown adapter '{adapter}' (loaded: {', '.join(self.names)}).")

    def set_row(self, row: int, adapter: str | None) -> None:
        """Give batch row `row` the adapter `adapter` (None: the base model alone)."""
        self.check(adapter)
        for name, buf in self.scales.items():
            buf[row] = self.folded.get(name, 1.0) if name == adapter else 0.0
        if self.stacked is not None:
            self.stacked.set_row(self.stacked.masks, row, adapter)

    @contextlib.contextmanager
    def rows(self, n: int) -> Iterator[None]:
        """Route a forward over the first n rows by the per-row scales."""
        self.current = {name: buf[:n] for name, buf in self.scales.items()}
        if self.stacked is not None:
            self.stacked.current = self.stacked.masks[:n]
        try:
            yield
        finally:
            self.current, self._cast = None, None

    @contextlib.contextmanager
    def prefill(self, adapter: str | None) -> Iterator[None]:
        """Route a one-row forward (a prompt's prefill) through `adapter` alone."""
        self.check(adapter)
        for name, buf in self.one.items():
            buf.fill_(self.folded.get(name, 1.0) if name == adapter else 0.0)
        self.current = dict(self.one)
        if self.stacked is not None:
            self.stacked.set_row(self.stacked.one, 0, adapter)
            self.stacked.current = self.stacked.one
        try:
            yield
        finally:
            self.current, self._cast = None, None


def _routed_forward(layer: Any, router: AdapterRouter, original: Any, x: Any, *args: Any, **kwargs: Any):
    """PEFT's LoRA Linear forward (plain and bitsandbytes flavours), one term per adapter scaled per row."""
    import torch

    # Routing decides by the scales alone (not PEFT's disable flag): a captured graph must not bake that flag in.
    if router.current is None or layer.merged:
        return original(x, *args, **kwargs)
    result = layer.base_layer(x, *args, **kwargs)
    dtype = result.dtype
    quantized = type(layer).__name__ != "Linear"
    if router.stacked is not None:
        a_cat, b_cat = router.stacked.weights[id(layer)]
        out = ((router.cast(x, a_cat.dtype) @ a_cat.t()) * router.stacked.current) @ b_cat.t()
        return result + out.to(dtype) if quantized else (result + out).to(dtype)
    for name, scale in router.current.items():
        if name not in layer.lora_A:
            continue  # this adapter does not target this layer
        lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
        out = lora_b(lora_a(router.cast(x, lora_a.weight.dtype)))
        if name not in router.folded:
            out = out * layer.scaling[name]
        out = out * scale.view(-1, *([1] * (out.dim() - 1))).to(out.dtype)  # (row scale x scaling): PEFT's x * s
        if quantized and not torch.is_autocast_enabled():
            result = result + out.to(dtype)  # as peft.tuners.lora.bnb: cast the LoRA term, then add
        else:
            result = (result + out).to(dtype)  # as peft.tuners.lora.layer.Linear: add, then cast
    return result


class _Stacked:
    """The stacked form of several adapters: per layer (A_cat, B_cat), and row masks over the rank blocks."""

    def __init__(self, names, blocks, weights, max_rows, device) -> None:
        import torch

        self.names, self.blocks, self.weights = names, blocks, weights  # blocks: name -> (start, stop, scaling)
        width = max(stop for _, stop, _ in blocks.values())
        dtype = next(iter(weights.values()))[0].dtype
        self.masks = torch.zeros((max_rows, 1, width), dtype=dtype, device=device)
        self.one = torch.zeros((1, 1, width), dtype=dtype, device=device)
        self.current: Any = None

    def set_row(self, buf, row: int, adapter: str | None) -> None:
        buf[row] = 0.0
        if adapter is not None:
            start, stop, scaling = self.blocks[adapter]
            buf[row, :, start:stop] = scaling


def _stack(layers, names, max_rows, device) -> _Stacked | None:
    """Concatenate the adapters' A and B per layer (a zero block where an adapter does not target a layer). None
    (the per-adapter loop is used) when an adapter's rank or scaling differs between layers."""
    import torch

    blocks: dict[str, tuple[int, int, float]] = {}
    start = 0
    for name in names:
        ranks = {layer.r[name] for layer in layers if name in layer.lora_A}
        scalings = {float(layer.scaling[name]) for layer in layers if name in layer.lora_A}
        if len(ranks) != 1 or len(scalings) != 1:
            return None
        r = ranks.pop()
        blocks[name] = (start, start + r, scalings.pop())
        start += r
    weights = {}
    for layer in layers:
        ref = next(layer.lora_A[n].weight for n in names if n in layer.lora_A)
        in_f, out_f = ref.shape[1], next(layer.lora_B[n].weight for n in names if n in layer.lora_B).shape[0]
        a_cat = torch.zeros((start, in_f), dtype=ref.dtype, device=ref.device)
        b_cat = torch.zeros((out_f, start), dtype=ref.dtype, device=ref.device)
        for name, (lo, hi, _) in blocks.items():
            if name in layer.lora_A:
                a_cat[lo:hi] = layer.lora_A[name].weight.detach()
                b_cat[:, lo:hi] = layer.lora_B[name].weight.detach()
        weights[id(layer)] = (a_cat, b_cat)
    return _Stacked(names, blocks, weights, max_rows, device)
