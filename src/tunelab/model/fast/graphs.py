"""CUDA graphs over the offloaded layers' compiled calls, for steps too small to keep the GPU busy (a host lever).

    graphs = LayerGraphs()                                   # one per model: static buffers and one memory pool
    out = graphs.forward(layer, run, hidden, first_pass)     # None: not (yet) graphed, the caller runs the call
    grad = graphs.backward(layer, run, hidden, grad_out, autocast)   # the same; fills the LoRA parameters' .grad

At 1 x 1024 tokens the 7B step is bound by the host (docs/fastpath.md: kernels busy 95 of 414 ms in run 22's
profile): per layer and step the offload makes three compiled calls (the first pass, the recompute, the backward),
each costing the Python of inductor's wrapper (~1 ms a call under the profiler), dynamo's guards and the
dequantize ops' launches. Here each layer's first pass and its recompute-plus-backward are captured once per shape
as CUDA graphs and replayed: a layer then costs the host a few launches (the inputs copied into static buffers,
the replay, the outputs copied out), whatever the graph holds.

How, and what it costs:
* A call is captured the second time its signature is seen for that layer (the first runs the compiled call as
  before and compiles it); the signature is the hidden states' shape / dtype / strides, the layer's keyword
  tensors' (position embeddings, mask, ...), its other keyword values, autocast and the offload's switches. At most
  MAX_SIGNATURES per layer; further signatures run uncaptured.
* Each capture runs its body once on a side stream first (lazy initialisation outside the capture), then captures
  it into one memory pool that every layer's graphs share (they replay one at a time on one stream, so one layer's
  intermediates may reuse another's). The pool's memory is reserved for the graphs; `pool_bytes()` reports it and
  the bench adds it to the peak it reports (replays allocate nothing, so max_memory_allocated alone would miss it).
* Inputs: the hidden states and the gradient from above are copied into static buffers (shared by all layers of
  one shape); the keyword tensors into shared static buffers, copied only when a call passes a different tensor
  than the last one copied (all layers of a step pass the same position embeddings). Outputs: the layer output and
  the input gradient are copied inside the graph into shared static buffers and cloned out (the next layer's
  replay overwrites them); the LoRA gradients stay in the graph's own tensors and become the parameters' .grad
  (no copy) when .grad is None, or are added to it (one _foreach_add_); a .grad still aliasing a graph's tensor
  when its graph replays again (gradient accumulation without zeroing to None) is cloned first.
* What it needs (checked before capture; otherwise the call runs uncaptured): CUDA, the compiled layer, one tensor
  output, keyword tensors that are dense and need no gradient, keyword values that are None / bool / int / float /
  str. Dropout must be 0 (the fast path's own condition: no random state is captured).

On by default (TUNELAB_LAYER_GRAPHS=0 turns it off) for the offload's full-recompute calls below split.min_tokens()
tokens (the host-bound steps; larger full-recompute calls are never graphed) and, split_enabled(), for the split
recompute's calls below split_max_tokens(). Measured on the H200 (7B QLoRA, docs/fastpath.md "Runs 28-35"):
1 x 1024 8,344-8,602 tok/s against 2,689-3,122 without, at 5.86 GiB with the pool counted (4.98 without); padded
alpaca-like batches 0.212 s a median step against 0.409 (run 35).
"""
from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

MAX_SIGNATURES = 8  # shapes per layer and kind of call: padded or packed batches of changing lengths would
# otherwise capture without end (their cost: the static inputs per shape, and per layer one capture each)
EMULATE = False  # tests: "capture" and "replay" rerun the body (the same data flow through the static buffers) off CUDA


def enabled() -> bool:
    raw = os.environ.get("TUNELAB_LAYER_GRAPHS", "1")
    if raw not in ("0", "1"):
        from tunelab.errors import ConfigError

        raise ConfigError(f"TUNELAB_LAYER_GRAPHS={raw!r}: expected 0 (off) or 1 (CUDA graphs over the offloaded "
                          "layers' calls below the split recompute's threshold)")
    return raw == "1"


_SIMPLE = (type(None), bool, int, float, str)
_OTHER = object()  # a keyword value the graphs do not cover


