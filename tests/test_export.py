"""`tunelab export`: streaming merge of LoRA / QLoRA adapters trained by the real trainer, verification, refusals."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from helpers_infer import lora_run, tiny_run as _tiny_run  # noqa: F401 (fixture)

from tunelab.data.conversation import Conversation


@pytest.fixture(scope="session")
def qlora_run(tmp_path_factory):
    return _tiny_run(tmp_path_factory, "qlora4", quantization_bit=4)


def _export(**keys):
    from tunelab.config import load_config
    from tunelab.export import run_export

    return run_export(load_config(keys))


def _greedy(model, tokenizer, text: str, n: int = 12) -> list[int]:
    import torch

    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False)
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, eos_token_id=[151645, 151643], pad_token_id=151643)
    return out[0, len(ids):].tolist()


def test_export_lora_matches_base_plus_adapter(lora_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.config import load_config
    from tunelab.infer import Engine

    model, run = lora_run
    out = tmp_path / "merged"
    result = _export(model_name_or_path=model, adapter_name_or_path=run, export_dir=str(out), export_ollama=True)
    assert result.parity.max_abs_diff < 1e-3 and result.parity.top1_agreement == 1.0
    assert result.shift is None  # a 16-bit adapter: no quantization shift
    assert result.dtype == "float32"  # auto = the base checkpoint's dtype
    assert sorted(os.listdir(out)) == [
        "Modelfile", "README.md", "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json",
    ]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".merged")]  # no temporary folder left
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert f"- base model: `{model}`" in readme and f"- adapter(s): `{run}`" in readme
    assert 'PARAMETER stop "<|im_end|>"' in (out / "Modelfile").read_text(encoding="utf-8")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [151645, 151643]

    merged = AutoModelForCausalLM.from_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    engine = Engine.from_config(load_config({"model_name_or_path": model, "adapter_name_or_path": run, "do_sample": False, "max_new_tokens": 12}))
    for text in ("Hello!", "What is the capital of France?"):
        conv = Conversation(messages=[{"role": "user", "content": text}])
        expected = engine.generate_ids([engine.encode(conv)])[0]
        got = _greedy(merged, tokenizer, text)
        got = got[: next((i for i, t in enumerate(got) if t in (151645, 151643)), len(got))]
        assert got == expected
    ids = torch.tensor([engine.encode(Conversation(messages=[{"role": "user", "content": "Hi"}]))])
    with torch.inference_mode():
        diff = (merged(ids).logits - engine.model(input_ids=ids).logits).abs().max()
    assert float(diff) < 1e-4


def test_export_qlora_original_and_dequantized(qlora_run, tmp_path, caplog):
    import logging

    model, run = qlora_run
    with caplog.at_level(logging.WARNING, logger="tunelab"):
        original = _export(model_name_or_path=model, adapter_name_or_path=run, export_dir=str(tmp_path / "orig"), quantization_bit=4)
    assert "quantization_bit=4 is not used for the merge: the base model is loaded unquantized (16-bit)" in caplog.text
    assert original.parity.max_abs_diff < 1e-3  # vs the 16-bit base + adapter
    assert original.shift is not None and original.shift.max_abs_diff > 0.05  # the NF4 rounding shows in the logits
    deq = _export(model_name_or_path=model, adapter_name_or_path=run, export_dir=str(tmp_path / "deq"), export_base="dequantized")
    # vs the 4-bit base + adapter (what was trained): much closer than the original merge
    assert deq.parity.max_abs_diff < deq.tolerance
    assert deq.parity.max_abs_diff < original.shift.max_abs_diff / 5
    assert "merged into the dequantized 4-bit base weights" in (tmp_path / "deq" / "README.md").read_text(encoding="utf-8")


def test_dequantized_rounding_equals_the_4bit_loader(qlora_run):
    """The rounding export uses is bit for bit what the 4-bit loader stores (and dequantizes) for training."""
    import bitsandbytes.functional as bnbf
    from safetensors.torch import load_file

    from tunelab.config import load_config
    from tunelab.config.resolve import resolve
    from tunelab.export.quant import QuantRounding, quantized_weight_names
    from tunelab.model.loader import load_base_model

    model_dir = qlora_run[0]
    cfg = load_config({"model_name_or_path": model_dir, "quantization_bit": 4})
    q = load_base_model(cfg, resolve(cfg), dtype="float32")
    from transformers import AutoConfig

    names = quantized_weight_names(AutoConfig.from_pretrained(model_dir))
    assert len(names) == 14 and "lm_head.weight" not in names and "model.layers.1.mlp.down_proj.weight" in names
    weights = load_file(os.path.join(model_dir, "model.safetensors"))
    rounding = QuantRounding(4, "nf4", True, "float32")
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        param = q.get_submodule(key[: -len(".weight")]).weight
        assert bool((bnbf.dequantize_4bit(param.data, param.quant_state).float() == rounding(weights[key])).all())


def test_sharded_merge_loads_and_equals_single_file(lora_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.export.lora import LoraAdapter
    from tunelab.export.merge import BaseCheckpoint, merge_weights

    model, run = lora_run
    base, adapter = BaseCheckpoint(model), LoraAdapter.load(run)
    one, many = tmp_path / "one", tmp_path / "many"
    for folder, gb in ((one, 5), (many, 0.01)):
        folder.mkdir()
        shutil.copy(os.path.join(model, "config.json"), folder)
        stats = merge_weights(base, [adapter], str(folder), dtype="bfloat16", shard_gb=gb)
        assert stats.merged == 14 and stats.tensors == 27
    assert sorted(os.listdir(one)) == ["config.json", "model.safetensors"]
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(stats.files) >= 3
    a = AutoModelForCausalLM.from_pretrained(str(one), dtype=torch.bfloat16).state_dict()
    b = AutoModelForCausalLM.from_pretrained(str(many), dtype=torch.bfloat16).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ checkpoints
def _fake_run(tmp_path, adapter_src: str, steps=(2, 4, 6), losses=None) -> str:
    run = tmp_path / "run"
    run.mkdir()
    for s in steps:
        ck = run / f"checkpoint-{s}"
        ck.mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(os.path.join(adapter_src, name), ck)
    if losses is not None:
        with open(run / "trainer_log.jsonl", "w", encoding="utf-8") as fh:
            for step, loss in losses:
                fh.write(json.dumps({"current_steps": step, "total_steps": 6, "loss": 9.0}) + "\n")
                if loss is not None:
                    fh.write(json.dumps({"current_steps": step, "total_steps": 6, "eval_loss": loss}) + "\n")
            fh.write('{"current_steps": 6, "eval_lo')  # a line cut by a kill is ignored
    return str(run)


def test_checkpoint_best_last_and_named(lora_run, tmp_path):
    from tunelab.model.adapters import pick_checkpoint

    run = _fake_run(tmp_path, lora_run[1], losses=[(2, 3.1), (4, 2.5), (6, 2.7)])
    assert pick_checkpoint(run, "best") == os.path.join(run, "checkpoint-4")
    assert pick_checkpoint(run, "last") == os.path.join(run, "checkpoint-6")
    assert pick_checkpoint(run, "checkpoint-2") == os.path.join(run, "checkpoint-2")
    assert pick_checkpoint(os.path.join(run, "checkpoint-6"), "best") == os.path.join(run, "checkpoint-4")


def test_checkpoint_errors(lora_run, tmp_path):
    from tunelab.errors import ConfigError, ModelError
    from tunelab.model.adapters import pick_checkpoint

    run = _fake_run(tmp_path, lora_run[1], steps=(2, 6), losses=[(2, 3.1), (4, 2.5), (6, None)])
    with pytest.raises(ModelError) as err:
        pick_checkpoint(run, "best")
    assert str(err.value) == (
        f"checkpoint: best is step 4 (eval_loss 2.5000), but run folder '{run}' has no checkpoint-4 with an adapter "
        "(found: checkpoint-2, checkpoint-6). Save checkpoints at evaluation steps (save_steps a multiple of eval_steps) "
        "or name a checkpoint."
    )
    with open(os.path.join(run, "trainer_log.jsonl"), "w") as fh:
        fh.write(json.dumps({"current_steps": 2, "loss": 3.0}) + "\n")
    with pytest.raises(ConfigError, match=r"which has no eval_loss record: the run did not evaluate"):
        pick_checkpoint(run, "best")
    with pytest.raises(ModelError, match=r"^checkpoint-5 with an adapter is not in run folder .* \(found: checkpoint-2, checkpoint-6\)\.$"):
        pick_checkpoint(run, "5")


# ------------------------------------------------------------------------------------------ refusals
def test_refuses_a_non_empty_export_dir(lora_run, tmp_path):
    from tunelab.errors import ConfigError

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConfigError) as err:
        _export(model_name_or_path=lora_run[0], adapter_name_or_path=lora_run[1], export_dir=str(out))
    assert str(err.value) == (
        f"export_dir '{out}' is not empty (found 1 entries: keep.txt): choose a new or empty folder, or set overwrite: "
        "true to replace it."
    )
    assert (out / "keep.txt").exists()


def test_refuses_a_missing_adapter_and_a_missing_base(lora_run, tmp_path):
    from tunelab.errors import ModelError

    missing = str(tmp_path / "no-adapter")
    with pytest.raises(ModelError) as err:
        _export(model_name_or_path=lora_run[0], adapter_name_or_path=missing, export_dir=str(tmp_path / "o"))
    assert str(err.value) == (
        f"adapter folder '{missing}' does not exist: expected a folder with adapter_config.json and "
        "adapter_model.safetensors (a training output_dir or one of its checkpoint-N folders)."
    )
    empty = tmp_path / "empty-adapter"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(ModelError) as err:
        _export(model_name_or_path=lora_run[0], adapter_name_or_path=str(empty), export_dir=str(tmp_path / "o"))
    assert str(err.value) == (
        f"adapter folder '{empty}' holds no adapter: expected adapter_config.json and adapter_model.safetensors "
        "(or checkpoint-N folders holding them), found notes.txt."
    )
    base = str(tmp_path / "no-base")
    with pytest.raises(ModelError) as err:
        _export(model_name_or_path=base, adapter_name_or_path=lora_run[1], export_dir=str(tmp_path / "o"))
    assert str(err.value) == (
        f"base model '{base}' not found: expected a folder with config.json and model weights (or a hub id like "
        "Qwen/Qwen2.5-7B-Instruct), found no such folder."
    )
    assert not os.path.exists(tmp_path / "o")


def test_refuses_an_adapter_for_another_base(lora_run, tmp_path):
    from tunelab.errors import ModelError
    from tunelab.model.tiny import build_tiny_model

    other = build_tiny_model(str(tmp_path / "wider"), hidden_size=96, intermediate_size=128)
    with pytest.raises(ModelError) as err:
        _export(model_name_or_path=other, adapter_name_or_path=lora_run[1], export_dir=str(tmp_path / "o"))
    assert str(err.value) == (
        f"adapter '{lora_run[1]}' does not fit base model '{other}': 'model.layers.0.mlp.down_proj.weight' is [96, 128] "
        f"in the base, but the adapter expects [64, 128] (lora_A [8, 128], lora_B [64, 8]). The adapter was trained on "
        f"'{lora_run[0]}'."
    )
    deeper = build_tiny_model(str(tmp_path / "shallow"), num_layers=1)
    with pytest.raises(ModelError, match=r"it adapts 'model.layers.1.mlp.down_proj', but the base has no weight 'model.layers.1.mlp.down_proj.weight'"):
        _export(model_name_or_path=deeper, adapter_name_or_path=lora_run[1], export_dir=str(tmp_path / "o"))


def test_failed_verification_leaves_no_model(lora_run, tmp_path):
    from tunelab.errors import TunelabError

    out = tmp_path / "strict"
    with pytest.raises(TunelabError, match=r"^the merged model does not match base \+ adapter: .* beyond the tolerance 1e-12"):
        _export(model_name_or_path=lora_run[0], adapter_name_or_path=lora_run[1], export_dir=str(out), export_tolerance=1e-12)
    assert os.listdir(tmp_path) == []


def test_dequantized_needs_a_quantized_training(lora_run, tmp_path):
    from tunelab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^export_base: dequantized merges into the quantized weights a QLoRA adapter was trained on"):
        _export(model_name_or_path=lora_run[0], adapter_name_or_path=lora_run[1], export_dir=str(tmp_path / "o"), export_base="dequantized")


def test_training_config_exports_its_adapter_and_prints_the_summary_once(lora_run, tmp_path, capsys):
    import yaml

    from tunelab.cli import main

    model, run = lora_run
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({"model_name_or_path": model, "do_train": True, "template": "qwen", "dataset": "demo",
                                   "output_dir": run}), encoding="utf-8")
    out = tmp_path / "merged"
    old = os.umask(0o022)
    try:
        assert main(["export", str(cfg), f"export_dir={out}", "export_ollama=true"]) == 0
    finally:
        os.umask(old)
    assert {n: oct(os.stat(out / n).st_mode & 0o777) for n in os.listdir(out)} == {n: "0o644" for n in os.listdir(out)}
    captured = capsys.readouterr()
    assert f"export: {cfg} is a training config, so export uses the adapter its training wrote, in {run}" in captured.err
    lines = captured.out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"merged model: {out} (float32, 1 weight file(s), merge ")
    assert lines[1].startswith("check vs base + adapter: max abs logit diff ")
    figures = lines[1].split(": ", 1)[1].split(" -> ")[0]
    assert figures not in captured.err and "merged model" not in captured.err  # the summary is printed once
    assert f"- adapter(s): `{run}`" in (out / "README.md").read_text(encoding="utf-8")
    # the Modelfile carries the system prompt every training sample had (the qwen template's default)
    assert 'SYSTEM """You are Qwen, created by Alibaba Cloud. You are a helpful assistant."""' in (out / "Modelfile").read_text(encoding="utf-8")


def test_default_system_read_off_a_tokenizer_template(qwen_tokenizer):
    from tunelab.data.template import get_template
    from tunelab.export.workflow import template_default_system

    auto = get_template("auto", qwen_tokenizer)  # the Qwen2.5 tokenizer's own template: its default is in the Jinja
    assert auto.default_system is None
    assert template_default_system(auto, "chatml") == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert template_default_system(get_template("chatml", qwen_tokenizer), "chatml") is None
