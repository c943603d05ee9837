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

Projections that read the same input (q/k/v; gate/up) are grouped: their A's stacked and their B's block-diagonal,
so each group costs two matmuls per step instead of two per projection (`_grouped_term`).

A packed prefill (several prompts back to back in one row, tunelab.infer.decoder's `prefill_many`) is routed per
token instead (`tokens()`): each token carries the scale / rank-block mask of its prompt's adapter, [1, tokens, 1]
and [1, tokens, width] in place of the per-row [rows, 1, 1] and [rows, 1, width].

Every LoRA layer gets the same bound function as its forward, and the router of the running forward is a module
global (`_ACTIVE`), its per-layer tensors buffers on the layers and its per-kind numbers plain ints: a compiled
decoder layer (tunelab.infer.decoder) then sees the same code and guards in all layers and compiles once.
Outside `rows()` / `prefill()` the layers run PEFT's own forward (chat, eval, training are untouched). One routed
forward at a time per model (the decoders run theirs from one thread).
Supported: plain LoRA on Linear layers (16-bit, bitsandbytes 4/8-bit bases); DoRA and other variants are refused.
"""
from __future__ import annotations

import contextlib
import os
import types
from typing import Any, Iterator, Sequence

from tunelab.errors import ModelError


class AdapterRouter:
    """Per-row adapter selection for the LoRA layers of a PEFT model (see the module docstring)."""

    def __init__(self, model: Any, names: Sequence[str], max_rows: int, device: Any) -> None:
        import torch
        from peft.tuners.lora import LoraLayer

        self.names = list(names)
        self.model = model
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
            # One bound method per layer, the same function for all (not a partial holding this router): a
            # compiled decoder layer then sees the same code in every layer and reuses one compiled graph.
            layer.forward = types.MethodType(_routed_forward, layer)
        self.members = set(self.layers)
        self.stash: tuple[Any, Any] | None = None
        self.base_stash: tuple[Any, Any] | None = None
        self.fold_stash: tuple[Any, Any] | None = None  # a folded group leader's x @ A^T columns for its input
        # decode levers (docs/serve.md), on by default on CUDA where they were measured: the LoRA products as
        # broadcast-multiply + sum while compiling (Triton reductions that inductor fuses with their neighbours
        # instead of cuBLAS calls), and the q/k/v and gate/up base GEMMs as one GEMM per group (their weights
        # re-homed into one buffer); TUNELAB_LORA_REDUCE=0 / TUNELAB_FUSE_PROJ=0 turn them off, =1 forces them
        self.reduce = lever("TUNELAB_LORA_REDUCE", device)
        try:  # the most rows a LoRA product is a reduction for (_mm_t); more rows: a GEMM
            self.reduce_rows = max(1, int(os.environ.get("TUNELAB_LORA_REDUCE_ROWS", "1")))
        except ValueError:
            raise ModelError(f"TUNELAB_LORA_REDUCE_ROWS must be a whole number of rows, not {os.environ['TUNELAB_LORA_REDUCE_ROWS']!r}.") from None
        self.fuse = lever("TUNELAB_FUSE_PROJ", device)
        # TUNELAB_LORA_FOLD (needs the fused GEMMs; on by default on CUDA since its 2026-12-02 run, docs/serve.md):
        # each projection's (or group's) LoRA A rows appended to its 16-bit base weight buffer, so x @ A^T comes
        # out of the base GEMM (see _fold_rows); the model's first router folds its A rows in, a later one uses
        # them only if they are its own (_fold_matches): `folding` says whether this router does
        self.fold = self.fuse and lever("TUNELAB_LORA_FOLD", device)
        self.folding = False
        self.folded_layers = 0  # projections or groups whose base GEMM also yields their x @ A^T
        self.fused = 0  # groups whose base GEMMs are fused
        self.groups = 0
        self.plan: list[tuple[Any, ...]] | None = None
        self._install()

    def _install(self) -> None:
        """Put this router's stacked A/B on the layers (buffers, so a compiled layer reads them as inputs
        rather than guarding on a per-layer dict key); another router on the same model may have replaced them."""
        global _INSTALLED
        if _INSTALLED is self:
            return
        for layer in self.layers:
            a_cat, b_cat = self.stacked.weights[id(layer)] if self.stacked is not None else (None, None)
            layer.register_buffer("_tl_a_cat", a_cat, persistent=False)
            layer.register_buffer("_tl_b_cat", b_cat, persistent=False)
        _INSTALLED = self
        if self.plan is None:  # built once: a captured graph reads these tensors, whichever router is installed
            self.plan = _group(self.model, self) if os.environ.get("TUNELAB_GROUP_LORA", "1") != "0" else []
        for layer in self.layers:
            layer._tl_role = 0
        for lead, ga, gb, parts, members in self.plan:
            lead.register_buffer("_tl_ga", ga, persistent=False)
            lead.register_buffer("_tl_gb", gb, persistent=False)
            lead._tl_parts = parts
            for m, (role, start, stop, last) in members:
                m._tl_role, m._tl_start, m._tl_stop, m._tl_last = role, start, stop, last
        self.groups = len(self.plan)
        if self.fold and not self.folding:
            grouped = {m for *_, members in self.plan for m, _ in members}
            if not any(_rehomed(m) for m in self.layers):  # the model's first re-homing: this router's A rows go in
                for lead, ga, _, _, members in self.plan:
                    self.folded_layers += _fuse_base(lead, [m for m, _ in members], extra=ga)
                for layer in self.layers:
                    if layer not in grouped:
                        self.folded_layers += _fold_base(layer, self._a_rows(layer))
                self.folding = self.folded_layers > 0  # 4-bit bases: nothing to fold into
            else:  # re-homed before: usable only if the rows there are this router's (the same adapters, in order)
                found = [(lead, lead._tl_wcat, ga) for lead, ga, *_ in self.plan if getattr(lead, "_tl_nbase", None) is not None]
                found += [(m, m._tl_wfold, self._a_rows(m)) for m in self.layers if m not in grouped and getattr(m, "_tl_wfold", None) is not None]
                if found and all(_fold_matches(holder, buf, a) for holder, buf, a in found):
                    self.folding, self.folded_layers = True, len(found)
        if self.fuse:
            self.fused = sum(_fuse_base(lead, [m for m, _ in members]) for lead, _, _, _, members in self.plan)

    def _a_rows(self, layer: Any) -> Any:
        """The A rows this router multiplies a projection's input by: the stacked A's, or the one adapter's."""
        if self.stacked is not None:
            return self.stacked.weights[id(layer)][0]
        (name,) = self.names
        return layer.lora_A[name].weight.detach() if name in layer.lora_A else None

    @contextlib.contextmanager
    def _active(self) -> Iterator[None]:
        global _ACTIVE
        self._install()
        _ACTIVE = self
        try:
            yield
        finally:
            _ACTIVE, self.current, self._cast, self.stash, self.base_stash = None, None, None, None, None
            self.fold_stash = None
            if self.stacked is not None:
                self.stacked.current, self.stacked.current_tiled = None, None

    def cast(self, x: Any, dtype: Any) -> Any:
        """x in the adapters' dtype, cast once for the projections that share an input (q/k/v, gate/up)."""
        if x.dtype == dtype:
            return x
        if _compiling():  # the compiler fuses the cast into its consumers; no Python-side cache in a trace
            return x.to(dtype)
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
            self.stacked.current_tiled = {p: t[:n] for p, t in self.stacked.tiled[id(self.stacked.masks)].items()}
        with self._active():
            yield

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
            self.stacked.current_tiled = self.stacked.tiled[id(self.stacked.one)]
        with self._active():
            yield

    @contextlib.contextmanager
    def tokens(self, adapters: Sequence[str | None], lengths: Sequence[int]) -> Iterator[None]:
        """Route a packed forward (one row holding several prompts back to back, `lengths[i]` tokens of prompt i
        with `adapters[i]`) by per-token scales: every token gets the scale (or rank-block mask) its prompt's
        row would get, so each prompt's LoRA terms are the values of its own one-row prefill."""
        import torch

        for a in adapters:
            self.check(a)
        device = next(iter(self.scales.values())).device
        counts = torch.tensor(list(lengths), device=device)
        self.current = {}
        for name in self.names:
            per = torch.tensor([self.folded.get(name, 1.0) if a == name else 0.0 for a in adapters], dtype=torch.float32, device=device)
            self.current[name] = per.repeat_interleave(counts).view(1, -1, 1)
        if self.stacked is not None:
            rows = torch.zeros((len(adapters), 1, self.stacked.masks.shape[-1]), dtype=self.stacked.masks.dtype, device=device)
            for i, a in enumerate(adapters):
                self.stacked.fill(rows, i, a)
            per_token = rows[:, 0].repeat_interleave(counts, dim=0).unsqueeze(0)  # [1, tokens, width]
            self.stacked.current = per_token
            self.stacked.current_tiled = {p: per_token.repeat(1, 1, p) for p in self.stacked.tiled[id(self.stacked.masks)]}
        with self._active():
            yield


