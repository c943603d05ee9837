"""Config parsing in its three forms (file + key=value, --flags, dict), validation messages, and every shipped config."""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import time

import pytest

from tunelab.config import load_config
from tunelab.config.parse import FIELDS, parse_cli_args
from tunelab.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TUTORIAL_KEYS = """model_name_or_path adapter_name_or_path template trust_remote_code stage do_train finetuning_type
quantization_bit quantization_method quantization_type double_quantization lora_rank lora_alpha lora_dropout lora_target
dataset dataset_dir eval_dataset cutoff_len max_samples val_size overwrite_cache preprocessing_num_workers
dataloader_num_workers packing flash_attn output_dir overwrite_output_dir logging_steps save_steps save_only_model plot_loss
report_to use_swanlab swanlab_project swanlab_run_name per_device_train_batch_size per_device_eval_batch_size
gradient_accumulation_steps learning_rate num_train_epochs max_steps lr_scheduler_type warmup_ratio warmup_steps
max_grad_norm optim fp16 bf16 ddp_timeout eval_strategy eval_steps resume_from_checkpoint seed""".split()


def test_every_tutorial_key_is_known():
    missing = [k for k in TUTORIAL_KEYS if k not in FIELDS]
    assert missing == []


def test_yaml_file_then_key_value_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model_name_or_path: m\nlearning_rate: 1.0e-4\nfp16: True\nmax_samples: null\nlora_target: q_proj,v_proj\n")
    cfg = load_config([str(path), "learning_rate=1e-5", "max_samples=100", "bf16=false"])
    assert cfg.learning_rate == 1e-5
    assert cfg.max_samples == 100
    assert cfg.fp16 is True and cfg.bf16 is False
    assert cfg.lora_target == "q_proj,v_proj"
    assert cfg.given["learning_rate"] == 1e-5
    assert cfg.lora_rank == 8 and cfg.lora_alpha is None  # defaults; alpha derived later (2 x rank)


def test_flags_as_pasted_from_bash_and_powershell():
    argv = "--stage sft --do_train True --model_name_or_path /m --fp16 True --lora_rank 16 --val_size 0.1 --plot_loss".split()
    cfg = load_config(argv)
    assert (cfg.stage, cfg.do_train, cfg.model_name_or_path, cfg.fp16, cfg.lora_rank, cfg.val_size, cfg.plot_loss) == (
        "sft", True, "/m", True, 16, 0.1, True)
    file_, values = parse_cli_args(["--lora-rank=4", "x=1"])
    assert file_ is None and values == {"lora_rank": "4", "x": "1"}


def test_dict_entry_and_json_file(tmp_path):
    cfg = load_config({"model_name_or_path": "m", "quantization_bit": 4, "report_to": ["wandb", "tensorboard"]})
    assert cfg.quantization_bit == 4 and cfg.report_to == "wandb,tensorboard"
    path = tmp_path / "cfg.json"
    path.write_text('{"lora_rank": 4, "resume_from_checkpoint": true, "val_size": 200}')
    cfg = load_config(str(path))
    assert cfg.lora_rank == 4 and cfg.resume_from_checkpoint is True and cfg.val_size == 200.0


@pytest.mark.parametrize(
    "values, message",
    [
        ({"lora_rnak": 8}, "unknown key 'lora_rnak' in <dict>. Did you mean 'lora_rank'?"),
        ({"quantization_bit": 3}, "quantization_bit=3 in <dict> is not valid: expected one of 4, 8 or null."),
        ({"fp16": "maybe"}, "fp16='maybe' in <dict> is not valid: expected true or false."),
        ({"learning_rate": "fast"}, "learning_rate='fast' in <dict> is not valid: expected a number."),
        ({"lr_scheduler_type": "cosin"}, "lr_scheduler_type='cosin' in <dict> is not valid: expected one of 'linear', 'cosine'"),
        ({"quantization_bit": 4, "finetuning_type": "full"}, "quantization_bit=4 needs finetuning_type: lora."),
        ({"val_size": 0.1, "eval_dataset": "x"}, "val_size and eval_dataset are both set: choose one."),
        ({"fp16": True, "bf16": True}, "fp16 and bf16 are both true: choose one precision."),
        ({"do_train": True, "eval_strategy": "steps"}, "eval_strategy=steps needs evaluation data: set val_size (e.g. 0.1) or eval_dataset."),
        ({"lora_rank": 0}, "lora_rank must be at least 1, got 0."),
        ({"val_size": 1.5}, "val_size=1.5: use a fraction below 1 (0.1) or a whole number of samples (200)."),
    ],
)
def test_bad_values_are_explained(values, message):
    with pytest.raises(ConfigError) as err:
        load_config(values)
    assert message in str(err.value)


def test_unknown_key_on_command_line_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'learnig_rate' in the command line. Did you mean 'learning_rate'"):
        load_config(["learnig_rate=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\n  b: : 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml' line 2 column \d+: invalid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="config file 'nope.yaml' does not exist"):
        load_config(["nope.yaml"])


def test_replace_validates_and_keeps_original():
    cfg = load_config({"lora_rank": 4})
    new = cfg.replace(lora_rank=16)
    assert (cfg.lora_rank, new.lora_rank) == (4, 16)
    with pytest.raises(ConfigError):
        cfg.replace(lora_rank=-1)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "examples", "*.yaml"))), ids=os.path.basename)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.model_name_or_path and cfg.dataset


def test_precision_fallback_on_cpu(monkeypatch):
    from tunelab.config.resolve import resolve

    cfg = load_config({"fp16": True})
    resolved = resolve(cfg)
    if resolved.device == "cpu":
        assert (resolved.compute_dtype, resolved.fp16) == ("float32", False)
        assert resolved.warnings == [
            "fp16 was requested but training runs on the CPU, where fp16 mixed precision is not available: training in float32 instead."
        ]
    assert cfg.fp16 is True  # the user's value is never rewritten
    assert resolve(load_config({"lora_rank": 16})).lora_alpha == 32


def test_help_is_fast_and_does_not_import_torch():
    code = "import sys, tunelab.cli as c; c.main(['--help']); print('torch' in sys.modules)"
    start = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert time.time() - start < 3.0  # includes interpreter start-up; the command itself takes ~30 ms
    assert out.stdout.strip().endswith("False")
    assert "train" in out.stdout and "env" in out.stdout


def test_two_config_files_get_a_sentence_about_two_files(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("lora_rank: 4\n")
    b.write_text("lora_rank: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config([str(a), str(b)])
    assert str(err.value) == (
        f"two config files given ('{a}' and '{b}'): tunelab reads one config file per run. Merge them into one "
        "file, or give the second one's keys as key=value overrides.")
