"""Kernel selection: the fast path where it applies, the plain path otherwise.

Like PEFT's backend dispatchers, each candidate says whether it applies to this model and hardware; the first
that applies wins, and what was chosen is logged and recorded. Two decisions live here:

* module kernels (`apply_kernels`): Liger Kernel's RMSNorm / RoPE / SwiGLU when `enable_liger_kernel` is set
  on a CUDA GPU and the package is installed; the plain transformers modules otherwise.
* the loss (`select_loss`): tunelab's fused linear + cross-entropy (`fused_linear_cross_entropy` below) when the
  model has a plain linear output head, no logit soft-capping and a decoder we can call directly; otherwise the
  model's own `forward(labels=...)`.

The fused loss never materialises the [tokens x vocab] logits: it runs the output head over the positions that
carry a label only (prompt tokens are masked, so often less than half of them), a chunk at a time, computes the
loss and the gradient with respect to the hidden states in the forward pass, and hands that gradient back in
backward. On Qwen2.5-7B at 4 x 1024 tokens the plain path holds the bf16 logits, their fp32 copy and its
gradient (about 7.5 GB); this holds one chunk (~0.4 GB). The result equals the plain loss to fp32 rounding
(tests/test_kernels.py checks loss and gradients against torch's cross_entropy).
"""
from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def _liger_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def apply_kernels(model, cfg, resolved, for_training: bool = False) -> list[str]:
    """Patch module kernels in place; returns the names of what was applied (recorded in the run's config).

    enable_liger_kernel null (the default) means: use Liger where it applies (a CUDA GPU with liger-kernel
    installed) and the plain modules elsewhere, except for training on the fast path's compiled decoder layers,
    where inductor fuses RMSNorm / RoPE / SwiGLU itself (measured faster: docs/fastpath.md); true makes a missing
    Liger an error; false turns it off.
    """
    from tunelab.errors import ConfigError

    applied: list[str] = []
    wanted = cfg.enable_liger_kernel
    if wanted is False:
        return applied
    if for_training and wanted is None and resolved.device == "cuda":
        from tunelab.model.fast import compile_decision

        if compile_decision(model, cfg, resolved)[0]:
            logger.info("kernels: Liger left out: the compiled decoder layers fuse RMSNorm, RoPE and SwiGLU (inductor)")
            return applied
    if resolved.device != "cuda":
        if wanted:
            logger.warning("enable_liger_kernel needs a CUDA GPU; using the plain kernels on %s.", resolved.device)
        return applied
    if not _liger_available():
        if wanted:
            raise ConfigError("enable_liger_kernel: true needs Liger Kernel: pip install 'tunelab[liger]'.")
        logger.info("liger-kernel is not installed: plain RMSNorm/RoPE/SwiGLU (pip install 'tunelab[liger]' for the fast path)")
        return applied
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    # tunelab's own fused loss replaces Liger's fused cross-entropy (same idea, computed on trained rows only).
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=False, cross_entropy=False)
    applied.append("liger(rope,rms_norm,swiglu)")
    logger.info("kernels: Liger RMSNorm, RoPE and SwiGLU")
    return applied


