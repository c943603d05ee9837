"""Variable-length attention for packed rows: each sample attends within itself only, through FlashAttention's
varlen kernel (on by default with `packing: true` on the fast path; TUNELAB_VARLEN=0 keeps the masked SDPA path).

    if enabled() and cfg.packing: install(model)       # fast path (__init__.py): "varlen-attention" when it took
    Collator(pad_id, 8, varlen=True)                   # packed batches then carry cu_seq_lens_q / cu_seq_lens_k

Packed rows (`packing: true`) hold several samples, their position ids restarting at 0. transformers' SDPA path
keeps the samples apart with a block-diagonal mask built from the position ids; SDPA's flash kernel takes no mask,
so a masked kernel (cuDNN's or the memory-efficient one) runs over every row's whole [length x length] score
matrix, most of it masked (an alpaca-like row of 1,024 tokens holds ~3.4 samples: ~70% of the causal scores cross
a sample boundary). Here the collator writes each batch's sample boundaries on the CPU (`boundaries`: the
cumulative lengths over the flattened rows, transformers' `cu_seq_lens_q` convention; no GPU sync), and the
attention runs over the flattened [rows x length] tokens in torch's own FlashAttention-2 varlen kernel
(`torch.ops.aten._flash_attention_forward`, differentiable, grouped-query heads native): causal within each
sample, only each sample's own scores computed. A row's padding tail is one more "sample" (the collator gives it
position ids 0, 1, ...), attended by nothing real. The maximum length passed to the kernel is the row length (an
upper bound sizes its grid; the true maximum would be one more integer that changes every batch, a recompile
under torch.compile).

Measured on an H200 (Qwen2.5-7B QLoRA, alpaca-like packed 4 x 1024; runs 21-22 of docs/fastpath.md, two leases):
11,548-12,187 real tok/s (3 cases) against 10,323-11,755 for the masked SDPA path (7 cases) and 10,929-11,894 for
lease J's code (3 cases), the same losses, the same peak; so it is on by default where it applies.

Where it does not apply it leaves transformers' SDPA as it was: batches without boundaries (evaluation, unpacked
data) go through `sdpa_attention_forward` with their mask, as do sliding-window layers and inputs the flash
kernel does not take (fp32, a head size over 256 or not a multiple of 8); a GPU older than Ampere (compute
capability 8.0: a T4, a V100), or a ROCm build, keeps SDPA (`install` returns False); off CUDA the same
boundaries run one SDPA call per sample (the reference the CPU tests compare with, and CPU training's path).
`install` only replaces SDPA (eager, or a FlashAttention package chosen by `flash_attn`, stay).
"""
from __future__ import annotations

import os

NAME = "tunelab_varlen"
APPLIED = "varlen-attention"  # its entry in the fast path's applied list (model.tunelab_fast_path)


def enabled() -> bool:
    """On unless TUNELAB_VARLEN=0 (the masked SDPA path: the A/B)."""
    return os.environ.get("TUNELAB_VARLEN", "1") != "0"


def flash_fits(query) -> bool:
    """Whether torch's FlashAttention kernel takes these [batch, heads, length, dim] CUDA queries: fp16 / bf16, a
    head size up to 256 and a multiple of 8."""
    import torch

    dim = query.shape[-1]
    return query.dtype in (torch.float16, torch.bfloat16) and dim <= 256 and dim % 8 == 0


def device_fits(device) -> bool:
    """A CUDA device FlashAttention-2's varlen kernel runs on: an NVIDIA GPU of compute capability 8.0 or newer (a
    ROCm build is left on the masked path: its varlen support is not checked here); any other device: True (the
    CPU takes the per-sample path)."""
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return True
    if getattr(torch.version, "hip", None):
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def active(model) -> bool:
    """Whether the fast path installed this attention on `model` (its collator must then give the boundaries)."""
    return APPLIED in (getattr(model, "tunelab_fast_path", None) or [])


def boundaries(position_ids):
    """cu_seq_lens of packed rows: int32 [samples + 1], the start of every sample (each place a row's position id
    is 0, the rows taken in order as one flat sequence) and the total token count. `position_ids`: [rows, length]
    on the CPU, every row starting at 0."""
    import torch

    flat = position_ids.reshape(-1)
    if flat.numel() and position_ids[:, 0].ne(0).any():
        raise ValueError("packed rows must start with position id 0")
    starts = torch.nonzero(flat == 0, as_tuple=False).flatten()
    return torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)


def _flash(q, k, v, cu, max_len: int, scale, dropout: float):
    import torch

    out = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, dropout, True, False,
                                                  scale=scale)
    return out[0]


def _per_sample(q, k, v, cu, scale, dropout: float):
    """The same attention one sample at a time through SDPA ([tokens, heads, dim] in and out)."""
    import torch
    import torch.nn.functional as F

    outs = []
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout, is_causal=True, scale=scale,
                                                   enable_gqa=ks.shape[0] != qs.shape[0]).transpose(0, 1))
    return torch.cat(outs) if outs else q.new_empty(q.shape)


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                      cu_seq_lens_q=None, **kwargs):
    """transformers' attention-interface signature: query [batch, heads, length, dim], key / value with the kv
    heads; returns ([batch, length, heads, dim], None) as SDPA's does."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (cu_seq_lens_q is None or kwargs.get("sliding_window") is not None or query.shape[2] != key.shape[2]
            or (query.is_cuda and not flash_fits(query))):  # the mask transformers built from the position ids
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    b, heads, length, dim = query.shape
    q = query.transpose(1, 2).reshape(b * length, heads, dim)
    k = key.transpose(1, 2).reshape(b * length, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(b * length, value.shape[1], dim)
    p = dropout if module.training else 0.0
    cu = cu_seq_lens_q.to(device=q.device, dtype=torch.int32)
    if q.is_cuda:
        out = _flash(q, k, v, cu, length, scaling, p)
    else:
        out = _per_sample(q, k, v, cu, scaling, p)
    return out.reshape(b, length, heads, dim), None


def register() -> None:
    """The attention function and its mask function (SDPA's: batches without boundaries keep their mask) under
    NAME in transformers' registries."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def install(model) -> bool:
    """Switch the model's SDPA attention to NAME; False (nothing changed) when it does not use SDPA."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) != "sdpa":
        return False
    if not all(device_fits(d) for d in {p.device for p in base.parameters()}):  # a T4 / V100: no FlashAttention-2
        return False
    register()
    if hasattr(base, "set_attn_implementation"):
        try:
            base.set_attn_implementation(NAME)
        except (ValueError, ImportError, KeyError) as e:  # a transformers that refuses the registered name
            import logging

            logging.getLogger(__name__).warning("varlen attention not installed: %s", str(e).splitlines()[0][:200])
            return False
    else:  # an older 5.x: the config field the attention layers read
        for module in base.modules():
            config = getattr(module, "config", None)
            if config is not None and getattr(config, "_attn_implementation", None) == "sdpa":
                config._attn_implementation = NAME
    return getattr(base.config, "_attn_implementation", None) == NAME