def split_enabled() -> bool:
    """TUNELAB_SPLIT_GRAPHS: 1 (the default) graphs the split recompute's calls too (split.py: the first pass
    keeping h2, split_backward), below split_max_tokens() tokens; 0: only the full recompute's calls below the
    split threshold are graphed. Run 34 (H200, 7B QLoRA): padded alpaca-like batches (4 x up to 1,024, lengths
    rounded to 128) 0.197 s a step at the median against 0.713 uncaptured; 4 x 1024 full rows 12,439 against
    12,071 tok/s but +1.24 GiB of pool (6.69 GiB steady against 5.53): hence the token limit."""
    raw = os.environ.get("TUNELAB_SPLIT_GRAPHS", "1")
    if raw not in ("0", "1"):
        from tunelab.errors import ConfigError

        raise ConfigError(f"TUNELAB_SPLIT_GRAPHS={raw!r}: expected 0 (off) or 1 (CUDA graphs over the split "
                          "recompute's calls too)")
    return raw == "1"


def split_max_tokens() -> int:
    """TUNELAB_SPLIT_GRAPH_MAX_TOKENS (default 4,096): split calls of fewer tokens (rows x length) are graphed. At
    4,096 tokens and more the 7B step is bound by the GPU (run 34: +3% from graphs at 4 x 1024) and the pool, which
    grows with the tokens, would take the peak past Unsloth's."""
    from tunelab.model.fast.split import _whole

    return _whole("TUNELAB_SPLIT_GRAPH_MAX_TOKENS", 4096, "a whole number of tokens (rows x length) >= 0")


def _leaves(kwargs):
    """(name or (name, index), value) for each keyword value, tuples and lists of tensors / simple values opened
    one level (transformers passes the position embeddings as (cos, sin)); _OTHER for anything else."""
    import torch

    for name, value in sorted(kwargs.items()):
        items = list(enumerate(value)) if isinstance(value, (tuple, list)) else [(None, value)]
        for i, item in items:
            ok = torch.is_tensor(item) or isinstance(item, _SIMPLE)
            yield (name if i is None else (name, i)), (item if ok else _OTHER)


def _dense(t) -> bool:
    import torch

    return torch.empty_like(t).stride() == t.stride() and not t.requires_grad


_STREAMS: dict = {}  # device -> the one stream every capture runs on


def _capture_stream(device):
    """One side stream per device for all warm-ups and captures: the caching allocator keeps blocks (the pool's
    included) per stream and cuBLAS a workspace per stream, so a stream per capture (run 29's first form) kept
    each capture's memory apart: a 19.1 GiB pool and +1.7 GiB allocated at 7B 1 x 1024, 56 graphs."""
    import torch

    key = torch.device(device).index if torch.device(device).index is not None else torch.cuda.current_device()
    if key not in _STREAMS:
        _STREAMS[key] = torch.cuda.Stream(key)
    return _STREAMS[key]


class _Replay:
    """One captured body: CUDA graph capture into `pool` (or, under EMULATE, the body itself run again)."""

    def __init__(self, body, pool, device):
        import torch

        self.body = body
        if EMULATE:
            body()
            self.graph = None
            return
        stream = _capture_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            body()  # lazy initialisation (cuBLAS workspaces, Triton's first launch) outside the capture
            self.graph = torch.cuda.CUDAGraph()
            self.graph.capture_begin(pool=pool)
            try:
                body()
            finally:
                self.graph.capture_end()
        torch.cuda.current_stream(device).wait_stream(stream)

    def replay(self):
        if self.graph is None:
            self.body()
        else:
            self.graph.replay()