def select_loss(model) -> str:
    """'fused' when the model fits the fused loss, else 'plain' (the model computes its own loss)."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None or type(head) is not torch.nn.Linear or head.bias is not None:
        return "plain"
    if getattr(base.config, "final_logit_softcapping", None) or getattr(base.config, "logit_scale", None):
        return "plain"
    if not hasattr(base, "get_decoder") or base.get_decoder() is None:
        return "plain"
    return "fused"


# One fp32 [rows x vocab] logits block of the fused loss. 256 MiB (~440 rows of Qwen's 152k vocabulary): measured on
# an H200 at Qwen2.5-7B 4 x 1024 QLoRA it lowers the step's peak by 1.8 GiB against 1 GiB blocks, with no loss of speed
# (docs/fastpath.md); the head GEMMs stay large enough (440 x 3584 x 152064) to run at full rate.
CHUNK_BUDGET_BYTES = 256 << 20


def _chunk_rows(vocab: int, budget_bytes: int | None = None, element_bytes: int = 4) -> int:
    """Rows per chunk so one [rows x vocab] block of `element_bytes` entries (fp32 by default) stays within the
    budget."""
    budget = CHUNK_BUDGET_BYTES if budget_bytes is None else budget_bytes
    return max(64, min(8192, budget // (element_bytes * vocab)))


class _FusedLinearCE:  # namespace for the autograd function (built lazily: torch is imported on use)
    fn: Any = None


def _build_fn():
    import torch

    class FusedLinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, targets, divisor, weight_needs_grad):
            # hidden [N, H] (labelled rows only), weight [V, H], targets [N]
            n = hidden.shape[0]
            need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]  # False under torch.no_grad (evaluation)
            grad_hidden = torch.empty_like(hidden) if need_grad else torch.empty(0)
            grad_weight = (
                torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32), device=weight.device)
                if weight_needs_grad and need_grad else None
            )
            total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
            from tunelab.model.fast import ce_triton

            # the one-kernel loss and gradient (fast/ce_triton.py) needs no fp32 copy of a chunk: twice the rows
            one_kernel = ce_triton.enabled_for(hidden) and hidden.dtype == weight.dtype
            step = _chunk_rows(weight.shape[0], element_bytes=hidden.element_size() if one_kernel else 4)
            for start in range(0, n, step):
                h = hidden[start : start + step]
                t = targets[start : start + step]
                logits = h @ weight.t()
                if one_kernel:  # with need_grad the logits now hold softmax - onehot, in h's dtype
                    total += ce_triton.cross_entropy_rows(logits, t, write_grad=need_grad).sum()
                    probs = logits
                else:
                    logits = logits if logits.dtype == torch.float64 else logits.float()
                    lse = torch.logsumexp(logits, dim=-1)
                    total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                    if need_grad:  # d(loss)/d(logits) = softmax - onehot, computed in place over the chunk
                        probs = logits.sub_(lse[:, None]).exp_()
                        probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                        probs = probs.to(h.dtype)
                if not need_grad:
                    continue
                grad_hidden[start : start + step] = probs @ weight
                if grad_weight is not None:
                    grad_weight += (probs.t() @ h).to(grad_weight.dtype)
            scale = 1.0 / divisor  # a float, or a 0-d tensor on the device (no synchronisation)
            ctx.save_for_backward(grad_hidden, grad_weight if grad_weight is not None else torch.empty(0))
            ctx.scale = scale
            ctx.weight_needs_grad = weight_needs_grad
            return total * scale

        @staticmethod
        def backward(ctx, grad_out):
            grad_hidden, grad_weight = ctx.saved_tensors
            g = grad_out * ctx.scale
            gh = grad_hidden * g.to(grad_hidden.dtype)
            gw = (grad_weight * g).to(grad_hidden.dtype) if ctx.weight_needs_grad else None
            return gh, gw, None, None, None

    return FusedLinearCrossEntropy


def fused_linear_cross_entropy(hidden, weight, labels, num_items_in_batch=None, loss_rows=None):
    """Mean (or sum / num_items_in_batch) next-token cross-entropy of `hidden @ weight.T` against `labels`.

    hidden [B, T, H] (final-norm output), labels [B, T] unshifted (as HF models take them; -100 = ignored).
    loss_rows: the flat indices of the trained shifted positions (tunelab's collators compute them on the CPU);
    without them they are found here, which costs one GPU->CPU synchronisation.
    """
    import torch

    if _FusedLinearCE.fn is None:
        _FusedLinearCE.fn = _build_fn()
    h = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    if loss_rows is None:
        loss_rows = torch.nonzero(shift_labels != IGNORE_INDEX, as_tuple=False).flatten()
    if loss_rows.numel() == 0:
        return hidden.sum() * 0.0
    rows = h.index_select(0, loss_rows)
    targets = shift_labels.index_select(0, loss_rows)
    if num_items_in_batch is None:
        divisor = float(loss_rows.numel())
    elif torch.is_tensor(num_items_in_batch):
        divisor = num_items_in_batch.to(device=hidden.device, dtype=torch.promote_types(hidden.dtype, torch.float32))  # no sync
    else:
        divisor = float(num_items_in_batch)
    return _FusedLinearCE.fn.apply(rows, weight, targets, divisor, weight.requires_grad)


def forward_hidden(model, inputs: dict):
    """Run the decoder (everything but the output head) and return (hidden states, head weight)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    kwargs = {k: v for k, v in inputs.items() if k not in ("labels", "loss_rows", "num_tokens")}
    kwargs["use_cache"] = False
    out = decoder(**kwargs)
    return out.last_hidden_state, base.get_output_embeddings().weight
