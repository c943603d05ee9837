"""Gradient checkpointing with the checkpointed layer inputs kept in pinned CPU memory (a memory lever).

    n = offload_checkpoints(model)   # every checkpointed decoder layer of a transformers model; returns how many
    n = offload_checkpoints(model, compiled=True)   # the same, each layer's forward compiled under it

Plain (non-reentrant) checkpointing keeps each decoder layer's input on the GPU until its backward: at
Qwen2.5-7B, 4 x 1024 tokens, 28 x 29 MB = 0.76 GiB, at 2 x 4096 1.5 GiB. Here each layer input is copied to
pinned host memory on a side stream as the forward passes it, and copied back in backward, the previous layer's
input prefetched while this layer recomputes, so the copies can overlap compute (PCIe: ~1 ms a layer at 4 x 1024
against ~12 ms of compute). The recompute and backward are those of reentrant checkpointing: the layer runs
again under grad and autograd.backward accumulates into the (LoRA) parameters' .grad.

Status: on by default on one process (TUNELAB_OFFLOAD_CHECKPOINTS=0 turns it off; `tunelab bench` variants
`+nooffload` / `+offload`); correctness tested on CPU and GPU against plain checkpointing, eager and with the
layers' forwards compiled (tests/test_fast_lora.py). Measured on an H200 (7B QLoRA 4 x 1024, run 8 of
docs/fastpath.md, one lease): compiled, 10,113 -> 11,103 tok/s and 7.42 -> 6.84 GiB (with the host embedding,
which it turns on: 11,084 at 5.82 GiB); eager (run 5) 7.11 -> 6.53 GiB at no loss of speed. Single-process only:
its reentrant-style backward bypasses DDP/FSDP hooks.

With split.py (on by default from 2,048 tokens a step) a covered layer also keeps h2, the residual after attention,
here, and its backward recomputes the layer without the o and down products (run 13: 4 x 1024 11,244 tok/s and
2 x 4096 12,303 at 5.64 / 6.50 GiB, against run 11's 10,907 / 10,949 at 5.82 / 6.68).
"""
from __future__ import annotations

import functools
from typing import Any


