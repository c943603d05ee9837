"""Pre-quantized checkpoints (GPTQ / AWQ / AQLM ...: a quantization_config in config.json) in the model loader:
decided from the config before any weight is read. A missing quantization library, or tunelab's own
quantization_bit on top, is a ModelError sentence; an ImportError transformers raises while loading is one too.

The model folders hold a tiny Qwen2 config.json and no weights: no test here gets as far as reading weights.
"""
from __future__ import annotations

import json
import os

import pytest

from tunelab.config import load_config
from tunelab.config.resolve import resolve
from tunelab.errors import ModelError
from tunelab.model import loader

GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")


def _model_dir(tmp_path, quantization_config: dict | None) -> str:
    """A local model folder with only config.json (2 layers, hidden 64), its quantization_config as given."""
    from transformers import Qwen2Config

    path = str(tmp_path / "tiny-quantized")
    Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256).save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


@pytest.fixture
def weight_loads(monkeypatch) -> list:
    """Every call of AutoModelForCausalLM.from_pretrained, recorded; each one raises ImportError as transformers'
    GPTQ quantizer does when optimum is missing (so a test that expects no load sees the list stay empty)."""
    import transformers

    calls: list = []

    def fake(path, **kwargs):
        calls.append((path, kwargs))
        raise ImportError("Loading a GPTQ quantized model requires optimum (`pip install optimum`)")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", staticmethod(fake))
    return calls


def _load(path: str, **keys):
    cfg = load_config({"model_name_or_path": path, **keys})
    return loader.load_base_model(cfg, resolve(cfg))


def test_gptq_model_without_its_library_is_one_sentence_and_nothing_is_loaded(tmp_path, monkeypatch, weight_loads):
    path = _model_dir(tmp_path, GPTQ)
    monkeypatch.setattr(loader, "_importable", lambda module: False)
    with pytest.raises(ModelError) as err:
        _load(path)
    assert str(err.value) == (
        f"model_name_or_path '{path}' is a GPTQ-quantized model (quant_method 'gptq' in its config.json); loading it "
        "needs `pip install optimum gptqmodel` (LoRA on a GPTQ base), or use the unquantized model with "
        "quantization_bit: 4."
    )
    assert weight_loads == []


def test_one_missing_module_is_enough_to_refuse(tmp_path, monkeypatch, weight_loads):
    path = _model_dir(tmp_path, {"quant_method": "AWQ", "bits": 4, "version": "gemm"})
    seen: list[str] = []
    monkeypatch.setattr(loader, "_importable", lambda module: seen.append(module) or module != "gptqmodel")
    with pytest.raises(ModelError, match=r"is an AWQ-quantized model \(quant_method 'awq' .*`pip install gptqmodel`"):
        _load(path)
    assert seen == ["gptqmodel"] and weight_loads == []


def test_quantization_bit_on_a_prequantized_model_is_a_contradiction(tmp_path, monkeypatch, weight_loads):
    path = _model_dir(tmp_path, GPTQ)
    monkeypatch.setattr(loader, "_importable", lambda module: True)  # the library present: still refused
    with pytest.raises(ModelError) as err:
        _load(path, quantization_bit=4)
    assert str(err.value) == (
        f"model_name_or_path '{path}' is already a GPTQ-quantized model (quant_method 'gptq' in its config.json), "
        "so quantization_bit: 4 cannot quantize it again with bitsandbytes: remove quantization_bit to train LoRA on "
        "the GPTQ base, or use the unquantized model with quantization_bit: 4."
    )
    assert weight_loads == []


def test_with_its_library_transformers_loads_it_and_an_import_error_is_a_sentence(tmp_path, monkeypatch, weight_loads):
    path = _model_dir(tmp_path, GPTQ)
    monkeypatch.setattr(loader, "_importable", lambda module: True)
    with pytest.raises(ModelError) as err:
        _load(path)
    assert str(err.value) == (
        f"model_name_or_path '{path}' is a GPTQ-quantized model and cannot be loaded without a library that is "
        "missing here: Loading a GPTQ quantized model requires optimum (`pip install optimum`)"
    )
    # handed to transformers once, with the checkpoint's own quantization (tunelab adds no BitsAndBytesConfig)
    assert len(weight_loads) == 1 and "quantization_config" not in weight_loads[0][1]
    assert weight_loads[0][1]["config"].quantization_config["quant_method"] == "gptq"


def test_real_transformers_import_error_on_a_gptq_checkpoint_is_a_sentence(tmp_path, monkeypatch):
    """Unpatched from_pretrained: transformers' own GPTQ quantizer refuses (optimum is not installed here) before
    it looks for weights; the loader turns that ImportError into a ModelError."""
    if loader._importable("optimum"):
        pytest.skip("optimum is installed")
    path = _model_dir(tmp_path, GPTQ)
    monkeypatch.setattr(loader, "_importable", lambda module: True)
    with pytest.raises(ModelError, match=r"is a GPTQ-quantized model and cannot be loaded .*requires optimum"):
        _load(path)


def test_bitsandbytes_and_plain_configs_are_not_prequantized(tmp_path):
    from transformers import AutoConfig

    bnb = AutoConfig.from_pretrained(_model_dir(tmp_path, {"quant_method": "bitsandbytes", "load_in_4bit": True}))
    assert loader.prequantized_method(bnb) is None
    plain = AutoConfig.from_pretrained(_model_dir(tmp_path, None))
    assert loader.prequantized_method(plain) is None
    fp8 = AutoConfig.from_pretrained(_model_dir(tmp_path, {"quant_method": "fp8", "weight_block_size": [128, 128]}))
    assert loader.prequantized_method(fp8) == "fp8"
