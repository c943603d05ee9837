"""The frozen input embedding kept in (pinned) host memory: a memory lever of the fast path.

    moved = keep_embedding_on_host(model)   # bytes taken off the GPU (0 when it does not apply)

LoRA never trains the input embedding, and a training step reads only the rows of its own tokens from it: at
Qwen2.5-7B that is 4 x 1024 rows of 7 KiB (29 MB) out of a 152064 x 3584 bf16 table (1.09 GB, 15% of the QLoRA
step's peak). So the table moves to pinned host memory, the rows are gathered there (torch's CPU index_select)
and copied to the GPU in one transfer (~2-3 ms at PCIe rates); the GPU keeps only the rows. The lookup reads the
token ids back from the GPU first: one synchronisation at the start of each forward, which waits for the work
queued before it (the previous optimizer step) and so stops the CPU from running ahead into the next step. Values are bit-identical to the GPU lookup (a gather copies rows), and the module keeps
its parameter and state_dict key; only the tensor's device changes.

Where it applies (`host_embedding_decision`): on by default where the checkpoint offload is on (both are
single-process memory levers; TUNELAB_HOST_EMBEDDING=1 / 0 forces it), the fast path on, a 4-bit base
(the Trainer leaves a bitsandbytes model where it is; a 16-bit model it would move back whole), one process (DDP
expects one device type), a plain nn.Embedding that is frozen and not shared with the output head (tied heads
need it on the GPU).

Measured (H200, run 8, docs/fastpath.md): run 6's peak had not moved because the Trainer's `.to(device)` of
the whole model brought the table back to the GPU after loading (the bench counted one return per process). A
forward that finds it back returns it to the host (RETURNS, recorded by the bench), and `.to()`/`.cuda()` no
longer move it (`_host_apply`). With it the 4 x 1024 compiled peak fell 7.42 -> 6.41 GiB; alone its per-step
synchronisation cost 11% of the speed (8,980 against 10,113 tok/s), beside the checkpoint offload nothing
(11,084 against 11,103): so it is on where the offload is.
"""
from __future__ import annotations

import logging
import os
import types

logger = logging.getLogger(__name__)


def host_embedding_config_decision(cfg, resolved, offload: bool = False) -> tuple[bool, str]:
    """host_embedding_decision's checks of the environment, the offload, the config and the parallel mode (no torch,
    no model): the memory planner calls it before any model is loaded."""
    flag = os.environ.get("TUNELAB_HOST_EMBEDDING")
    if flag == "0":
        return False, "TUNELAB_HOST_EMBEDDING=0"
    if flag != "1" and not offload:
        # its lookup synchronises with the GPU once a step: alone it cost 11% (run 8), beside the offload nothing
        return False, "on with the checkpoint offload only (TUNELAB_HOST_EMBEDDING=1 forces it)"
    if getattr(cfg, "quantization_bit", None) != 4:
        return False, "the base is not 4-bit (the Trainer moves a 16-bit model to the GPU whole)"
    if getattr(resolved, "parallel", "single") != "single":
        return False, f"parallel {resolved.parallel}: one process only"
    return True, "input embedding in pinned host memory"


def host_embedding_decision(model, cfg, resolved, offload: bool = False) -> tuple[bool, str]:
    """(on, reason) for moving the input embedding to host memory. Default: on where the checkpoint offload is on
    (`offload`); TUNELAB_HOST_EMBEDDING=1 / 0 forces it on / off."""
    import torch

    on, reason = host_embedding_config_decision(cfg, resolved, offload)
    if not on:
        return False, reason
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(emb) is not torch.nn.Embedding or emb.weight.requires_grad or emb.max_norm is not None:
        return False, "the input embedding is not a frozen plain nn.Embedding"
    if head is not None and getattr(head, "weight", None) is not None and head.weight.data_ptr() == emb.weight.data_ptr():
        return False, "the embedding is tied to the output head"
    if emb.weight.device.type != "cuda":
        return False, f"the embedding is on {emb.weight.device.type}"
    return True, "input embedding in pinned host memory"


RETURNS = [0]  # how often a forward found the table back on the GPU and returned it to the host (bench record)


def _to_host(emb) -> None:
    import torch

    emb.weight.data = emb.weight.data.to("cpu").pin_memory() if torch.cuda.is_available() else emb.weight.data.cpu()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _host_forward(self, input_ids):
    """nn.Embedding.forward with the table on the host: gather there, one copy of the rows to the ids' device."""
    import torch

    if input_ids.device.type == "cpu":  # a CPU caller: the plain lookup
        return self._tunelab_gpu_forward(input_ids)
    if self.weight.device.type != "cpu":  # a later .to(device) of the whole model brought it back: once more
        logger.info("fast path: the input embedding was moved back to %s; returned to host memory", self.weight.device)
        _to_host(self)
        RETURNS[0] += 1
    ids = input_ids.to("cpu")  # a synchronisation (see the module docstring)
    rows = torch.empty((ids.numel(), self.weight.shape[1]), dtype=self.weight.dtype, pin_memory=True)
    torch.index_select(self.weight, 0, ids.reshape(-1), out=rows)
    return rows.view(*ids.shape, -1).to(input_ids.device, non_blocking=True)


def _host_apply(self, fn, recurse=True):
    """nn.Module._apply for the host table: a conversion that would move tensors to another device (the model's
    `.to("cuda")` / `.cuda()`, which the Trainer calls after loading) leaves the table where it is; any other
    (a dtype change) is applied to it, on the host."""
    import torch

    probe = fn(torch.empty(0, dtype=self.weight.dtype))
    if probe.device.type == "cpu":
        return self._tunelab_apply(fn, recurse)
    if probe.dtype != self.weight.dtype:
        self.weight.data = self.weight.data.to(probe.dtype)
        _to_host(self)
    return self


def keep_embedding_on_host(model) -> int:
    """Move the input embedding's table to pinned host memory and route its forward there; returns the bytes moved."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb = base.get_input_embeddings()
    if hasattr(emb, "_tunelab_gpu_forward"):
        return 0
    _to_host(emb)
    emb._tunelab_gpu_forward = emb.forward
    emb.forward = types.MethodType(_host_forward, emb)
    emb._tunelab_apply = emb._apply
    emb._apply = types.MethodType(_host_apply, emb)
    return emb.weight.numel() * emb.weight.element_size()