class HostStash:
    """Layer inputs on the host, in forward order; backward takes them back in reverse order, prefetching.

    Big slots (push(big=True): gate/up's kept outputs, split.keep_plan) travel on a stream of their own, so that
    the small slots' copies never queue behind them, and each is brought back as soon as the backward passes the big
    slot above it (the layers between give it time to arrive: at most two big slots on the device at once, the one
    in use and the next); a slot pushed with on_device=True stays on the GPU (the last layers': their backward comes
    first)."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        self.stream = torch.cuda.Stream() if self.cuda else None
        self.big_stream = torch.cuda.Stream() if self.cuda else None
        self.host: list[Any] = []  # per slot: pinned host copy (or the tensor itself off CUDA / kept on the device)
        self.back: dict[int, tuple[Any, Any]] = {}  # slot -> (device tensor, ready event), prefetched
        self.big: list[int] = []  # the big slots, ascending
        self.resident: set[int] = set()  # the slots kept on the device

    def reset(self) -> None:
        """Empty, for the next step (after slot 0's pop, or a forward after a finished backward): a copy back started
        and never taken (none in the offload's own order) is dropped rather than handed to a later step's slot."""
        self.host.clear()
        self.big.clear()
        self.resident.clear()
        self.back.clear()

    def push(self, t, big: bool = False, on_device: bool = False) -> int:
        import torch

        slot = len(self.host)
        if big:
            self.big.append(slot)
        if not t.is_cuda or on_device:
            self.host.append(t.detach())
            if t.is_cuda:
                self.resident.add(slot)
            return slot
        stream = self.big_stream if big else self.stream
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream())  # t is complete
        with torch.cuda.stream(stream):
            host.copy_(t.detach(), non_blocking=True)
        t.record_stream(stream)  # its memory is not reused before the copy has read it
        self.host.append(host)
        return slot

    def _fetch(self, slot: int, device, stream) -> None:
        import torch

        if slot < 0 or slot in self.back or self.host[slot] is None or slot in self.resident:
            return
        host = self.host[slot]
        if stream is self.big_stream:
            # a big slot's device copy is allocated on the stream that uses and frees it, so its block returns to
            # that stream's pool for the step's other tensors (allocated on the side stream, the blocks of runs
            # 25-26 stayed in its pool: reserved +1.4-5.6 GiB); the copy waits for the work queued so far, the
            # block's last use among it
            t = torch.empty(host.shape, dtype=host.dtype, device=device)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                t.copy_(host, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(stream)
            t.record_stream(stream)  # not reused before the copy has written it
        else:
            with torch.cuda.stream(stream):
                t = host.to(device, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(stream)
        self.back[slot] = (t, ready)

    @staticmethod
    def _arrive(t, ready) -> None:
        """This stream waits for t's copy back (`ready`) and owns t from here."""
        import torch

        torch.cuda.current_stream().wait_event(ready)
        t.record_stream(torch.cuda.current_stream())  # allocated on the side stream, used and freed on this one

    def pop(self, slot: int, device, ahead: int = 1):
        """The tensor of `slot` on `device`; starts bringing back the `ahead` small slots before it (and the next
        big slot below)."""
        if not self.cuda or device.type != "cuda" or slot in self.resident:
            t, self.host[slot] = self.host[slot], None
            self.resident.discard(slot)
        else:
            big = set(self.big)
            self._fetch(slot, device, self.big_stream if slot in big else self.stream)
            t, ready = self.back.pop(slot)
            self.host[slot] = None
            self._arrive(t, ready)
            before = slot
            for _ in range(ahead):
                before -= 1  # the next small slot below (a layer below keeping its gate/up output has its big
                while before in big:  # slot between: run 25-26's form skipped, so h2 came back only when asked for)
                    before -= 1
                self._fetch(before, device, self.stream)
            below = [s for s in self.big if s < slot and s not in self.resident]  # the next one to copy back
            if below:
                self._fetch(below[-1], device, self.big_stream)
        if slot == 0:
            self.reset()
        return t


def _build():
    import torch

    class OffloadedCheckpoint(torch.autograd.Function):
        @staticmethod
        def forward(ctx, run, stash, hidden, split=None, fused_first=False, graph=None):
            ctx.run, ctx.stash, ctx.device, ctx.split, ctx.graph = run, stash, hidden.device, split, graph
            # the recompute must see the forward's autocast (backward runs without it); no RNG state is kept:
            # the fast path covers dropout 0 only
            ctx.autocast = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _devices()]
            ctx.slot = stash.push(hidden)
            ctx.slot_gu = None
            made = None
            if graph is not None:  # graphs.py: the first pass replayed as a CUDA graph (split.py's, keeping h2)
                graphs, layer, layer_run = graph
                made = graphs.forward(layer, _COMPILED["call"], layer_run, hidden, lambda: _first_pass(fused_first),
                                      None if split is None else _COMPILED["first"])
                if made is not None and split is None:
                    return made
            with torch.no_grad(), _first_pass(fused_first):
                if split is None:
                    return run(hidden)
                if made is not None:
                    out, h2 = made
                elif split.keep is None:
                    out, h2 = split.first(hidden)  # split.py: h2, the residual after attention, is kept too
                else:  # and gate/up's output, for the MLP half's replay (split.keep_plan)
                    out, h2, gu = split.first_keep(hidden)
            ctx.slot_h2 = stash.push(h2)
            if split.keep is not None and gu is not None:
                ctx.slot_gu = stash.push(gu, big=True, on_device=split.keep == "device")
            return out

        @staticmethod
        def backward(ctx, *grads):
            try:
                return OffloadedCheckpoint._backward(ctx, *grads)
            finally:
                if ctx.slot == 0 and ctx.graph is not None:  # the step's last layer backward
                    ctx.graph[0].trim()

        @staticmethod
        def _backward(ctx, *grads):
            from tunelab.model.fast.split import forward_mode, recomputing, split_backward

            split = ctx.split
            back = []  # the layer input, when the split graphs' branch below has already taken it back
            if split is not None and grads[0] is not None:
                h2 = ctx.stash.pop(ctx.slot_h2, ctx.device)  # starts bringing back this layer's input

                def get_x():
                    return back[0] if back else ctx.stash.pop(ctx.slot, ctx.device)

                if ctx.graph is not None and ctx.slot_gu is None:  # graphs.py: the split backward replayed
                    graphs, layer, layer_run = ctx.graph
                    # the replay takes x with h2, up front: the layer below's two slots come back now (ahead 2),
                    # so that its x is back with its h2 (the prefetch below a popped slot is one slot otherwise)
                    back.append(ctx.stash.pop(ctx.slot, ctx.device, ahead=2))
                    grad = graphs.backward_split(layer, _COMPILED["attn"], _COMPILED["mlp"], layer_run, back[0], h2,
                                                 grads[0], ctx.autocast)
                    if grad is not None:
                        return None, None, grad, None, None, None

                # gu (kept layers): popped into the call, not held here (split_backward drops it after the MLP half)
                grad = split_backward(split.layer, get_x, h2, grads[0], ctx.autocast, split.attn, split.mlp,
                                      None if ctx.slot_gu is None else ctx.stash.pop(ctx.slot_gu, ctx.device))
                if grad is not None:
                    return None, None, grad, None, None, None
                del h2  # o or down left the fused case since the forward: the whole layer is recomputed
            elif split is not None:
                ctx.stash.pop(ctx.slot_h2, ctx.device)
                if ctx.slot_gu is not None:
                    ctx.stash.pop(ctx.slot_gu, ctx.device)
            hidden = (back.pop() if back else ctx.stash.pop(ctx.slot, ctx.device)).detach().requires_grad_(True)
            if ctx.graph is not None and split is None and grads[0] is not None and all(g is None for g in grads[1:]):
                graphs, layer, layer_run = ctx.graph  # graphs.py: the recompute and backward replayed
                grad = graphs.backward(layer, _COMPILED["call"], layer_run, hidden, grads[0], ctx.autocast)
                if grad is not None:
                    return None, None, grad, None, None, None
            with forward_mode(ctx.autocast), recomputing():
                out = ctx.run(hidden)
            outs = out if isinstance(out, tuple) else (out,)
            pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and torch.is_tensor(o) and o.requires_grad]
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            return None, None, hidden.grad, None, None, None

    return OffloadedCheckpoint


