"""Step-wise decoding over a static KV cache: the engine's fast decode path and the API server's continuous batching.

    dec = SlotDecoder(model, max_slots=8, max_len=2048, adapters=["default"])
    logits = dec.prefill(0, prompt_ids, adapter="default")    # [vocab] float32: the next-token logits of slot 0
    logits = dec.prefill_many([(1, ids_a, None), (2, ids_b, "default")])   # {slot: [vocab]}: several in one forward
    logits = dec.step({0: token})                              # {slot: [vocab]}: one token for every live slot
    dec.release(0)                                             # the slot is free for the next request

A slot is one row of a preallocated cache ([slots, kv_heads, max_len, head_dim] per layer). A request is
prefilled alone (a plain forward over its prompt with transformers' DynamicCache, exactly what `generate` runs
first) and its keys/values are copied into its row; from then on every `step` decodes one token for every live
slot at once, each at its own position (per-row position ids, a per-row write index into the cache, a boolean
mask over the cached positions). `prefill_many` prefills several prompts in one packed forward (back to back in
one row, a block-diagonal causal mask, per-prompt positions and per-token adapters, keys/values written straight
into each slot's row), which the API server uses for the prompts waiting together; its fp32 logits equal the
one-prompt prefill's to rounding (tested). A request joins at the next step after its prefill and leaves when released:
that is continuous batching, and it needs nothing from the model beyond the Cache protocol (`update`) and
transformers' 4-D mask pass-through.

Fast path (CUDA): the step runs over fixed shapes - a batch bucket (1, 2, 4, ... slots) x a length bucket (256,
512, ... cached positions) - so each bucket is captured once as a CUDA graph at start-up (`warmup`) and replayed:
one launch per token instead of thousands of kernel launches from Python. Capture happens before any request is
live because a capture pass writes into the cache rows. CPU (or `use_graphs=False`): the same step, eagerly, over
exactly the positions in use; a batch of one then runs without a mask, as `generate` does.

Inside the graphs the decoder layers run compiled (`_CompiledLayers`: torch.compile of the layer's forward, one
compiled graph for every layer, dynamic shapes), so the step's elementwise work fuses into a few kernels per layer;
4-bit layers with double quantization decode with their scales dequantized once (`_FlatAbsmax`). Both are on by
default on CUDA (TUNELAB_COMPILE_DECODE=0: graphs of the eager layers), and a failed compilation falls back to
those with its reason in `compile_error`. docs/serve.md has the measured effect.

Several LoRA adapters on one base: `AdapterRouter` (tunelab.infer.adapters) gives every row its own adapter
inside one forward pass.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import time
from typing import Any, Iterator, Sequence

from tunelab.errors import ModelError
from tunelab.infer.adapters import AdapterRouter, lever

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
AHEAD_MAX = 64  # the most decode steps step_ahead runs between two host syncs
MIN_LEN_BUCKET = 256


def _bucket(n: int, buckets: Sequence[int]) -> int:
    return next(b for b in buckets if b >= n)


def length_buckets(max_len: int) -> tuple[int, ...]:
    """Cached-length buckets: powers of two from 256, ending exactly at max_len."""
    out, b = [], MIN_LEN_BUCKET
    while b < max_len:
        out.append(b)
        b *= 2
    return (*out, max_len)


def _layers(cache: Any) -> list[Any]:
    """The per-layer key/value holders of a prefilled DynamicCache (each with .keys / .values [1, heads, n, dim])."""
    return [layer for layer in cache.layers if getattr(layer, "keys", None) is not None and layer.keys.numel()]


class _SlotCache:
    """The transformers Cache protocol over views of the slot buffers: `update` writes this step's key/value of
    each row at that row's own position and returns the whole (bucketed) cache for attention."""

    is_compileable = False

    def __init__(self, keys: list[Any], values: list[Any], rows: Any, pos: Any) -> None:
        self.keys, self.values, self.rows, self.pos = keys, values, rows, pos  # rows: arange [n]; pos: [n] write positions

    def update(self, key_states, value_states, layer_idx: int, *args: Any, **kwargs: Any):
        return _write(self.keys[layer_idx], self.values[layer_idx], self.rows, self.pos, key_states, value_states)

    def layer(self, layer_idx: int) -> "_LayerCache":
        return _LayerCache(self.keys[layer_idx], self.values[layer_idx], self.rows, self.pos)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # never consulted: position ids are always given


class _LayerCache(_SlotCache):
    """One layer's slice of the slot cache; `update` ignores the layer index, so one compiled decoder layer (which
    would otherwise specialise on that index) serves every layer."""

    def __init__(self, keys: Any, values: Any, rows: Any, pos: Any) -> None:
        self.keys, self.values, self.rows, self.pos = keys, values, rows, pos

    def update(self, key_states, value_states, layer_idx: int, *args: Any, **kwargs: Any):
        return _write(self.keys, self.values, self.rows, self.pos, key_states, value_states)


