"""Keys a config leaves out mean what they mean in LLaMA-Factory 0.9.5 (docs/defaults.md): the schema's defaults,
a config that neither trains nor predicts, do_predict runs (predict, write generated_predictions.jsonl and
predict_results.json, train nothing), do_train + do_predict, eval_steps derived from LLaMA-Factory's logging_steps,
and max_length used only without max_new_tokens.
"""
from __future__ import annotations

import json
import os

import pytest
import yaml

from helpers_train import (  # noqa: F401  (fixtures)
    base_config,
    counting_records,
    isolated_env,
    offline_session,
    read_json,
    read_jsonl,
    tiny_model,
    write_dataset_dir,
)
from tunelab.cli import main
from tunelab.config import load_config
from tunelab.errors import ConfigError

# LLaMA-Factory 0.9.5's values (hparams/*.py at tag v0.9.5, and transformers' TrainingArguments for do_train,
# the batch sizes and the scheduler), for the keys issue 8 names.
LLAMAFACTORY_DEFAULTS = {
    "do_train": False,                     # TrainingArguments.do_train
    "do_predict": False,
    "predict_with_generate": False,        # Seq2SeqTrainingArguments
    "lr_scheduler_type": "linear",         # TrainingArguments.lr_scheduler_type
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8,
    "enable_thinking": True,               # data_args.py: enable_thinking default=True
    "max_length": 1024,                    # generating_args.py: max_length default=1024 (dropped when max_new_tokens > 0)
    "max_new_tokens": 1024,
    "learning_rate": 5e-5,
    "num_train_epochs": 3.0,
    "cutoff_len": 2048,
    "lora_rank": 8,
    "lora_alpha": None,
    "lora_target": "all",
    "do_sample": True,
    "temperature": 0.95,
    "top_p": 0.7,
    "top_k": 50,
}


def test_unset_keys_take_llamafactory_defaults():
    cfg = load_config({})
    assert {k: getattr(cfg, k) for k in LLAMAFACTORY_DEFAULTS} == LLAMAFACTORY_DEFAULTS


def test_eval_steps_follow_llamafactory_logging_steps():
    from tunelab.config.resolve import resolve

    steps = {"do_train": True, "eval_strategy": "steps", "val_size": 0.1}
    assert resolve(load_config(steps)).eval_steps == 500  # logging_steps unset: transformers' 500
    assert resolve(load_config(dict(steps, logging_steps=5))).eval_steps == 5
    assert resolve(load_config(dict(steps, logging_steps=5, eval_steps=7))).eval_steps == 7


def test_max_length_counts_only_without_max_new_tokens():
    import torch

    from tunelab.infer.engine import GenerationSettings, HFDecodeBackend

    seen = {}

    class Model:
        def generate(self, input_ids, generation_config, **kwargs):
            seen["max_new_tokens"] = generation_config.max_new_tokens
            return torch.cat([input_ids, torch.zeros(input_ids.shape[0], 1, dtype=torch.long)], dim=1)

    ids = torch.ones(1, 1500, dtype=torch.long)
    for settings, want in ((GenerationSettings(max_new_tokens=64, max_length=1024), 64),
                           (GenerationSettings(max_new_tokens=0, max_length=1600), 100)):
        HFDecodeBackend()(Model(), ids, torch.ones_like(ids), settings, stop_token_ids=[2], pad_token_id=0)
        assert seen["max_new_tokens"] == want
    with pytest.raises(ConfigError, match="max_new_tokens=0 sets no answer length"):
        load_config({"max_new_tokens": 0, "max_length": None})


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _write(workdir, cfg: dict) -> str:
    path = workdir / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return str(path)


def _error(capsys) -> str:
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.startswith("tunelab train: error: ")][0]


def test_config_that_neither_trains_nor_predicts_says_so(tiny_model, workdir, capsys):
    data = write_dataset_dir(workdir / "data", {"toy": ("alpaca", counting_records(4))})
    cfg = base_config(tiny_model, data, "out")
    del cfg["do_train"]
    assert main(["train", _write(workdir, cfg)]) == 1
    assert _error(capsys) == "tunelab train: error: " + (
        "nothing to do: do_train and do_predict are both false (LLaMA-Factory's defaults for keys a config leaves "
        "out). Add do_train: true to train, or do_predict: true with predict_with_generate: true to generate answers "
        "for eval_dataset; `tunelab eval` scores a model otherwise (task=perplexity gives the eval loss).")
    assert not os.path.exists(workdir / "out")


def test_do_predict_needs_predict_with_generate_and_eval_data(tiny_model, workdir, capsys):
    data = write_dataset_dir(workdir / "data", {"toy": ("alpaca", counting_records(4))})
    cfg = dict(base_config(tiny_model, data, "out"), do_train=False, do_predict=True)
    assert main(["train", _write(workdir, cfg)]) == 1
    assert "do_predict: true needs predict_with_generate: true (as in LLaMA-Factory)" in _error(capsys)
    assert main(["train", _write(workdir, dict(cfg, predict_with_generate=True))]) == 1
    assert "do_predict: true predicts on evaluation data: set eval_dataset" in _error(capsys)
    assert not os.path.exists(workdir / "out")


def _check_predictions(out: str, labels: list[str]) -> dict:
    lines = read_jsonl(os.path.join(out, "generated_predictions.jsonl"))
    assert [r["label"] for r in lines] == labels
    assert all(set(r) == {"prompt", "predict", "label"} and r["prompt"].startswith("<|im_start|>system") for r in lines)
    results = read_json(os.path.join(out, "predict_results.json"))
    assert {"predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l"} <= set(results)
    assert results["predict_samples"] == len(labels)
    return results


def test_prediction_run_predicts_and_trains_nothing(tiny_model, workdir):
    pytest.importorskip("nltk")
    evals = counting_records(3, start=10)
    data = write_dataset_dir(workdir / "data", {"toy": ("alpaca", counting_records(4)), "ev": ("alpaca", evals)})
    cfg = dict(base_config(tiny_model, data, "out"), do_train=False, do_predict=True, predict_with_generate=True,
               eval_dataset="ev", do_sample=False, max_new_tokens=4)
    assert main(["train", _write(workdir, cfg)]) == 0
    _check_predictions(str(workdir / "out"), [r["output"] for r in evals])
    files = set(os.listdir(workdir / "out"))
    assert not files & {"adapter_model.safetensors", "trainer_log.jsonl", "train_results.json"}, files
    assert not any(f.startswith("checkpoint-") for f in files)
    assert "predict_bleu-4" in read_json(os.path.join(workdir / "out", "all_results.json"))


def test_train_then_predict_on_the_val_split(tiny_model, workdir):
    pytest.importorskip("nltk")
    data = write_dataset_dir(workdir / "data", {"toy": ("alpaca", counting_records(10))})
    cfg = dict(base_config(tiny_model, data, "out"), do_predict=True, predict_with_generate=True, val_size=2,
               do_sample=False, max_new_tokens=4, per_device_eval_batch_size=2)
    assert main(["train", _write(workdir, cfg)]) == 0
    out = str(workdir / "out")
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))
    predictions = read_jsonl(os.path.join(out, "generated_predictions.jsonl"))
    assert len(predictions) == 2
    results = read_json(os.path.join(out, "all_results.json"))
    assert "train_loss" in results and "predict_bleu-4" in results  # training's and prediction's metrics together
    with open(os.path.join(out, "generated_predictions.jsonl"), encoding="utf-8") as fh:
        assert all(json.loads(line)["label"] for line in fh)
