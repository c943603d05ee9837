"""Model shapes: the handful of numbers of a decoder's config.json that decide its memory, and where they come from.

    shape = model_shape("Qwen/Qwen2.5-7B-Instruct")     # HF cache config.json if present, else the built-in table
    shape = model_shape("saves/merged")                  # a local folder with config.json
    shape = model_shape("path/to/config.json")

Only the config is read, never weights. The built-in table holds the published config.json values (hidden,
intermediate, layers, heads, kv heads, head_dim, vocab, tie_word_embeddings, max_position_embeddings) of the
Qwen2 / Qwen2.5 / Qwen3 dense models of every size and Llama-3-8B, so the estimate works offline.
A config of another architecture is modelled as the generic pre-norm decoder (attention + gated MLP) with a
warning, as long as it names the sizes this needs.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace

from tunelab.errors import ConfigError


@dataclass(frozen=True)
class ModelShape:
    name: str
    family: str  # qwen2 | qwen3 | llama | <other model_type>
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool  # tie_word_embeddings: the output head is the embedding matrix
    max_positions: int
    qkv_bias: bool  # Qwen2/2.5 carry a bias on q, k, v
    qk_norm: bool  # Qwen3 normalises q and k per head
    rope_scaling: bool = False
    source: str = "built-in"
    warning: str | None = None

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def _qwen2(name, h, i, l, n, kv, vocab, tied, maxpos):
    return ModelShape(name, "qwen2", h, i, l, n, kv, h // n, vocab, tied, maxpos, True, False)


def _qwen3(name, h, i, l, n, kv, tied):
    return ModelShape(name, "qwen3", h, i, l, n, kv, 128, 151936, tied, 40960, False, True)


_BASE = [
    # Qwen2 (the base configs; the -Instruct entries below differ only in max_position_embeddings)
    _qwen2("Qwen/Qwen2-0.5B", 896, 4864, 24, 14, 2, 151936, True, 131072),
    _qwen2("Qwen/Qwen2-1.5B", 1536, 8960, 28, 12, 2, 151936, True, 131072),
    _qwen2("Qwen/Qwen2-7B", 3584, 18944, 28, 28, 4, 152064, False, 131072),
    _qwen2("Qwen/Qwen2-72B", 8192, 29568, 80, 64, 8, 152064, False, 131072),
    # Qwen2.5
    _qwen2("Qwen/Qwen2.5-0.5B", 896, 4864, 24, 14, 2, 151936, True, 32768),
    _qwen2("Qwen/Qwen2.5-1.5B", 1536, 8960, 28, 12, 2, 151936, True, 131072),
    _qwen2("Qwen/Qwen2.5-3B", 2048, 11008, 36, 16, 2, 151936, True, 32768),
    _qwen2("Qwen/Qwen2.5-7B", 3584, 18944, 28, 28, 4, 152064, False, 131072),
    _qwen2("Qwen/Qwen2.5-14B", 5120, 13824, 48, 40, 8, 152064, False, 131072),
    _qwen2("Qwen/Qwen2.5-32B", 5120, 27648, 64, 40, 8, 152064, False, 131072),
    _qwen2("Qwen/Qwen2.5-72B", 8192, 29568, 80, 64, 8, 152064, False, 131072),
    # Qwen3 dense (head_dim 128 throughout, q/k norms, no qkv bias)
    _qwen3("Qwen/Qwen3-0.6B", 1024, 3072, 28, 16, 8, True),
    _qwen3("Qwen/Qwen3-1.7B", 2048, 6144, 28, 16, 8, True),
    _qwen3("Qwen/Qwen3-4B", 2560, 9728, 36, 32, 8, True),
    _qwen3("Qwen/Qwen3-8B", 4096, 12288, 36, 32, 8, False),
    _qwen3("Qwen/Qwen3-14B", 5120, 17408, 40, 40, 8, False),
    _qwen3("Qwen/Qwen3-32B", 5120, 25600, 64, 64, 8, False),
    ModelShape("meta-llama/Meta-Llama-3-8B", "llama", 4096, 14336, 32, 32, 8, 128, 128256, False, 8192, False, False),
]


def _builtins() -> dict[str, ModelShape]:
    table: dict[str, ModelShape] = {}
    for s in _BASE:
        table[s.name.lower()] = s
        if s.family == "qwen3":  # Qwen3's hybrid models are the chat models; -Base is the pre-trained one
            table[(s.name + "-Base").lower()] = replace(s, name=s.name + "-Base")
        elif s.family == "qwen2":  # the -Instruct configs publish 32768 positions
            table[(s.name + "-Instruct").lower()] = replace(s, name=s.name + "-Instruct", max_positions=32768)
        else:
            table[(s.name + "-Instruct").lower()] = replace(s, name=s.name + "-Instruct")
    return table


BUILTIN = _builtins()
ALIASES = {"qwen2.5-7b": "Qwen/Qwen2.5-7B", "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B", "llama-3-8b": "meta-llama/Meta-Llama-3-8B"}


def shape_from_config(cfg: dict, name: str, source: str) -> ModelShape:
    """A ModelShape from a parsed config.json; unknown architectures get the generic decoder and a warning."""
    cfg = cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg
    need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in need if not isinstance(cfg.get(k), int)]
    if missing:
        raise ConfigError(f"{source} has no {', '.join(missing)}: cannot estimate memory for a model without these sizes.")
    model_type = str(cfg.get("model_type", "unknown"))
    family = {"qwen2": "qwen2", "qwen3": "qwen3", "llama": "llama"}.get(model_type, model_type)
    heads = cfg["num_attention_heads"]
    warning = None
    if family not in ("qwen2", "qwen3", "llama"):
        warning = (f"{name}: architecture '{model_type}' is not modelled exactly; estimating it as a generic "
                   "pre-norm decoder (attention + gated MLP) of the same sizes.")
    if cfg.get("num_experts") or cfg.get("num_local_experts"):
        warning = f"{name}: a mixture-of-experts model; estimated as a dense decoder of the same sizes (an overestimate)."
    return ModelShape(
        name=name, family=family, hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"],
        layers=cfg["num_hidden_layers"], heads=heads, kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads), vocab=cfg["vocab_size"],
        # absent from config.json: the model class's default (False for these families, True in PretrainedConfig)
        tied=bool(cfg.get("tie_word_embeddings", family not in ("qwen2", "qwen3", "llama"))),
        max_positions=int(cfg.get("max_position_embeddings") or 0), qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias")),
        qk_norm=family == "qwen3", rope_scaling=bool(cfg.get("rope_scaling")), source=source, warning=warning,
    )


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path} as a model config: {exc}.") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} is not a model config (expected a JSON object).")
    return doc


def _cached_config(hub_id: str) -> str | None:
    """config.json of a hub id from the local Hugging Face cache only (never the network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        path = try_to_load_from_cache(hub_id, "config.json")
    except Exception:  # a malformed id: treated as not cached
        return None
    return path if isinstance(path, str) and os.path.isfile(path) else None


def model_shape(model: str) -> ModelShape:
    """The shape of MODEL: a config.json, a folder holding one, a hub id (HF cache, else built-in), or an alias."""
    if not model or not model.strip():
        raise ConfigError("no model given: name a hub id (Qwen/Qwen2.5-7B-Instruct), a model folder or a config.json.")
    model = model.strip()
    if os.path.isfile(model):
        return shape_from_config(_read_json(model), model, model)
    if os.path.isdir(model):
        path = os.path.join(model, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"model folder '{model}' has no config.json.")
        return shape_from_config(_read_json(path), model, path)
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or model.endswith(".json"):
        raise ConfigError(f"model path '{model}' does not exist.")
    cached = _cached_config(model)
    if cached:
        return shape_from_config(_read_json(cached), model, f"{model} (Hugging Face cache)")
    key = ALIASES.get(model.lower(), model).lower()
    if key in BUILTIN:
        return BUILTIN[key]
    raise ConfigError(
        f"unknown model '{model}': it is not in the Hugging Face cache of this machine and not one of the built-in "
        "configs (Qwen2 / Qwen2.5 / Qwen3 of every size, Meta-Llama-3-8B). Give a local folder or a config.json "
        "(only the config is read), e.g. `tunelab estimate path/to/config.json`."
    )