class _PackedCache:
    """The Cache protocol for a packed prefill (several prompts back to back in one row): `update` writes every
    token's key/value into its own slot's row at its own position (one index_put_ per layer) and hands attention
    the packed keys/values themselves (the block-diagonal mask keeps the prompts apart)."""

    is_compileable = False

    def __init__(self, keys: list[Any], values: list[Any], slots: Any, pos: Any) -> None:
        self.keys, self.values, self.slots, self.pos = keys, values, slots, pos  # slots, pos: [tokens]

    def update(self, key_states, value_states, layer_idx: int, *args: Any, **kwargs: Any):
        self.keys[layer_idx][self.slots, :, self.pos] = key_states[0].transpose(0, 1)
        self.values[layer_idx][self.slots, :, self.pos] = value_states[0].transpose(0, 1)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # never consulted: position ids are always given


class _PrefillCache(_SlotCache):
    """The Cache protocol for a compiled one-prompt prefill (the `compile_prefill` lever): `update` writes the
    prompt's keys/values into its slot's row (positions 0..n-1; the slot an index tensor, so one compiled graph
    serves every slot) and hands attention the prompt's own keys/values: causal attention over the prompt, as
    generate's prefill."""

    def __init__(self, keys: list[Any], values: list[Any], slot: Any) -> None:
        self.keys, self.values, self.slot = keys, values, slot  # slot: long tensor [1]

    def update(self, key_states, value_states, layer_idx: int, *args: Any, **kwargs: Any):
        return _prefill_write(self.keys[layer_idx], self.values[layer_idx], self.slot, key_states, value_states)

    def layer(self, layer_idx: int) -> "_PrefillLayerCache":
        return _PrefillLayerCache(self.keys[layer_idx], self.values[layer_idx], self.slot)


class _PrefillLayerCache(_PrefillCache):
    """One layer's slice of a _PrefillCache (ignores the layer index, as _LayerCache)."""

    def __init__(self, keys: Any, values: Any, slot: Any) -> None:
        self.keys, self.values, self.slot = keys, values, slot

    def update(self, key_states, value_states, layer_idx: int, *args: Any, **kwargs: Any):
        return _prefill_write(self.keys, self.values, self.slot, key_states, value_states)


def _prefill_write(keys, values, slot, key_states, value_states):
    n = key_states.shape[2]
    keys[:, :, :n].index_copy_(0, slot, key_states)
    values[:, :, :n].index_copy_(0, slot, value_states)
    return key_states, value_states


def _write(keys, values, rows, pos, key_states, value_states):
    # row r, every head, position pos[r]: one index_put_ kernel each, an op the compiler updates in place
    keys[rows, :, pos] = key_states[:, :, 0]
    values[rows, :, pos] = value_states[:, :, 0]
    return keys, values


def _decoder_layers(lm: Any) -> list[Any]:
    """The model's repeated decoder layers (the ModuleList of *DecoderLayer modules), or [] if it has none."""
    import torch

    for module in lm.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and type(module[0]).__name__.endswith("DecoderLayer"):
            if all(type(m) is type(module[0]) for m in module):
                return list(module)
    return []


class _FlatAbsmax:
    """4-bit layers with double quantization store their per-block scales (absmax) in 8 bits, and bitsandbytes
    dequantizes them (two kernels: dequantize_blockwise, + offset) in every forward before its 4-bit GEMV. Decode
    steps run 7 such projections per layer for one token, so those two kernels are ~2/3 of the 4-bit work's
    launches. Here the float32 scales are computed once (the same kernels, so the same values: the output is
    unchanged) and swapped in during decode steps: +4 bytes per 64 weights (~0.4 GB for a 7B model)."""

    def __init__(self, lm: Any, devices: Sequence[str] = ("cuda",)) -> None:
        # CUDA only by default: bitsandbytes' CPU layer repacks its weights and scales at the first forward
        self.swaps: list[tuple[Any, Any, Any]] = []
        for module in lm.modules():
            weight = getattr(module, "weight", None)
            state = getattr(weight, "quant_state", None)
            if type(module).__name__ != "Linear4bit" or state is None or not getattr(state, "nested", False):
                continue
            if weight.device.type not in devices or any(weight is w for w, _, _ in self.swaps):  # PEFT's LoRA wrapper shows its base layer's weight too
                continue
            from bitsandbytes.functional import QuantState, dequantize_blockwise

            absmax = dequantize_blockwise(state.absmax, state.state2) + state.offset  # as bitsandbytes' gemv_4bit
            flat = QuantState(absmax=absmax, shape=state.shape, code=state.code, blocksize=state.blocksize,
                              quant_type=state.quant_type, dtype=state.dtype)
            self.swaps.append((weight, state, flat))

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        for weight, _, flat in self.swaps:
            weight.quant_state = flat
        try:
            yield
        finally:
            for weight, state, _ in self.swaps:
                weight.quant_state = state