def lever(name: str, device: Any, cuda_default: bool = True) -> bool:
    """A decode lever's switch from the environment: 1/on forces it, 0/off turns it off, unset or 'auto': on on
    CUDA (where its speed was measured; `cuda_default=False` for one not measured yet), off elsewhere (on the CPU
    a one-row bf16 product over a fused [q;k;v] weight is a slow path: 2.3 ms against 0.4 ms for its parts)."""
    value = os.environ.get(name, "auto").strip().lower()
    if value in ("1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    return cuda_default and str(getattr(device, "type", device)).startswith("cuda")


_ACTIVE: AdapterRouter | None = None  # the router of the forward running now (None: PEFT's own forward)
_INSTALLED: AdapterRouter | None = None  # whose stacked weights the layers hold


def _compiling() -> bool:
    import torch

    return bool(getattr(torch, "compiler", None) and torch.compiler.is_compiling())


def _routed_forward(layer: Any, x: Any, *args: Any, **kwargs: Any):
    """PEFT's LoRA Linear forward (plain and bitsandbytes flavours), one term per adapter scaled per row."""
    import torch

    router = _ACTIVE
    # Routing decides by the scales alone (not PEFT's disable flag): a captured graph must not bake that flag in.
    if router is None or router.current is None or layer.merged:
        return type(layer).forward(layer, x, *args, **kwargs)
    result = _grouped_base(layer, router, x) if router.fuse else None  # this projection's slice of its group's GEMM
    u = None  # x @ A^T from a folded base GEMM (an ungrouped projection)
    if result is None:
        if router.folding and getattr(layer, "_tl_wfold", None) is not None:
            out = torch.nn.functional.linear(x, layer._tl_wfold, layer._tl_bfold)
            result, u = out[..., : layer._tl_nbase], out[..., layer._tl_nbase :]
        else:
            result = layer.base_layer(x, *args, **kwargs)
    dtype = result.dtype
    quantized = type(layer).__name__ != "Linear"
    grouped = _grouped_term(layer, router, x)  # this projection's slice of its group's LoRA product, or None
    if router.stacked is not None:
        if grouped is None:
            a_cat, b_cat = layer._tl_a_cat, layer._tl_b_cat
            u = u.to(a_cat.dtype) if u is not None else _mm_t(router.cast(x, a_cat.dtype), a_cat, router)
            grouped = _mm_t(u * router.stacked.current, b_cat, router)
        return result + grouped.to(dtype) if quantized else (result + grouped).to(dtype)
    for name, scale in router.current.items():
        if name not in layer.lora_A:
            continue  # this adapter does not target this layer
        if grouped is not None:
            out = grouped  # one routed adapter: the group's product is this adapter's
        else:
            lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
            if u is not None:  # the one routed adapter's A rows are the folded ones
                out = _mm_t(u.to(lora_a.weight.dtype), lora_b.weight, router)
            elif router.reduce and _compiling():
                out = _mm_t(_mm_t(router.cast(x, lora_a.weight.dtype), lora_a.weight, router), lora_b.weight, router)
            else:
                out = lora_b(lora_a(router.cast(x, lora_a.weight.dtype)))
        if name not in router.folded:
            out = out * layer.scaling[name]
        if scale.dim() != out.dim():  # per-row scales [rows, 1, 1] (per-token ones of a packed prefill already fit)
            scale = scale.view(-1, *([1] * (out.dim() - 1)))
        out = out * scale.to(out.dtype)  # (row scale x scaling): PEFT's x * s
        if quantized and not torch.is_autocast_enabled():
            result = result + out.to(dtype)  # as peft.tuners.lora.bnb: cast the LoRA term, then add
        else:
            result = (result + out).to(dtype)  # as peft.tuners.lora.layer.Linear: add, then cast
    return result


# Projections that read the same input in one block: their LoRA products are computed together.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _grouped_term(layer: Any, router: AdapterRouter, x: Any):
    """For a grouped projection (q/k/v, gate/up): the group leader (q, gate; called first by the attention and
    MLP blocks) computes every member's LoRA term in two matmuls, x @ A_group^T (the members' A stacked) and @
    B_group^T (their B's block-diagonal), instead of two per member, and leaves the result for the others, which
    take their slice. None when the layer is not grouped or the leader's result is not for this input."""
    role = layer._tl_role  # an int per projection kind, the same in every decoder layer (no per-layer guard)
    if not role:
        return None
    if role == 1:
        a, b = layer._tl_ga, layer._tl_gb
        fold = router.fold_stash
        if fold is not None and fold[0] is x:  # the group's base GEMM already gave x @ A_group^T
            router.fold_stash = None
            u = fold[1].to(a.dtype)
        else:
            u = _mm_t(router.cast(x, a.dtype), a, router)
        if router.stacked is not None:
            u = u * router.stacked.current_tiled[layer._tl_parts]  # each row's adapter block in every member
        router.stash = (x, _mm_t(u, b, router))
    return _member_slice(router, "stash", layer, x)


def _member_slice(router: AdapterRouter, attr: str, layer: Any, x: Any):
    """A group member's columns of what its leader left in router.<attr> for this same input (None when the
    stash is for another input); the group's last member clears it."""
    stash = getattr(router, attr)
    if stash is None or stash[0] is not x:
        return None
    if layer._tl_last:
        setattr(router, attr, None)
    return stash[1][..., layer._tl_start : layer._tl_stop]


def _mm_t(x: Any, w: Any, router: AdapterRouter):
    """x @ w.t(); with the router's `reduce` lever, while compiling a forward of at most `reduce_rows` rows (one
    token: the one-stream decode step), as a broadcast multiply + sum over the shared dimension: inductor emits
    a Triton reduction (fused with the cast before it, and for the second LoRA product with the add after it)
    instead of a cuBLAS call. Same float32 products, another summation order. More rows (a batched decode step,
    a compiled prefill) stay cuBLAS GEMMs: the reduction reads w once per row (at 32 rows the gate/up B product
    took 41 us a layer that way, 2026-12-02 run 5), a GEMM once."""
    if router.reduce and _compiling() and _rows(x) <= router.reduce_rows:
        return (x.unsqueeze(-2) * w).sum(-1)
    return x @ w.t()


def _rows(x: Any):
    """Rows of x's product (all dimensions but the last). Under torch.compile a batch dimension >= 2 is a
    symbol known to be >= 2, so comparing with 1 needs no new guard."""
    n = 1
    for d in x.shape[:-1]:
        n = n * d
    return n


def _grouped_base(layer: Any, router: AdapterRouter, x: Any):
    """With the `fuse` lever: the group leader (q, gate) runs the base GEMM of the whole group (q/k/v, gate/up:
    their weights re-homed into one buffer by _fuse_base, so no copy of the weights) and leaves it for the
    members, which take their slice. None when not fused or not for this input."""
    import torch

    role = layer._tl_role
    if not role or getattr(layer, "_tl_wcat", None) is None and role == 1:
        return None
    if role == 1:
        out = torch.nn.functional.linear(x, layer._tl_wcat, layer._tl_bcat)
        router.base_stash = (x, out)  # the members' slices are its first columns
        nbase = getattr(layer, "_tl_nbase", None)
        if nbase is not None and router.folding:
            router.fold_stash = (x, out[..., nbase:])
    return _member_slice(router, "base_stash", layer, x)


def _rehomed(layer: Any) -> bool:
    return getattr(layer, "_tl_wcat", None) is not None or getattr(layer, "_tl_wfold", None) is not None


def _rehomable(base: Any) -> bool:
    """Whether a base layer's weight may be re-homed into a shared buffer (_fuse_base, _fold_base): a plain
    16/32-bit torch Linear whose weight is a real tensor (not on the meta device) that no accelerate offload hook
    swaps in at forward time (device_map with CPU/disk offload)."""
    import torch

    return (type(base) is torch.nn.Linear and base.weight.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and base.weight.device.type != "meta" and getattr(base, "_hf_hook", None) is None)


def _fold_rows(w: Any, a: Any) -> Any | None:
    """A's rows in the base weight's dtype, to append below it (None when A does not fit: no A, other input
    width). The LoRA A product then comes out of the base GEMM: 16-bit operands (A rounded to the base's dtype,
    as vLLM's and most servers' LoRA kernels hold it) with the GEMM's float32 accumulation, its result rounded
    to 16 bits before the B product (PEFT: A in float32, x @ A^T in float32). One GEMM instead of a GEMM plus
    a reduction kernel per projection or group at decode time; the extra rows are ~1% of the weight's bytes."""
    if a is None or a.shape[1] != w.shape[1]:
        return None
    return a.detach().to(device=w.device, dtype=w.dtype)


def _fold_matches(holder: Any, buf: Any, a: Any) -> bool:
    """Whether the A rows folded into `buf` (below row holder._tl_nbase) are exactly `a`'s, as _fold_rows puts them."""
    import torch

    rows = _fold_rows(buf, a)
    folded = buf[holder._tl_nbase :]
    return rows is not None and rows.shape == folded.shape and bool(torch.equal(rows, folded))


def _fold_base(layer: Any, a: Any) -> int:
    """An ungrouped projection (o, down): its base weight (and bias) re-homed into a [out + rank, in] buffer
    whose first rows are the weight (a view: the same values) and last ones its A rows (_fold_rows)."""
    import torch

    base = layer.base_layer
    if not _rehomable(base):
        return 0
    rows = _fold_rows(base.weight, a)
    if rows is None:
        return 0
    n = base.weight.shape[0]
    with torch.no_grad():
        wfold = torch.cat([base.weight.detach(), rows])
        bfold = None if base.bias is None else torch.cat([base.bias.detach(), rows.new_zeros(rows.shape[0])])
        base.weight = torch.nn.Parameter(wfold[:n], requires_grad=False)
        if bfold is not None:
            base.bias = torch.nn.Parameter(bfold[:n], requires_grad=False)
    layer.register_buffer("_tl_wfold", wfold, persistent=False)
    layer.register_buffer("_tl_bfold", bfold, persistent=False)
    layer._tl_nbase = n
    return 1


def _fuse_base(lead: Any, members: list[Any], extra: Any = None) -> int:
    """Re-home the members' base weights (and biases) into one [sum of outputs, in] buffer, each member's
    weight a row-slice view of it (the same values, no extra memory), and put the buffer on the leader. 1 if
    done (or already done), 0 when the members are not plain 16-bit Linear layers of one dtype and device, or
    their output slices differ from the LoRA group's (_tl_start/_tl_stop index both). `extra` (the group's
    stacked A, TUNELAB_LORA_FOLD): rows appended below the members' (_fold_rows), the leader's `_tl_nbase`
    then says where they start."""
    import torch

    if getattr(lead, "_tl_wcat", None) is not None:
        return 1
    bases = [m.base_layer for m in members]
    if not all(_rehomable(b) for b in bases):
        return 0
    ws = [b.weight for b in bases]
    if len({(w.dtype, w.device, w.shape[1]) for w in ws}) != 1:
        return 0
    starts, at = [], 0
    for w in ws:
        starts.append((at, at + w.shape[0]))
        at += w.shape[0]
    if any((m._tl_start, m._tl_stop) != se for m, se in zip(members, starts)):
        return 0  # the LoRA group's output slices are the base slices too
    has_bias = [b.bias is not None for b in bases]
    if any(has_bias) and not all(has_bias):
        return 0
    rows = _fold_rows(ws[0], extra) if extra is not None else None
    if extra is not None and rows is None:
        return 0
    with torch.no_grad():
        wcat = torch.cat([w.detach() for w in ws] + ([rows] if rows is not None else []))
        bcat = torch.cat([b.bias.detach() for b in bases] + ([rows.new_zeros(rows.shape[0])] if rows is not None else [])) if all(has_bias) else None
        for b, (lo, hi) in zip(bases, starts):
            b.weight = torch.nn.Parameter(wcat[lo:hi], requires_grad=False)
            if bcat is not None:
                b.bias = torch.nn.Parameter(bcat[lo:hi], requires_grad=False)
    lead.register_buffer("_tl_wcat", wcat, persistent=False)
    lead.register_buffer("_tl_bcat", bcat, persistent=False)
    if rows is not None:
        lead._tl_nbase = at
    return 1


def _group(model: Any, router: AdapterRouter) -> list[tuple[Any, ...]]:
    """The q/k/v and gate/up groups (see _grouped_term): (leader, A_group, B_group, member count, [(member, (role,
    start, stop, last))]). A group needs its members to carry the same routed adapters with the same ranks."""
    import torch
    from peft.tuners.lora import LoraLayer

    plan = []
    for parent in model.modules():
        for names in GROUPS:
            members = [getattr(parent, n, None) for n in names]
            if not all(isinstance(m, LoraLayer) and m in router.members for m in members):
                continue
            if router.stacked is not None:
                parts = [router.stacked.weights[id(m)] for m in members]
            else:
                (name,) = router.names
                if not all(name in m.lora_A for m in members):
                    continue
                parts = [(m.lora_A[name].weight.detach(), m.lora_B[name].weight.detach()) for m in members]
            if len({(a.shape, a.dtype) for a, _ in parts}) != 1 or len({b.dtype for _, b in parts}) != 1:
                continue
            ga, gb = torch.cat([a for a, _ in parts]), torch.block_diag(*[b for _, b in parts])
            roles, start = [], 0
            for i, (m, (_, b)) in enumerate(zip(members, parts)):
                roles.append((m, (1 if i == 0 else 2, start, start + b.shape[0], i == len(members) - 1)))
                start += b.shape[0]
            plan.append((members[0], ga, gb, len(members), roles))
    return plan


class _Stacked:
    """The stacked form of several adapters: per layer (A_cat, B_cat), and row masks over the rank blocks."""

    def __init__(self, names, blocks, weights, max_rows, device) -> None:
        import torch

        self.names, self.blocks, self.weights = names, blocks, weights  # blocks: name -> (start, stop, scaling)
        width = max(stop for _, stop, _ in blocks.values())
        dtype = next(iter(weights.values()))[0].dtype
        self.masks = torch.zeros((max_rows, 1, width), dtype=dtype, device=device)
        self.one = torch.zeros((1, 1, width), dtype=dtype, device=device)
        # the same masks repeated once per member of a projection group (q/k/v: 3, gate/up: 2)
        parts = sorted({len(g) for g in GROUPS})
        self.tiled = {id(self.masks): {p: torch.zeros((max_rows, 1, width * p), dtype=dtype, device=device) for p in parts},
                      id(self.one): {p: torch.zeros((1, 1, width * p), dtype=dtype, device=device) for p in parts}}
        self.current: Any = None
        self.current_tiled: dict[int, Any] | None = None

    def fill(self, buf, row: int, adapter: str | None) -> None:
        """Row `row` of `buf` [rows, 1, width]: the adapter's rank block set to its scaling, zeros elsewhere."""
        buf[row] = 0.0
        if adapter is not None:
            start, stop, scaling = self.blocks[adapter]
            buf[row, :, start:stop] = scaling

    def set_row(self, buf, row: int, adapter: str | None) -> None:
        self.fill(buf, row, adapter)
        for p, tiled in self.tiled[id(buf)].items():
            tiled[row] = buf[row].repeat(1, p)


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