class _Fn:
    fn: Any = None


def _devices() -> list[str]:
    import torch

    return ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]


class _first_pass:
    """The fused projections also in the offload's no-grad first pass (fast.Passes.first_pass) while inside."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        if self.on:
            from tunelab.model.fast import Passes

            Passes.first_pass = True

    def __exit__(self, *exc):
        if self.on:
            from tunelab.model.fast import Passes

            Passes.first_pass = False


def _call(run, hidden):
    return run(hidden)


def _first(layer, kwargs, hidden):
    from tunelab.model.fast.split import first_pass

    return first_pass(layer, kwargs, hidden)


def _first_keep(layer, kwargs, hidden):
    from tunelab.model.fast.split import first_pass_keep

    return first_pass_keep(layer, kwargs, hidden)


def _attn(layer, kwargs, hidden):
    from tunelab.model.fast.split import attn_input

    return attn_input(layer, kwargs, hidden)


def _mlp(layer, kwargs, h2):
    from tunelab.model.fast.split import mlp_input

    return mlp_input(layer, h2)


class _Compiled:
    """Each function's torch.compile'd form, made on first use (the layer's forward, or split.py's three parts, as
    one graph each; compile.py); looked up at each call: a failed compile replaces it with the eager function."""
    fns: dict[str, Any] = {}
    backend: Any = None  # torch.compile's (None: inductor; the CPU tests set a counting one and clear fns)

    @classmethod
    def get(cls, fn):
        name = fn.__name__
        if name not in cls.fns:
            import torch

            from tunelab.model.fast.compile import eager_on_failure

            def give_up():
                cls.fns[name] = fn

            compiled = torch.compile(fn) if cls.backend is None else torch.compile(fn, backend=cls.backend)
            cls.fns[name] = eager_on_failure(compiled, fn, give_up, f"the offloaded layers' {name.strip('_')}")
        return cls.fns[name]


def _compiled(fn):
    def call(*args):
        return _Compiled.get(fn)(*args)  # looked up at each call: a failed compile swaps in the eager function

    return call


_EAGER = {"call": _call, "first": _first, "first_keep": _first_keep, "attn": _attn, "mlp": _mlp}
_COMPILED = {name: _compiled(fn) for name, fn in _EAGER.items()}  # made once, not at each layer call


class _Split:
    """A layer's split.py parts for the offload: the first pass returning h2 (and gate/up's output where the layer
    keeps it: keep "host" or "device", else None), the two halves for the backward."""

    def __init__(self, layer, kwargs, compiled: bool):
        fns = _COMPILED if compiled else _EAGER
        first, attn, mlp = fns["first"], fns["attn"], fns["mlp"]
        self.layer = layer
        self.keep = getattr(layer, "_tunelab_keep_gu", None)
        self.first = functools.partial(first, layer, kwargs)
        self.first_keep = functools.partial(fns["first_keep"], layer, kwargs)
        self.attn = functools.partial(attn, layer, kwargs)
        self.mlp = functools.partial(mlp, layer, kwargs)


def _layer_kwargs(run, layer):
    """The keyword arguments transformers bound to the layer's forward in `run`, or None when `run` is not that
    (transformers 5.17: partial(super().__call__, **kw); later 5.x: partial(forward, layer, **kw))."""
    if not isinstance(run, functools.partial):
        return None
    if run.args == () and getattr(run.func, "__self__", None) is layer:
        return run.keywords
    if run.args == (layer,):
        return run.keywords
    return None


def offloaded_checkpoint_fn(stash: HostStash, fallback, compiled: bool = False, layer=None,
                            split_min_tokens: int | None = None, fused_first: bool = False, graphs=None,
                            graph_max_tokens: int = 0, split_graphs: bool = False, split_graph_max_tokens: int = 0):
    """A drop-in for transformers' `_gradient_checkpointing_func(fn, *args)`: one tensor argument (the hidden
    states) is offloaded; any other call shape goes to `fallback` (plain checkpointing). compiled: the layer
    (`run`) runs through torch.compile, once without grad (the first pass) and once with it (the recompute); the
    checkpoint itself stays eager (dynamo cannot trace the host copies' side effects). split (with `layer`, the
    decoder layer this is installed on; None: off): split.py's recompute without o's and down's products for calls
    of at least that many tokens (rows x length);
    fused_first: the first pass through the fused projections instead of PEFT's no-grad path; graphs (a
    graphs.LayerGraphs, with `layer` and `compiled`): calls under graph_max_tokens tokens that take the full
    recompute replay CUDA graphs of the compiled calls; split_graphs: the split recompute's calls under
    split_graph_max_tokens too (those of layers keeping gate/up's output excepted)."""
    import torch

    if _Fn.fn is None:
        _Fn.fn = _build()

    def checkpoint(run, *args, **kwargs):
        if kwargs or len(args) != 1 or not torch.is_tensor(args[0]) or not args[0].requires_grad:
            return fallback(run, *args, **kwargs)
        if stash.host and stash.host[0] is None:  # a new step after a finished backward
            stash.reset()
        parts = None
        if split_min_tokens is not None and args[0].numel() >= split_min_tokens * args[0].shape[-1]:
            layer_kwargs = _layer_kwargs(run, layer)
            if layer_kwargs is not None:
                parts = _Split(layer, layer_kwargs, compiled)
        graph = None
        if graphs is not None and compiled and layer is not None and _layer_kwargs(run, layer) is not None:
            if parts is None and args[0].numel() < graph_max_tokens * args[0].shape[-1]:
                graph = (graphs, layer, run)
            elif (parts is not None and split_graphs and parts.keep is None
                  and args[0].numel() < split_graph_max_tokens * args[0].shape[-1]):
                graph = (graphs, layer, run)
        if compiled:
            run = functools.partial(_COMPILED["call"], run)
        return _Fn.fn.apply(run, stash, args[0], parts, fused_first, graph)

    return checkpoint


def offload_checkpoints(model, compiled: bool = False, split: bool | None = None, fused_first: bool | None = None,
                        split_min_tokens: int | None = None, keep_every: int | None = None,
                        keep_on_gpu: int | None = None, layer_graphs: bool | None = None,
                        split_graphs: bool | None = None) -> int:
    """Route every checkpointed layer of `model` (gradient checkpointing already enabled) through the offload.
    split: split.py's recompute without the o and down products, on the layers it covers, for batches of at least
    split_min_tokens tokens (defaults: on unless TUNELAB_SPLIT_RECOMPUTE=0, from 2,048 tokens or
    TUNELAB_SPLIT_MIN_TOKENS: split.py says why); fused_first: the first pass through the fused projections
    (default: on; TUNELAB_FUSED_FIRST_PASS=0: PEFT's no-grad path; run 12 measured the fused pass slower with the
    custom_op form of the opaque ops, run 14 faster with the Library form: docs/fastpath.md); keep_every: split
    layers whose MLP is the grouped gate/up pair keep its output from the (fused) first pass, the last layer and every
    keep_every-th below it (split.keep_layers; default TUNELAB_KEEP_GATE_UP, 0: none), so their backward skips the
    pair's GEMM; keep_on_gpu: the last that many such layers keep it on the GPU (split.keep_plan; default
    TUNELAB_KEEP_GATE_UP_ON_GPU, 0: none); layer_graphs: with `compiled`, the calls under split_min_tokens tokens
    (the host-bound steps; they take the full recompute) replay CUDA graphs (graphs.py; default
    TUNELAB_LAYER_GRAPHS, on). Larger calls that take the full recompute are never graphed: run 31 measured +2.2%
    at 7B 4 x 1024 with the split off and every call graphed, at 7.20 GiB with the pool against 5.53 for the split
    default; split_graphs: the split recompute's calls are graphed as well, below graphs.split_max_tokens()
    tokens (graphs.split_enabled: TUNELAB_SPLIT_GRAPHS, on; TUNELAB_SPLIT_GRAPH_MAX_TOKENS, 4,096). Returns how many layers were routed; `split_layers(model)` says how many can split,
    `kept_layers(model)` how many keep gate/up's output."""
    import os

    from transformers.modeling_layers import GradientCheckpointingLayer

    from tunelab.model.fast import split as split_mod

    if split is None:
        split = split_mod.enabled()
    if split_min_tokens is None:
        split_min_tokens = split_mod.min_tokens()
    if fused_first is None:
        fused_first = os.environ.get("TUNELAB_FUSED_FIRST_PASS", "1") != "0"
    if keep_every is None:
        keep_every = split_mod.keep_every()
    if keep_on_gpu is None:
        keep_on_gpu = split_mod.keep_on_gpu()
    from tunelab.model.fast import graphs as graphs_mod

    if layer_graphs is None:
        layer_graphs = graphs_mod.enabled()
    graphs = graphs_mod.LayerGraphs() if layer_graphs and compiled else None
    if split_graphs is None:
        split_graphs = graphs_mod.split_enabled()
    split_graphs = bool(graphs is not None and split and split_graphs)
    split_graph_max_tokens = graphs_mod.split_max_tokens() if split_graphs else 0
    stash = HostStash()
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing
              and getattr(m, "_gradient_checkpointing_func", None) is not None]
    keep = split_mod.keep_plan(len(layers), keep_every, keep_on_gpu) if split and fused_first else {}
    for index, module in enumerate(layers):
        fallback = module._gradient_checkpointing_func
        splits = split and split_mod.split_plan(module)
        module._tunelab_split = splits
        # gate/up's output kept from the first pass (split.keep_plan): grouped MLPs of split layers only
        kept = splits and index in keep and hasattr(module.mlp, "_tunelab_mlp_forward")
        module._tunelab_keep_gu = keep[index] if kept else None
        module._gradient_checkpointing_func = offloaded_checkpoint_fn(
            stash, fallback, compiled, module, split_min_tokens if splits else None, fused_first, graphs,
            split_min_tokens, split_graphs, split_graph_max_tokens)
    model._tunelab_layer_graphs = graphs
    return len(layers)


def split_layers(model) -> int:
    """How many offloaded layers recompute without their o and down products (split.py)."""
    return sum(1 for m in model.modules() if getattr(m, "_tunelab_split", False))


def kept_layers(model) -> int:
    """How many offloaded layers keep gate/up's output from the first pass for their backward (split.keep_plan)."""
    return sum(1 for m in model.modules() if getattr(m, "_tunelab_keep_gu", None))
