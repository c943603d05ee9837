"""A PEFT LoRA adapter read as plain tensors, and the weight update it makes to each base weight.

    adapter = LoraAdapter.load("saves/run")
    adapter.check_fits(base_shapes, base_name="Qwen/Qwen2.5-7B")   # shape / target mismatch -> ModelError
    w = adapter.apply("model.layers.0.self_attn.q_proj.weight", w)  # fp32 in, fp32 out

Supported: LoRA and rsLoRA on linear layers (incl. fan_in_fan_out), LoRA on embeddings, DoRA on linear layers,
alpha_pattern / per-module ranks (the rank is read from the tensors), and full replacement weights saved with the
adapter (modules_to_save, e.g. lm_head; an embedding base layer saved with save_embedding_layers). The update
follows PEFT's own `get_delta_weight` / DoRA merge, computed in float32.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from tunelab.errors import ModelError

_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
_UNSUPPORTED = {
    "lora_bias": "LoRA bias terms (lora_bias: true)",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "trainable_token_indices": "trainable token indices",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
}


@dataclass
class LoraModule:
    name: str  # base module name, e.g. model.layers.0.self_attn.q_proj
    tensors: dict[str, Any] = field(default_factory=dict)  # part -> tensor
    scale: float = 1.0

    @property
    def is_embedding(self) -> bool:
        return "lora_embedding_A" in self.tensors


class LoraAdapter:
    """The tensors of one adapter folder, grouped by the base module they change."""

    def __init__(self, path: str, config: dict[str, Any], modules: dict[str, LoraModule], replacements: dict[str, Any]):
        self.path = path
        self.config = config
        self.modules = modules  # base weight key ("<module>.weight") -> LoraModule
        self.replacements = replacements  # base weight key -> full tensor saved with the adapter
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out"))

    @classmethod
    def load(cls, path: str) -> "LoraAdapter":
        config_path = os.path.join(path, "adapter_config.json")
        with open(config_path, encoding="utf-8") as fh:
            config = json.load(fh)
        if str(config.get("peft_type", "LORA")).upper() != "LORA":
            raise ModelError(f"adapter '{path}' is a {config.get('peft_type')} adapter; tunelab export merges LoRA adapters only.")
        for key, what in _UNSUPPORTED.items():
            if config.get(key):
                raise ModelError(f"adapter '{path}' uses {what}, which tunelab export cannot merge yet; merge it with PEFT's merge_and_unload.")
        tensors = _read_tensors(path)
        modules: dict[str, LoraModule] = {}
        replacements: dict[str, Any] = {}
        for key, tensor in tensors.items():
            parts = key.split(".")
            if parts[:2] == ["base_model", "model"]:
                parts = parts[2:]
            hit = next((i for i, p in enumerate(parts) if p in _PARTS), None)
            if hit is None:  # a full weight saved with the adapter (modules_to_save, an embedding base layer)
                name = ".".join(p for p in parts if p != "base_layer")
                name = re.sub(r"\.modules_to_save\.[^.]+", "", name)
                replacements[name] = tensor
                continue
            module = ".".join(parts[:hit])
            modules.setdefault(module + ".weight", LoraModule(module)).tensors[parts[hit]] = tensor
        for mod in modules.values():
            mod.scale = _scale(config, mod)
        if not modules and not replacements:
            raise ModelError(f"adapter '{path}' holds no LoRA weights (adapter_model.safetensors is empty).")
        return cls(path, config, modules, replacements)

    # ----- checks ---------------------------------------------------------------------------------------------
    def check_fits(self, base_shapes: dict[str, tuple[int, ...]], base_name: str) -> None:
        """Every adapted / replaced weight exists in the base with the shape the adapter expects."""
        trained_on = self.config.get("base_model_name_or_path")
        origin = f" The adapter was trained on '{trained_on}'." if trained_on else ""
        for key, mod in sorted(self.modules.items()):
            if key not in base_shapes:
                raise ModelError(
                    f"adapter '{self.path}' does not fit base model '{base_name}': it adapts '{mod.name}', but the base "
                    f"has no weight '{key}'.{origin}"
                )
            expected = tuple(base_shapes[key])
            found = self._expected_shape(mod)
            if found != expected:
                shapes = ", ".join(f"{p} {list(t.shape)}" for p, t in sorted(mod.tensors.items()))
                raise ModelError(
                    f"adapter '{self.path}' does not fit base model '{base_name}': '{key}' is {list(expected)} in the base, "
                    f"but the adapter expects {list(found)} ({shapes}).{origin}"
                )
        for key, tensor in sorted(self.replacements.items()):
            if key not in base_shapes:
                raise ModelError(f"adapter '{self.path}' does not fit base model '{base_name}': it replaces '{key}', which the base does not have.{origin}")
            if tuple(tensor.shape) != tuple(base_shapes[key]):
                raise ModelError(
                    f"adapter '{self.path}' does not fit base model '{base_name}': '{key}' is {list(base_shapes[key])} in the base, "
                    f"but the adapter saved it as {list(tensor.shape)} (a resized vocabulary?).{origin}"
                )

    def _expected_shape(self, mod: LoraModule) -> tuple[int, ...]:
        t = mod.tensors
        if mod.is_embedding:
            return (t["lora_embedding_A"].shape[1], t["lora_embedding_B"].shape[0])
        if "lora_A" not in t or "lora_B" not in t:
            raise ModelError(f"adapter '{self.path}' is incomplete: '{mod.name}' lacks lora_A or lora_B.")
        out_in = (t["lora_B"].shape[0], t["lora_A"].shape[1])
        return out_in[::-1] if self.fan_in_fan_out else out_in

    # ----- merging --------------------------------------------------------------------------------------------
    def touches(self, key: str) -> bool:
        return key in self.modules or key in self.replacements

    def apply(self, key: str, weight):
        """The base weight `key` (float32) after merging this adapter (float32)."""
        if key in self.replacements:
            weight = self.replacements[key].to(weight.device, weight.dtype)
        mod = self.modules.get(key)
        if mod is None:
            return weight
        t = {p: v.to(weight.device, weight.dtype) for p, v in mod.tensors.items()}
        if mod.is_embedding:
            return weight + (t["lora_embedding_B"] @ t["lora_embedding_A"]).T * mod.scale
        delta = (t["lora_B"] @ t["lora_A"]) * mod.scale
        if self.fan_in_fan_out:
            delta = delta.T
        if "lora_magnitude_vector" not in t:
            return weight + delta
        if self.fan_in_fan_out:
            raise ModelError(f"adapter '{self.path}': DoRA with fan_in_fan_out cannot be merged by tunelab export.")
        merged = weight + delta  # DoRA: rescale each output row to the trained magnitude (PEFT's merge)
        norm = merged.norm(p=2, dim=1)
        return merged * (t["lora_magnitude_vector"] / norm).unsqueeze(1)


def _scale(config: dict[str, Any], mod: LoraModule) -> float:
    """alpha / r (or alpha / sqrt(r) for rsLoRA); the rank is read from the tensors, alpha from alpha_pattern."""
    a = mod.tensors.get("lora_A", mod.tensors.get("lora_embedding_A"))
    if a is None:
        return 1.0
    r = a.shape[0]
    alpha = config.get("lora_alpha", r)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", mod.name):
            alpha = value
            break
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _read_tensors(path: str) -> dict[str, Any]:
    st = os.path.join(path, "adapter_model.safetensors")
    if os.path.isfile(st):
        from safetensors.torch import load_file

        return load_file(st, device="cpu")
    import torch

    return torch.load(os.path.join(path, "adapter_model.bin"), map_location="cpu", weights_only=True)