class LayerGraphs:
    """The captured calls of one model's offloaded layers, their shared static buffers and memory pool."""

    def __init__(self):
        self.pool = None
        self.static: dict[tuple, Any] = {}  # (role, shape, dtype, strides, device) -> buffer
        self.kw: dict[tuple, list] = {}  # keyword tensors' buffers: key -> [buffer, last source, its version]
        self.failed: set[int] = set()  # id(layer) whose capture failed: uncaptured from then on
        self.captures = 0
        # id(layer) -> one buffer per trainable parameter (outside the pool): every backward graph of the layer,
        # whatever its shape, copies its LoRA gradients there, so they cost one set per layer, not one per shape
        self.grads: dict[int, list] = {}
        self.trim_pending = False

    # -- signatures and static inputs
    def _signature(self, layer, run, hidden, extra) -> tuple | None:
        import torch

        kwargs = getattr(run, "keywords", None)
        if kwargs is None or id(layer) in self.failed or not hidden.is_cuda and not EMULATE:
            return None
        parts = []
        for path, value in _leaves(kwargs):
            if value is _OTHER:
                return None
            if torch.is_tensor(value):
                if not _dense(value):
                    return None
                parts.append((path, tuple(value.shape), value.dtype, value.stride(), value.device))
            else:
                parts.append((path, value))
        return (tuple(hidden.shape), hidden.dtype, hidden.stride(), hidden.device, tuple(parts), extra)

    def _buffer(self, role, like):
        import torch

        key = (role, tuple(like.shape), like.dtype, like.stride(), like.device)
        if key not in self.static:
            self.static[key] = torch.empty_like(like)
        return self.static[key]

    def _static_run(self, run):
        """`run` (transformers' partial of the layer's forward) over the shared keyword buffers, a function that
        copies a call's keyword tensors into them (only those not already there), and the keywords so bound."""
        import functools

        import torch

        bound, feeds = {}, []
        for name, value in run.keywords.items():
            items = value if isinstance(value, (tuple, list)) else (value,)
            made = []
            for i, item in enumerate(items):
                if torch.is_tensor(item):
                    key = ((name, i), tuple(item.shape), item.dtype, item.stride(), item.device)
                    if key not in self.kw:
                        self.kw[key] = [torch.empty_like(item), None, -1]
                    made.append(self.kw[key][0])
                    feeds.append((name, i, self.kw[key]))
                else:
                    made.append(item)
            bound[name] = type(value)(made) if isinstance(value, (tuple, list)) else made[0]
        static = functools.partial(run.func, *run.args, **bound)

        def feed(call_run):
            with torch.no_grad():
                for name, i, entry in feeds:
                    src = call_run.keywords[name]
                    src = src[i] if isinstance(src, (tuple, list)) else src
                    if entry[1] is not src or entry[2] != src._version:
                        entry[0].copy_(src)
                        entry[1], entry[2] = src, src._version

        return static, feed, bound

    def _pool(self):
        import torch

        if self.pool is None and not EMULATE:
            self.pool = torch.cuda.graph_pool_handle()
        return self.pool

    def _capture(self, layer, body, device):
        try:
            return _Replay(body, self._pool(), device)
        except Exception as exc:  # noqa: BLE001 - a call that cannot be captured runs uncaptured, with a warning
            self.failed.add(id(layer))
            logger.warning("fast path: a decoder layer's call could not be captured as a CUDA graph (%s: %s); it "
                           "runs uncaptured", type(exc).__name__, str(exc).strip().splitlines()[0][:200]
                           if str(exc).strip() else "")
            return None

    def _entry(self, layer, sig, make):
        """The layer's captured call for `sig`: None the first time a signature is seen (the caller runs it: the
        compile happens there) and past MAX_SIGNATURES; made by make() the second time."""
        table = layer.__dict__.setdefault("_tunelab_graphs", {})
        if sig not in table:
            if sum(1 for other in table if other[-1][0] == sig[-1][0]) >= MAX_SIGNATURES:
                return None
            table[sig] = "seen"
            return None
        if table[sig] == "seen":
            table[sig] = make() or "uncaptured"
            if table[sig] != "uncaptured":
                self.captures += 1
                self.trim_pending = True
        entry = table[sig]
        return None if entry == "uncaptured" else entry

    # -- the calls
    def forward(self, layer, call, run, hidden, first_ctx, first=None):
        """The layer's no-grad first pass `call(run, hidden)` (the compiled function and transformers' partial),
        replayed; None when it is not captured (yet). first (split.py's first pass, compiled: (layer, kwargs, x) ->
        (out, h2)): that call instead, its two outputs returned."""
        import functools

        import torch

        from tunelab.model.fast import Passes

        sig = self._signature(layer, run, hidden, ("split-forward" if first else "forward", Passes.first_pass,
                                                   _autocast_now()))
        if sig is None:
            return None

        def make():
            static, feed, bound = self._static_run(run)
            fn = functools.partial(first, layer, bound) if first else functools.partial(call, static)
            x = self._buffer("x", hidden)
            feed(run)
            with torch.no_grad(), first_ctx():
                x.copy_(hidden)
                probe = fn(x)  # the output's form (no capture)
            probe = probe if isinstance(probe, tuple) else (probe,)
            if not all(torch.is_tensor(t) for t in probe) or len(probe) != (2 if first else 1):
                return None
            outs = [self._buffer(f"out{i}", t) for i, t in enumerate(probe)]
            del probe

            def body():
                with torch.no_grad(), first_ctx():
                    made = fn(x)
                    for buf, t in zip(outs, made if first else (made,)):
                        buf.copy_(t)

            replay = self._capture(layer, body, hidden.device)
            return None if replay is None else (replay, feed, x, outs)

        entry = self._entry(layer, sig, make)
        if entry is None:
            return None
        replay, feed, x, outs = entry
        feed(run)
        with torch.no_grad():
            x.copy_(hidden)
        replay.replay()
        return tuple(t.clone() for t in outs) if first else outs[0].clone()

    def backward(self, layer, call, run, hidden, grad_out, autocast):
        """The layer's recompute and backward from `hidden` (its input, back from the host) and `grad_out`,
        replayed: returns the input's gradient and fills the layer's LoRA parameters' .grad; None when not
        captured (yet)."""
        import torch

        from tunelab.model.fast.split import forward_mode, recomputing

        sig = self._signature(layer, run, hidden, ("backward", tuple(autocast), tuple(grad_out.shape),
                                                   grad_out.dtype, grad_out.stride()))
        if sig is None:
            return None
        params = [p for p in layer.parameters() if p.requires_grad]

        def make():
            static, feed, _ = self._static_run(run)
            x = self._buffer("x", hidden)
            g_out = self._buffer("grad_out", grad_out)
            g_x = self._buffer("grad_x", hidden)
            held, written = self._grad_buffers(layer, params), []

            def body():
                with forward_mode(autocast), recomputing():
                    leaf = x.detach().requires_grad_(True)
                    out = call(static, leaf)
                    if not torch.is_tensor(out):
                        raise TypeError(f"the layer returned {type(out).__name__}, not one tensor")
                    grads = torch.autograd.grad(out, [leaf, *params], g_out, allow_unused=True)
                g_x.copy_(grads[0])
                _store(held, written, grads[1:])

            _fill(feed, run, (x, g_out), (hidden, grad_out))
            replay = self._capture(layer, body, hidden.device)
            return None if replay is None else (replay, feed, (x, g_out), g_x, held, written)

        return self._replay_backward(layer, run, sig, make, params, (hidden, grad_out))

    def backward_split(self, layer, attn, mlp, run, hidden, h2, grad_out, autocast):
        """split.split_backward from the layer input `hidden` and h2 (both back from the host) and `grad_out`,
        replayed: the input's gradient, the layer's LoRA parameters' .grad filled; None when not captured (yet)
        or when o or down is not the fused case now (the caller then runs split_backward itself, which says so).
        attn / mlp: split.py's two halves (compiled: (layer, kwargs, input) -> o's / down's input)."""
        import functools

        from tunelab.model.fast.split import _fused, forward_mode, split_backward

        sig = self._signature(layer, run, hidden, ("split-backward", tuple(autocast), tuple(grad_out.shape),
                                                   grad_out.dtype, grad_out.stride(), tuple(h2.shape), h2.stride()))
        if sig is None:
            return None
        with forward_mode(autocast):
            if _fused(layer) is None:
                return None
        params = [p for p in layer.parameters() if p.requires_grad]

        def make():
            static, feed, bound = self._static_run(run)
            run_attn, run_mlp = functools.partial(attn, layer, bound), functools.partial(mlp, layer, bound)
            x = self._buffer("x", hidden)
            h2_in = self._buffer("h2", h2)
            g_out = self._buffer("grad_out", grad_out)
            g_x = self._buffer("grad_x", hidden)
            held, written = self._grad_buffers(layer, params), []

            def body():
                saved = [p.grad for p in params]  # split_backward accumulates into .grad: here into fresh ones
                for p in params:
                    p.grad = None
                try:
                    grad = split_backward(layer, lambda: x, h2_in, g_out, autocast, run_attn, run_mlp)
                    if grad is None:
                        raise RuntimeError("o or down left the fused case")
                    grads = [p.grad for p in params]
                finally:
                    for p, g in zip(params, saved):
                        p.grad = g
                g_x.copy_(grad)
                _store(held, written, grads)

            _fill(feed, run, (x, h2_in, g_out), (hidden, h2, grad_out))
            replay = self._capture(layer, body, hidden.device)
            return None if replay is None else (replay, feed, (x, h2_in, g_out), g_x, held, written)

        return self._replay_backward(layer, run, sig, make, params, (hidden, h2, grad_out))

    def _grad_buffers(self, layer, params) -> list:
        """The layer's shared LoRA-gradient buffers (made outside any capture)."""
        import torch

        if id(layer) not in self.grads:
            self.grads[id(layer)] = [torch.zeros_like(p) for p in params]
        return self.grads[id(layer)]

    def _replay_backward(self, layer, run, sig, make, params, sources):
        """The captured backward for `sig` replayed (None: not captured, the caller runs it): this call's inputs
        (`sources`) copied into its static buffers, the LoRA gradients from the layer's buffers into .grad (aliased
        when .grad is None, added otherwise), the input's gradient cloned out."""
        import torch

        entry = self._entry(layer, sig, make)
        if entry is None:
            return None
        replay, feed, buffers, g_x, held, written = entry
        for p, g in zip(params, held):  # a .grad still aliasing the layer's buffer keeps its value
            if p.grad is g:
                p.grad = g.clone()
        _fill(feed, run, buffers, sources)
        replay.replay()
        into, add = [], []
        for p, g, w in zip(params, held, written):
            if not w:
                continue
            if p.grad is None:
                p.grad = g
            else:
                into.append(p.grad)
                add.append(g)
        if into:
            torch._foreach_add_(into, add)
        return g_x.clone()

    def trim(self) -> None:
        """After a step that captured (the offload calls it after the step's last layer backward): the warm-ups ran
        on the capture stream, whose freed blocks the caching allocator keeps for that stream alone (run 34: 14.1 GiB
        reserved at a 7.7 GiB peak); they are handed back (torch.cuda.empty_cache, which keeps the pool's)."""
        if self.trim_pending and not EMULATE:
            import torch

            torch.cuda.empty_cache()
        self.trim_pending = False

    def pool_bytes(self) -> int:
        """Bytes of the device memory the graphs' pool holds (its segments; 0 before any capture)."""
        import torch

        if self.pool is None:
            return 0
        total = 0
        for seg in torch.cuda.memory._snapshot()["segments"]:
            if tuple(seg.get("segment_pool_id", ())) == tuple(self.pool):
                total += seg["total_size"]
        return total


def _fill(feed, run, buffers, sources) -> None:
    """A call's keyword tensors (feed) and inputs into a graph's static buffers."""
    import torch

    feed(run)
    with torch.no_grad():
        for buf, src in zip(buffers, sources):
            buf.copy_(src)


def _store(held, written, grads) -> None:
    """A backward graph's LoRA gradients into the layer's shared buffers (copies inside the graph); `written` says
    which parameters got one."""
    written[:] = [g is not None for g in grads]
    for buf, g in zip(held, grads):
        if g is not None:
            buf.copy_(g)


def _autocast_now() -> tuple:
    import torch

    devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    return tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in devices)


def graphed_layers(model) -> int:
    """How many layers have at least one captured call (after a step has run)."""
    return sum(1 for m in model.modules()
               if any(e not in ("seen", "uncaptured") for e in getattr(m, "__dict__", {}).get("_tunelab_graphs", {}).values()))
