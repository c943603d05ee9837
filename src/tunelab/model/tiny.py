"""A tiny random-init Qwen2 model with the real Qwen2.5 tokenizer, for tests and the offline quickstart.

    python -c "from tunelab.model.tiny import build_tiny_model; print(build_tiny_model('saves/tiny-qwen2'))"

The folder it writes loads like any hub model (`AutoModelForCausalLM.from_pretrained(out_dir)`): config.json,
model.safetensors (float32), generation_config.json, and the tokenizer from `build_qwen_tokenizer`. The vocabulary
is Qwen2.5's full 151936 rows, so every tokenizer id fits. Weights depend only on the seed and sizes; a marker file
(`tunelab_tiny.json`) records them, and a second call with the same arguments returns at once.
"""
from __future__ import annotations

import json
import os
from typing import Any

from tunelab.model.tokenizer import build_qwen_tokenizer

MARKER_FILE = "tunelab_tiny.json"
MARKER_VERSION = 2
LM_HEAD_STD = 0.3
QWEN2_5_VOCAB_SIZE = 151936  # the embedding rows of real Qwen2.5 models (ids up to 151664 are used)
ENDOFTEXT_ID = 151643
IM_END_ID = 151645


def _spec(seed: int, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
          intermediate_size: int, max_position_embeddings: int) -> dict[str, Any]:
    """What a build depends on; stored in the marker file."""
    return {
        "version": MARKER_VERSION,
        "seed": seed,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "vocab_size": QWEN2_5_VOCAB_SIZE,
    }


def _already_built(out_dir: str, spec: dict[str, Any]) -> bool:
    """Whether out_dir holds a finished build with exactly these parameters."""
    marker = os.path.join(out_dir, MARKER_FILE)
    if not os.path.isfile(marker) or not os.path.isfile(os.path.join(out_dir, "model.safetensors")):
        return False
    try:
        with open(marker, encoding="utf-8") as f:
            return json.load(f) == spec
    except (OSError, json.JSONDecodeError):
        return False


def _qwen2_config(spec: dict[str, Any]) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=spec["vocab_size"],
        hidden_size=spec["hidden_size"],
        num_hidden_layers=spec["num_layers"],
        num_attention_heads=spec["num_heads"],
        num_key_value_heads=spec["num_kv_heads"],
        intermediate_size=spec["intermediate_size"],
        max_position_embeddings=spec["max_position_embeddings"],
        tie_word_embeddings=False,
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=IM_END_ID,
        pad_token_id=ENDOFTEXT_ID,
        dtype="float32",
    )


def _generation_config() -> Any:
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=ENDOFTEXT_ID, eos_token_id=[IM_END_ID, ENDOFTEXT_ID], pad_token_id=ENDOFTEXT_ID
    )


def build_tiny_model(
    out_dir: str,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 4096,
) -> str:
    """Write a tiny random Qwen2ForCausalLM plus the Qwen2.5 tokenizer to out_dir (reused if already there)."""
    import torch
    from transformers import Qwen2ForCausalLM

    spec = _spec(seed, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, max_position_embeddings)
    if _already_built(out_dir, spec):
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    marker = os.path.join(out_dir, MARKER_FILE)
    if os.path.exists(marker):
        os.remove(marker)  # a half-written folder must not pass for a finished build
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(_qwen2_config(spec)).to(torch.float32)
    # A wider output head than the usual 0.02 init: the final RMSNorm caps |h| at ~sqrt(hidden), so with 0.02 the
    # logits could never separate one token from 152k others and the quickstart's loss could barely fall.
    torch.nn.init.normal_(model.lm_head.weight, std=LM_HEAD_STD)
    model.generation_config = _generation_config()
    model.save_pretrained(out_dir, safe_serialization=True)
    build_qwen_tokenizer(out_dir)
    with open(marker, "w", encoding="utf-8") as f:
        json.dump(spec, f, indent=2)
    return out_dir


def quantize_decoder_linears_nf4(model, compute_dtype=None) -> None:
    """Replace every nn.Linear of each decoder layer's attention and MLP by bitsandbytes' Linear4bit (NF4, double
    quantization, bf16 storage), in place, for the CPU tests and tools of the 4-bit path. The weights quantize when
    the model is moved to a device afterwards (`model.to(...)`: Params4bit quantizes on its move)."""
    import bitsandbytes as bnb
    import torch

    compute_dtype = compute_dtype or torch.bfloat16
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                          compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True,
                                          quant_storage=torch.bfloat16)
                    q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True, quant_storage=torch.bfloat16)
                    if lin.bias is not None:
                        q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
                    setattr(parent, name, q)