PACKED_GQA = "tunelab_packed_gqa"


def _packed_gqa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """Decode-step attention (one query token per row) without repeating the keys/values for every query head:
    the query heads that share a key/value head become that head's query positions (q [b, h, 1, d] -> [b, kv,
    h/kv, d]) in one SDPA call over the cached keys/values as they are (the mask [b, 1, 1, w] broadcasts over
    them). The same softmax per row and head as SDPA over repeated keys/values (transformers' own decode path
    does this outside torch.compile, `pack_gqa`), without repeat_kv's copy of K and V per query head (at batch 32
    x 512 positions ~235 MB per layer for a 7B). Anything else goes to transformers' SDPA attention."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, h, q, d = query.shape
    kv = key.shape[1]
    mask = attention_mask
    simple = q == 1 and kv != h and h % kv == 0 and not dropout and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
    if not simple or (mask is not None and (mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    if mask is not None:
        mask = mask[..., : key.shape[-2]]
    out = torch.nn.functional.scaled_dot_product_attention(query.reshape(b, kv, h // kv, d), key, value, attn_mask=mask,
                                                           dropout_p=0.0, scale=scaling, is_causal=False)
    return out.reshape(b, h, 1, d).transpose(1, 2).contiguous(), None


DECODE_KERNEL = "tunelab_decode_kernel"
DECODE_ATTN_DEFAULT = True  # TUNELAB_DECODE_ATTN unset: CUDA decoders use the Triton decode attention (measured 2026-12-02, docs/serve.md)


def _decode_kernel_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """Decode-step attention through tunelab's split-K Triton kernel (model/fast/decode_attn.py; the
    TUNELAB_DECODE_ATTN lever): one query token per row against the cached keys/values where they lie, under
    the decoder's boolean mask. Anything it does not cover goes to the packed-GQA SDPA path."""
    import torch

    from tunelab.model.fast import decode_attn

    mask = attention_mask
    simple = (query.shape[2] == 1 and not dropout and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
              and kwargs.get("sliding_window") is None and decode_attn.supported(query, key))
    if not simple or (mask is not None and (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1)):
        return _packed_gqa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    return decode_attn.decode_attention(query, key, value, mask, scaling), None


def _register_packed_gqa() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_GQA, _packed_gqa_attention)
    AttentionInterface.register(DECODE_KERNEL, _decode_kernel_attention)


class _CompiledLayers:
    """`torch.compile` of one decoder layer's forward, shared by every layer (regional compilation): the eager
    kernels of a decode step (RMSNorm in float32, rotary embedding, SwiGLU, residual adds, the LoRA casts and
    scales) fuse into a few Triton kernels per layer, and the graph captured around it holds those. It is active
    only inside decode steps: prefills and plain `generate` on the same model run the eager layers."""

    def __init__(self, layers: list[Any], mode: str | None, backend: str = "inductor") -> None:
        import torch

        self.layers = layers
        # one entry per (batch 1 or more, dtype, router) combination, all layers sharing each: well under 64
        config = torch._dynamo.config
        for name, least in (("recompile_limit", 64), ("cache_size_limit", 64), ("accumulated_recompile_limit", 512), ("accumulated_cache_size_limit", 512)):
            if isinstance(getattr(config, name, None), int):
                setattr(config, name, max(getattr(config, name), least))
        # dynamic=True: one compilation serves every batch and length bucket (batch 1 is specialised apart)
        dynamic = os.environ.get("TUNELAB_COMPILE_DYNAMIC", "1") != "0" or None
        options = None
        if backend == "inductor" and mode is None:
            import torch._inductor.config as inductor_config

            # round to bf16/fp16 wherever the eager layer does (e.g. the residual sum before RMSNorm), so the
            # fused kernels compute what eager computes and greedy tokens stay plain generate's
            if hasattr(inductor_config, "emulate_precision_casts"):
                options = {"emulate_precision_casts": True}
        self.fn = torch.compile(type(layers[0]).forward, mode=mode, dynamic=dynamic, backend=backend, options=options)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        for i, layer in enumerate(self.layers):
            layer.forward = functools.partial(_layer_step, self.fn, i, layer)
        try:
            yield
        finally:
            for layer in self.layers:
                layer.__dict__.pop("forward", None)


def _layer_step(fn: Any, index: int, layer: Any, *args: Any, **kwargs: Any):
    """Eager shim around the compiled layer: hands it its own layer's cache (see _LayerCache)."""
    for kw in ("cache", "past_key_values"):
        cache = kwargs.get(kw)
        if isinstance(cache, _SlotCache) and not isinstance(cache, (_LayerCache, _PrefillLayerCache)):
            kwargs[kw] = cache.layer(index)
    return fn(layer, *args, **kwargs)


