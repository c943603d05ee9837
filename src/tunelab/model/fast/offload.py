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
"""
from __future__ import annotations

import functools
from typing import Any


class HostStash:
    """Layer inputs on the host, in forward order; backward takes them back in reverse order, prefetching."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        self.stream = torch.cuda.Stream() if self.cuda else None
        self.host: list[Any] = []  # per slot: pinned host copy (or the tensor itself off CUDA)
        self.back: dict[int, tuple[Any, Any]] = {}  # slot -> (device tensor, ready event), prefetched

    def push(self, t) -> int:
        import torch

        if not t.is_cuda:
            self.host.append(t.detach())
            return len(self.host) - 1
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream())  # t is complete
        with torch.cuda.stream(self.stream):
            host.copy_(t.detach(), non_blocking=True)
        t.record_stream(self.stream)  # its memory is not reused before the copy has read it
        self.host.append(host)
        return len(self.host) - 1

    def _fetch(self, slot: int, device) -> None:
        import torch

        if slot < 0 or slot in self.back or self.host[slot] is None:
            return
        with torch.cuda.stream(self.stream):
            t = self.host[slot].to(device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        self.back[slot] = (t, ready)

    def pop(self, slot: int, device):
        """The input of `slot` on `device`; starts bringing back the one before it."""
        import torch

        if not self.cuda or device.type != "cuda":
            t, self.host[slot] = self.host[slot], None
            return t
        self._fetch(slot, device)
        t, ready = self.back.pop(slot)
        self.host[slot] = None
        torch.cuda.current_stream().wait_event(ready)
        t.record_stream(torch.cuda.current_stream())  # allocated on the side stream, used and freed on this one
        self._fetch(slot - 1, device)
        if slot == 0:
            self.host.clear()
        return t


def _build():
    import torch

    class OffloadedCheckpoint(torch.autograd.Function):
        @staticmethod
        def forward(ctx, run, stash, hidden):
            ctx.run, ctx.stash, ctx.device = run, stash, hidden.device
            # the recompute must see the forward's autocast (backward runs without it); no RNG state is kept:
            # the fast path covers dropout 0 only
            ctx.autocast = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _devices()]
            ctx.slot = stash.push(hidden)
            with torch.no_grad():
                return run(hidden)

        @staticmethod
        def backward(ctx, *grads):
            import contextlib

            hidden = ctx.stash.pop(ctx.slot, ctx.device).detach().requires_grad_(True)
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch.enable_grad())
                for device, enabled, dtype in ctx.autocast:
                    stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
                out = ctx.run(hidden)
            outs = out if isinstance(out, tuple) else (out,)
            pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and torch.is_tensor(o) and o.requires_grad]
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            return None, None, hidden.grad

    return OffloadedCheckpoint


class _Fn:
    fn: Any = None


def _devices() -> list[str]:
    import torch

    return ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]


def _call(run, hidden):
    return run(hidden)


class _Compiled:
    call: Any = None  # torch.compile(_call), made on first use: the layer's forward as one graph (compile.py)


def _call_compiled(run, hidden):
    return _Compiled.call(run, hidden)  # looked up at each call: a failed compile replaces it with the eager _call


def offloaded_checkpoint_fn(stash: HostStash, fallback, compiled: bool = False):
    """A drop-in for transformers' `_gradient_checkpointing_func(fn, *args)`: one tensor argument (the hidden
    states) is offloaded; any other call shape goes to `fallback` (plain checkpointing). compiled: the layer
    (`run`) runs through torch.compile, once without grad (the first pass) and once with it (the recompute); the
    checkpoint itself stays eager (dynamo cannot trace the host copies' side effects)."""
    import torch

    if _Fn.fn is None:
        _Fn.fn = _build()
    if compiled and _Compiled.call is None:
        from tunelab.model.fast.compile import eager_on_failure

        def give_up():
            _Compiled.call = _call

        _Compiled.call = eager_on_failure(torch.compile(_call), _call, give_up, "the offloaded layers' forward")

    def checkpoint(run, *args, **kwargs):
        if kwargs or len(args) != 1 or not torch.is_tensor(args[0]) or not args[0].requires_grad:
            return fallback(run, *args, **kwargs)
        if stash.host and stash.host[0] is None:  # a new step after a finished backward
            stash.host.clear()
        if compiled:
            run = functools.partial(_call_compiled, run)
        return _Fn.fn.apply(run, stash, args[0])

    return checkpoint


def offload_checkpoints(model, compiled: bool = False) -> int:
    """Route every checkpointed layer of `model` (gradient checkpointing already enabled) through the offload."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    stash = HostStash()
    count = 0
    for module in model.modules():
        fallback = getattr(module, "_gradient_checkpointing_func", None)
        if not isinstance(module, GradientCheckpointingLayer) or fallback is None or not module.gradient_checkpointing:
            continue
        module._gradient_checkpointing_func = offloaded_checkpoint_fn(stash, fallback, compiled)
        count += 1
    return count
