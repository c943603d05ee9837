"""The base weights a QLoRA adapter was trained on: each quantized weight rounded through bitsandbytes' NF4/FP4
(or int8) and back, exactly as the 4-bit (8-bit) loader stored it during training.

    rounding = QuantRounding(bits=4, quant_type="nf4", double_quant=True, compute_dtype="bfloat16")
    names = quantized_weight_names(config)          # which base weights the loader quantizes
    w_trained = rounding(w)                         # float32 in, float32 out

Why: QLoRA learns its update against the rounded weights W_q, not the original W. Merging into W gives
W + BA, which differs from the trained model W_q + BA by (W - W_q): small per weight but visible in the logits.
`export_base: dequantized` merges into W_q instead, so the merged model equals what was trained.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunelab.errors import ModelError


@dataclass(frozen=True)
class QuantRounding:
    bits: int
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"  # the loader casts weights to the compute dtype before quantizing them
    blocksize: int = 64  # bitsandbytes' Params4bit default, which transformers' 4-bit loading uses

    def __call__(self, weight):
        import torch

        try:
            import bitsandbytes.functional as bnbf
        except ImportError:
            raise ModelError("export_base: dequantized needs bitsandbytes: pip install 'bitsandbytes>=0.49'.") from None
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.compute_dtype]
        w = weight.to(dtype).contiguous()
        if self.bits == 4:
            packed, state = bnbf.quantize_4bit(w, blocksize=self.blocksize, compress_statistics=self.double_quant, quant_type=self.quant_type)
            return bnbf.dequantize_4bit(packed, state).float()
        # LLM.int8: per-row absmax int8; the outlier path also multiplies with these dequantized rows
        codes, row_scale, _ = bnbf.int8_vectorwise_quant(w.half())
        return codes.float() * (row_scale.float() / 127.0).unsqueeze(1)

    def describe(self) -> str:
        if self.bits == 4:
            return f"{self.quant_type} 4-bit (double quantization {'on' if self.double_quant else 'off'}, blocks of {self.blocksize}, from {self.compute_dtype})"
        return "LLM.int8 8-bit"


def quantized_weight_names(model_config: Any) -> set[str]:
    """Weight keys the bitsandbytes loader replaces by 4/8-bit layers: every nn.Linear except the ones
    transformers keeps in full precision (output head, tied weights, _keep_in_fp32_modules)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    skip = list(get_keys_to_not_convert(model)) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return {
        f"{name}.weight"
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and should_convert_module(name, skip)
    }