class SlotDecoder:
    """A static KV cache of `max_slots` rows x `max_len` positions, prefilled per request and decoded in steps."""

    def __init__(
        self,
        model: Any,
        *,
        max_slots: int,
        max_len: int,
        adapters: Sequence[str] = (),
        use_graphs: bool | None = None,
        compile: bool | None = None,
        compile_backend: str = "inductor",
        pad_token_id: int = 0,
        ahead: bool = False,
    ) -> None:
        import torch

        self.model = model
        self.lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # LoRA lives in its modules
        self.device = model.get_input_embeddings().weight.device
        self.max_slots, self.max_len = int(max_slots), int(max_len)
        if self.max_slots < 1 or self.max_len < 2:
            raise ModelError(f"a slot decoder needs at least 1 slot and 2 positions (got {max_slots} and {max_len}).")
        self.batch_buckets = tuple(b for b in BATCH_BUCKETS if b < self.max_slots) + (self.max_slots,)
        self.len_buckets = length_buckets(self.max_len)
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else bool(use_graphs and self.device.type == "cuda")
        self.router = AdapterRouter(model, list(adapters), self.max_slots, self.device) if adapters else None
        self.pad_token_id = pad_token_id
        self.lengths: dict[int, int] = {}  # live slot -> cached positions
        self.keys: list[Any] = []
        self.values: list[Any] = []
        self.layer_types = sorted(set(getattr(self.lm.config, "layer_types", None) or ["full_attention"]))
        self.ids_buf = torch.zeros((self.max_slots, 1), dtype=torch.long, device=self.device)
        self.pos_buf = torch.zeros((self.max_slots, 1), dtype=torch.long, device=self.device)
        self.row_ids = torch.arange(self.max_slots, device=self.device)
        # step_ahead (the engine's greedy loop, TUNELAB_DECODE_AHEAD): the pick inside the step, so several steps
        # run between two host syncs; its own graphs (ahead_graphs) end with the pick
        self.ahead = bool(ahead)
        self.ahead_graphs: dict[tuple[int, int], tuple[Any, Any]] = {}
        if self.ahead:
            vocab = getattr(self.lm.get_output_embeddings(), "out_features", None) or self.lm.config.vocab_size
            self.count_buf = torch.zeros(self.max_slots, dtype=torch.long, device=self.device)  # tokens so far per row
            self.min_buf = torch.zeros(self.max_slots, dtype=torch.long, device=self.device)  # min_tokens per row
            self.stop_mask = torch.zeros(vocab, dtype=torch.bool, device=self.device)  # the stop ids
            self.tok_out = torch.zeros((self.max_slots, AHEAD_MAX), dtype=torch.long, device=self.device)
            self.step_idx = torch.zeros(1, dtype=torch.long, device=self.device)
            self._stops_key: tuple[int, ...] | None = None
        self.arange = torch.arange(self.max_len, device=self.device)
        self.graphs: dict[tuple[int, int], tuple[Any, Any]] = {}
        self.graph_error: str | None = None
        self.compiled: _CompiledLayers | None = None
        self.flat: _FlatAbsmax | None = None  # built at the first step (the weights are on their device by then)
        self.compile_error: str | None = None
        self.warmup_seconds = 0.0
        if compile is None:  # default: on wherever graphs are (TUNELAB_COMPILE_DECODE=0 turns it off)
            compile = self.use_graphs and os.environ.get("TUNELAB_COMPILE_DECODE", "1") != "0"
        if compile:  # explicitly True without graphs: compiled eager steps (how the CPU tests check the compiled code)
            layers = _decoder_layers(self.lm)
            try:
                if not layers:
                    raise ModelError("no repeated *DecoderLayer modules found")
                self.compiled = _CompiledLayers(layers, os.environ.get("TUNELAB_COMPILE_MODE") or None, compile_backend)
            except Exception as exc:  # no compiler here: the eager step (still graphed on CUDA)
                self.compile_error = _error(exc)
                logger.warning("not compiling the decode step: %s", self.compile_error)
        # transformers 5.2x names the forward's cache argument `cache` (older: `past_key_values`, still accepted
        # there with a warning per call): pass it by the name this version declares.
        attn = getattr(self.lm.config, "_attn_implementation", None) or "sdpa"
        if attn not in ("sdpa", "eager"):
            raise ModelError(f"the slot decoder (static KV cache) needs sdpa or eager attention; this model uses {attn}: set flash_attn: sdpa.")
        self.additive_mask = attn == "eager"
        # decode steps' attention without repeat_kv (docs/serve.md): on by default on CUDA, TUNELAB_PACK_GQA=0 off
        self.pack_gqa = attn == "sdpa" and lever("TUNELAB_PACK_GQA", self.device)
        # decode steps' attention through the split-K Triton kernel (TUNELAB_DECODE_ATTN=1; off by default: not
        # measured yet), in place of the packed-GQA SDPA call
        self.decode_kernel = self.pack_gqa and lever("TUNELAB_DECODE_ATTN", self.device, cuda_default=DECODE_ATTN_DEFAULT) and _triton_ok()
        # one-prompt prefills through the compiled layer (on by default where the layers are compiled, i.e. CUDA:
        # measured first token 24-27 ms against 36-49 eager at 7B; TUNELAB_COMPILE_PREFILL=0 off)
        self.compile_prefill = self.compiled is not None and lever("TUNELAB_COMPILE_PREFILL", self.device)
        if self.pack_gqa:
            try:
                _register_packed_gqa()
            except Exception as exc:
                self.pack_gqa = self.decode_kernel = False
                logger.warning("packed-GQA decode attention unavailable: %s", _error(exc))
        self.dtype = self.lm.get_input_embeddings().weight.dtype
        params = inspect.signature(type(self.lm).forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"

    # ----- slots ----------------------------------------------------------------------------------------------
    @property
    def free_slots(self) -> list[int]:
        return [s for s in range(self.max_slots) if s not in self.lengths]

    def release(self, slot: int) -> None:
        self.lengths.pop(slot, None)
        if self.router is not None:
            self.router.set_row(slot, None)

    def _allocate(self, like: Any) -> None:
        """Cache buffers shaped after the first prefill's keys/values ([1, kv_heads, n, head_dim] per layer)."""
        import torch

        for layer in _layers(like):
            _, heads, _, dim = layer.keys.shape
            self.keys.append(torch.zeros((self.max_slots, heads, self.max_len, dim), dtype=layer.keys.dtype, device=self.device))
            self.values.append(torch.zeros((self.max_slots, heads, self.max_len, layer.values.shape[-1]), dtype=layer.values.dtype, device=self.device))

    # ----- prefill --------------------------------------------------------------------------------------------
    def prefill(self, slot: int, prompt: Sequence[int], adapter: str | None = None):
        """Run the prompt into `slot` (with `adapter`, None = the base) and return its next-token logits."""
        import torch
        from transformers import DynamicCache

        if slot in self.lengths:
            raise ModelError(f"slot {slot} is in use.")
        n = len(prompt)
        if not 0 < n < self.max_len:
            raise ModelError(f"a prompt of {n} tokens does not fit the decoder's context of {self.max_len} positions.")
        if self.router is not None:
            self.router.check(adapter)
        ids = torch.tensor([list(prompt)], dtype=torch.long, device=self.device)
        if self.compile_prefill and self.keys and self.compiled is not None and self.layer_types == ["full_attention"]:
            return self._compiled_prefill(slot, ids, adapter)
        cache = DynamicCache(config=self.lm.config)
        with torch.inference_mode(), self._route(adapter=adapter):
            out = self.lm(input_ids=ids, use_cache=True, logits_to_keep=1, **{self.cache_kw: cache})
        if not self.keys:
            self._allocate(cache)
        for i, layer in enumerate(_layers(cache)):
            self.keys[i][slot, :, :n] = layer.keys[0]
            self.values[i][slot, :, :n] = layer.values[0]
        self.lengths[slot] = n
        if self.router is not None:
            self.router.set_row(slot, adapter)
        return out.logits[0, -1].float()

    def _compiled_prefill(self, slot: int, ids: Any, adapter: str | None):
        """The one-prompt prefill through the compiled decoder layer: no attention mask (SDPA's causal kernel, as
        generate's prefill), positions 0..n-1, keys/values written straight into the slot's row (_PrefillCache)."""
        import torch

        n = ids.shape[1]
        with torch.inference_mode(), self._route(adapter=adapter), self.compiled.active():
            # the slot index made in inference mode whoever calls (warm-up or a request under inference_mode):
            # the compiled graph guards on the tensor's kind and would otherwise compile twice
            cache = _PrefillCache(self.keys, self.values, torch.tensor([slot], device=self.device))
            out = self.lm(input_ids=ids, position_ids=self.arange[:n].view(1, n), attention_mask={t: None for t in self.layer_types},
                          use_cache=True, logits_to_keep=1, **{self.cache_kw: cache})
        self.lengths[slot] = n
        if self.router is not None:
            self.router.set_row(slot, adapter)
        return out.logits[0, -1].float()

    def prefill_many(self, items: Sequence[tuple[int, Sequence[int], str | None]]) -> dict[int, Any]:
        """Prefill several prompts in ONE forward: items are (slot, prompt, adapter); returns {slot: next-token
        logits}. The prompts are packed back to back into one row (no padding), with per-token position ids (each
        prompt counts from 0), a block-diagonal causal mask (a token sees only its own prompt's earlier tokens)
        and per-token adapter routing; each layer's keys/values are written straight into their slots' rows,
        and logits are computed only at each prompt's last token. So every prompt sees what its own prefill
        would see. A single item, a model with sliding-window layers (the mask here is full attention) or the
        very first prefill (it allocates the cache) runs the one-prompt `prefill`."""
        import torch

        items = [(int(s), list(p), a) for s, p, a in items]
        seen: set[int] = set()
        for slot, prompt, adapter in items:
            if slot in self.lengths or slot in seen:
                raise ModelError(f"slot {slot} is in use.")
            seen.add(slot)
            if not 0 < len(prompt) < self.max_len:
                raise ModelError(f"a prompt of {len(prompt)} tokens does not fit the decoder's context of {self.max_len} positions.")
            if self.router is not None:
                self.router.check(adapter)
        if len(items) < 2 or not self.keys or self.layer_types != ["full_attention"]:
            return {slot: self.prefill(slot, prompt, adapter) for slot, prompt, adapter in items}
        lengths = [len(p) for _, p, _ in items]
        total = sum(lengths)
        dev = self.device
        counts = torch.tensor(lengths, device=dev)
        ids = torch.tensor([[t for _, p, _ in items for t in p]], dtype=torch.long, device=dev)
        starts = torch.cumsum(counts, 0) - counts  # where each prompt begins in the packed row
        seg = torch.arange(len(items), device=dev).repeat_interleave(counts)  # prompt index of every token
        pos = torch.arange(total, device=dev) - starts[seg]  # position of every token within its prompt
        slots = torch.tensor([s for s, _, _ in items], device=dev)[seg]
        mask = (seg.view(-1, 1) == seg.view(1, -1)) & (pos.view(1, -1) <= pos.view(-1, 1))  # [query, key]
        mask = mask.view(1, 1, total, total)
        if self.additive_mask:
            mask = torch.zeros(mask.shape, dtype=self.dtype, device=dev).masked_fill(~mask, torch.finfo(self.dtype).min)
        cache = _PackedCache(self.keys, self.values, slots, pos)
        last = starts + counts - 1
        route = self.router.tokens([a for _, _, a in items], lengths) if self.router is not None else contextlib.nullcontext()
        with torch.inference_mode(), route:
            out = self.lm(input_ids=ids, position_ids=pos.view(1, -1), attention_mask={t: mask for t in self.layer_types},
                          use_cache=True, logits_to_keep=last, **{self.cache_kw: cache})
        logits = out.logits[0].float()
        result = {}
        for i, (slot, prompt, adapter) in enumerate(items):
            self.lengths[slot] = len(prompt)
            if self.router is not None:
                self.router.set_row(slot, adapter)
            result[slot] = logits[i]
        return result

    def _route(self, *, adapter: str | None = None, rows: int | None = None):
        import contextlib

        if self.router is None:
            return contextlib.nullcontext()
        return self.router.prefill(adapter) if rows is None else self.router.rows(rows)

    # ----- decode ---------------------------------------------------------------------------------------------
    def step(self, tokens: dict[int, int]) -> dict[int, Any]:
        """Feed one token to every live slot; returns each slot's next-token logits (float32 [vocab])."""
        slots, logits = self.step_batch(tokens)
        return {s: logits[i] for i, s in enumerate(slots)}

    def step_batch(self, tokens: dict[int, int]) -> tuple[list[int], Any]:
        """`step` for the scheduler: (the live slots in order, their float32 logits [len(slots), vocab] as one
        tensor). No device sync here: the first read of the logits waits for the step (one sync per step, in
        the caller's argmax), and the rows come from a slice when the live slots are 0..n-1."""
        import torch

        if set(tokens) != set(self.lengths):
            raise ModelError(f"step needs one token for every live slot {sorted(self.lengths)}, got {sorted(tokens)}.")
        if not tokens:
            return [], None
        slots = sorted(tokens)
        need = max(self.lengths[s] for s in slots) + 1
        if need > self.max_len:
            raise ModelError(f"a sequence reached the decoder's context of {self.max_len} positions.")
        rows = _bucket(slots[-1] + 1, self.batch_buckets)
        ids = [self.pad_token_id] * rows
        pos = [0] * rows  # free rows write at position 0 of their own (unused) row
        for s in slots:
            ids[s], pos[s] = tokens[s], self.lengths[s]
        host = torch.tensor([ids, pos], dtype=torch.long)
        self.ids_buf[:rows, 0].copy_(host[0], non_blocking=True)
        self.pos_buf[:rows, 0].copy_(host[1], non_blocking=True)
        with torch.inference_mode():
            if self.use_graphs and self.graphs:
                width = _bucket(need, self.len_buckets)
                graph, out = self.graphs[(rows, width)]
                graph.replay()
            else:
                out = self._forward(rows, need, masked=rows > 1, compiled=True)
            if slots[-1] == len(slots) - 1:  # slots 0..n-1: a slice, no index tensor to copy
                picked = out[: len(slots)]
            else:
                picked = out[torch.tensor(slots).to(self.device, non_blocking=True)]
            picked = picked.float() if picked.dtype != torch.float32 else picked.clone()
        for s in slots:
            self.lengths[s] += 1
        return slots, picked

    def step_ahead(self, tokens: dict[int, int], k: int, *, counts: dict[int, int], min_tokens: dict[int, int],
                   stop_ids: Sequence[int]) -> tuple[list[int], list[list[int]]]:
        """k greedy decode steps for every live slot with no host sync in between: each step picks its rows' next
        tokens on the device (argmax of the logits, the stop ids forbidden while a row has fewer than its
        `min_tokens` tokens: what choose_batch picks) and feeds them to the next step (on CUDA a replay of the
        ahead graph, which ends with that pick). `tokens`: each live slot's last token; `counts`: its tokens so
        far. Returns (slots, tokens[i]: the k tokens of slots[i]); every live slot advances k positions, so the
        caller truncates at a stop token or its length and releases the row (the steps after a row's end were
        decoded and are discarded). Only for plain greedy rows (sampling and penalties need the host)."""
        import torch

        if not self.ahead:
            raise ModelError("step_ahead needs a decoder built with ahead=True.")
        if set(tokens) != set(self.lengths):
            raise ModelError(f"step_ahead needs one token for every live slot {sorted(self.lengths)}, got {sorted(tokens)}.")
        k = int(k)
        if not tokens or not 1 <= k <= AHEAD_MAX:
            raise ModelError(f"step_ahead needs live slots and 1 <= k <= {AHEAD_MAX} (k={k}).")
        slots = sorted(tokens)
        start = max(self.lengths[s] for s in slots)
        if start + k > self.max_len:
            raise ModelError(f"a sequence would pass the decoder's context of {self.max_len} positions.")
        rows = _bucket(slots[-1] + 1, self.batch_buckets)
        host = [[self.pad_token_id] * rows, [0] * rows, [0] * rows, [0] * rows]  # ids, positions, counts, min_tokens
        for s in slots:
            host[0][s], host[1][s], host[2][s], host[3][s] = tokens[s], self.lengths[s], counts.get(s, 0), min_tokens.get(s, 0)
        host = torch.tensor(host, dtype=torch.long)
        self.ids_buf[:rows, 0].copy_(host[0], non_blocking=True)
        self.pos_buf[:rows, 0].copy_(host[1], non_blocking=True)
        self.count_buf[:rows].copy_(host[2], non_blocking=True)
        self.min_buf[:rows].copy_(host[3], non_blocking=True)
        self.step_idx.zero_()
        key = tuple(int(t) for t in stop_ids)
        if key != self._stops_key:
            self.stop_mask.zero_()
            if key:
                self.stop_mask[torch.tensor(key, device=self.device)] = True
            self._stops_key = key
        with torch.inference_mode():
            for j in range(k):
                need = start + j + 1
                if self.use_graphs and self.ahead_graphs:
                    self.ahead_graphs[(rows, _bucket(need, self.len_buckets))][0].replay()
                else:
                    self._pick_ahead(rows, self._forward(rows, need, masked=rows > 1, compiled=True))
            got = self.tok_out[:rows, :k].tolist()  # the one sync of the k steps
        for s in slots:
            self.lengths[s] += k
        return slots, [got[s] for s in slots]

    def _pick_ahead(self, rows: int, logits: Any) -> None:
        """The device-side greedy pick of step_ahead (captured at the end of each ahead graph)."""
        import torch

        held = (self.count_buf[:rows] < self.min_buf[:rows]).view(rows, 1) & self.stop_mask.view(1, -1)
        nxt = torch.where(held, float("-inf"), logits).argmax(-1)  # the argmax of the bf16 logits = of their float32 copy
        self.ids_buf[:rows, 0].copy_(nxt)
        self.pos_buf[:rows, 0].add_(1)
        self.count_buf[:rows].add_(1)
        self.tok_out[:rows].index_copy_(1, self.step_idx, nxt.view(rows, 1))
        self.step_idx.add_(1)

    def _forward(self, rows: int, width: int, *, masked: bool = True, compiled: bool = False):
        """One decode step of the first `rows` slots over `width` cached positions -> logits [rows, vocab]."""
        import torch

        ids, pos = self.ids_buf[:rows], self.pos_buf[:rows]
        cache = _SlotCache([k[:rows, :, :width] for k in self.keys], [v[:rows, :, :width] for v in self.values], self.row_ids[:rows], pos.view(rows))
        mask = None  # unmasked: one row over exactly its cached positions (as generate's decode step)
        if masked:
            mask = (self.arange[:width].view(1, width) <= pos).view(rows, 1, 1, width)
            if self.additive_mask:  # eager attention adds its mask: 0 where attended, the dtype's minimum elsewhere
                mask = torch.zeros(mask.shape, dtype=self.dtype, device=self.device).masked_fill(~mask, torch.finfo(self.dtype).min)
        mask = {t: mask for t in self.layer_types}  # a dict is used as given: no mask building from the cache
        layers = self.compiled.active() if compiled and self.compiled is not None else contextlib.nullcontext()
        with self._route(rows=rows), layers, self._flat_absmax(), self._decode_attention():
            out = self.lm(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=True, **{self.cache_kw: cache})
        return out.logits[:, -1]

    @contextlib.contextmanager
    def _decode_attention(self) -> Iterator[None]:
        """During a decode step (with the pack_gqa lever): the packed-GQA attention in place of SDPA's (with the
        decode_kernel lever too: the Triton kernel's)."""
        if not self.pack_gqa:
            yield
            return
        config = self.lm.config
        before = config._attn_implementation
        config._attn_implementation = DECODE_KERNEL if self.decode_kernel else PACKED_GQA
        try:
            yield
        finally:
            config._attn_implementation = before

    def _flat_absmax(self):
        import torch

        if self.flat is None:
            with torch.inference_mode():
                self.flat = _FlatAbsmax(self.lm)
        return self.flat.active() if self.flat.swaps else contextlib.nullcontext()

    # ----- CUDA graphs ----------------------------------------------------------------------------------------
    def warmup(self, dummy_prompt: Sequence[int] = (0, 0)) -> None:
        """Allocate the cache and (CUDA) capture one graph per (batch, length) bucket. Call with no live slot."""
        import torch

        if self.lengths:
            raise ModelError("warmup needs an idle decoder (a capture pass writes into every cache row).")
        if not self.keys:
            self.prefill(0, list(dummy_prompt))
            self.release(0)
        if self.compile_prefill:  # compile the prefill now, not at the first request (dynamic prompt length)
            # two lengths: dynamo compiles the first prompt length it sees as a constant and recompiles with a
            # symbolic length at the next one (seen on the CPU, transformers 5.24): both compilations here
            for reps in (8, 12):
                try:
                    self.prefill(0, list(dummy_prompt) * reps)
                except Exception as exc:
                    self.compile_prefill = False
                    logger.warning("compiled prefill failed (%s); prefilling eagerly", _error(exc))
                self.release(0)
                if not self.compile_prefill:
                    break
        if not self.use_graphs or self.graphs:
            return
        t = time.perf_counter()
        logger.info("decoder: capturing %d CUDA graphs%s", len(self.batch_buckets) * len(self.len_buckets),
                    " of the compiled decoder layer (compiling first: tens of seconds, once)" if self.compiled is not None else "")
        try:
            self._capture_all()
        except Exception as exc:
            if self.compiled is None:  # an op that cannot be captured (a host sync in some layer): decode eagerly
                self.use_graphs = False
                self.graph_error = _error(exc)
                logger.warning("CUDA graph capture failed (%s); decoding without graphs", self.graph_error)
            else:  # the compiled layers failed (compiler or capture): graphs of the eager layers instead
                self.compiled, self.compile_error = None, _error(exc)
                logger.warning("compiling the decode step failed (%s); capturing the eager step", self.compile_error)
                torch.cuda.synchronize()
                self.warmup_seconds += time.perf_counter() - t
                return self.warmup(dummy_prompt)
        self.warmup_seconds += time.perf_counter() - t
        logger.info("decoder: %d CUDA graphs captured (batch %s x length %s, compiled layers: %s) in %.1f s", len(self.graphs),
                    self.batch_buckets, self.len_buckets, self.compiled is not None, self.warmup_seconds)

    def _capture_all(self) -> None:
        import torch

        pool = torch.cuda.graph_pool_handle()
        try:
            with torch.inference_mode():
                for rows in reversed(self.batch_buckets):  # largest first: the shared pool is sized once
                    for width in reversed(self.len_buckets):
                        self.graphs[(rows, width)] = self._capture(rows, width, pool)
                        if self.ahead:
                            self.ahead_graphs[(rows, width)] = self._capture(rows, width, pool, ahead=True)
        except Exception:
            self.graphs.clear()
            self.ahead_graphs.clear()
            torch.cuda.synchronize()
            raise

    def _capture(self, rows: int, width: int, pool: Any, ahead: bool = False):
        import torch

        def reset() -> None:  # a pass moves the positions (and the ahead pick's counters): start each from zero
            self.ids_buf.zero_()
            self.pos_buf.zero_()
            if ahead:
                for buf in (self.count_buf, self.min_buf, self.step_idx):
                    buf.zero_()

        def run():
            out = self._forward(rows, width, compiled=True)
            if ahead:
                self._pick_ahead(rows, out)
            return out

        reset()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up passes: compilation, lazy inits and library handles happen outside the capture
                reset()
                run()
        torch.cuda.current_stream().wait_stream(side)
        reset()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = run()
        return graph, out


def _triton_ok() -> bool:
    from tunelab.model.fast import decode_attn

    if decode_attn.triton is None:
        logger.warning("TUNELAB_DECODE_ATTN: the 'triton' package cannot be imported; decode attention stays SDPA's")
        return False
    return True


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
