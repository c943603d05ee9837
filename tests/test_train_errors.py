"""Bad input ends in a sentence, a non-zero exit and nothing half-written: `tunelab.cli.main(["train", cfg])` for
config, data and model mistakes; a NaN loss stops with the step number and keeps the checkpoints written before it;
the zero-gradient warning; the precision fallback warning printed once.
"""
from __future__ import annotations

import json
import os

import pytest
import yaml

from helpers_train import (  # noqa: F401  (fixtures)
    base_config,
    checkpoint_steps,
    counting_records,
    isolated_env,
    offline_session,
    read_jsonl,
    tiny_model,
    toy_records,
    write_dataset_dir,
)
from tunelab.cli import main
from tunelab.utils.checkpoints import COMPLETE_MARKER

ZERO_GRAD_WARNING = "the gradients of all trainable parameters were exactly zero in each of the first 3 steps"
FP16_WARNING = ("fp16 was requested but training runs on the CPU, where fp16 mixed precision is not available: "
                "training in float32 instead.")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _cfg_file(workdir, cfg: dict, name: str = "cfg.yaml") -> str:
    path = workdir / name
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return str(path)


def _train(capsys, cfg_path: str, *extra: str) -> tuple[int, str]:
    rc = main(["train", cfg_path, *extra])
    return rc, capsys.readouterr().err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("tunelab train: error: ")]
    assert len(lines) == 1, err
    return err[err.index("tunelab train: error: "):].rstrip("\n")


def _assert_nothing_written(out) -> None:
    assert not os.path.exists(out) or os.listdir(out) == [], sorted(os.listdir(out))


@pytest.fixture
def toy_dir(workdir):
    return write_dataset_dir(workdir / "data", {"toy": ("alpaca", toy_records(4))})


# ---------------------------------------------------------------- config mistakes (before anything is loaded)


def test_unknown_key_names_the_closest_valid_one(tiny_model, toy_dir, workdir, capsys):
    cfg = _cfg_file(workdir, dict(base_config(tiny_model, toy_dir, "out"), lora_rnak=16))
    rc, err = _train(capsys, cfg)
    assert rc == 1
    assert _error_line(err) == f"tunelab train: error: unknown key 'lora_rnak' in {cfg}. Did you mean 'lora_rank'?"
    assert "Traceback" not in err
    _assert_nothing_written(workdir / "out")


def test_unknown_key_on_the_command_line(tiny_model, toy_dir, workdir, capsys):
    cfg = _cfg_file(workdir, base_config(tiny_model, toy_dir, "out"))
    rc, err = _train(capsys, cfg, "--learning-rte", "1e-4")
    assert rc == 1
    assert _error_line(err) == "tunelab train: error: unknown key 'learning_rte' in the command line. Did you mean 'learning_rate'?"


def test_quantization_with_full_finetuning_is_explained(tiny_model, toy_dir, workdir, capsys):
    cfg = _cfg_file(workdir, base_config(tiny_model, toy_dir, "out", quantization_bit=4, finetuning_type="full"))
    rc, err = _train(capsys, cfg)
    assert rc == 1
    assert _error_line(err) == (
        "tunelab train: error: quantization_bit=4 needs finetuning_type: lora. Quantized weights cannot be trained "
        "directly, so finetuning_type=full cannot use them; remove quantization_bit or use LoRA (QLoRA).")
    _assert_nothing_written(workdir / "out")


def test_debug_flag_shows_the_traceback(tiny_model, toy_dir, workdir):
    from tunelab.errors import ConfigError

    cfg = _cfg_file(workdir, dict(base_config(tiny_model, toy_dir, "out"), lora_rnak=16))
    with pytest.raises(ConfigError, match="lora_rnak"):
        main(["train", cfg, "--debug"])


# ---------------------------------------------------------------- data mistakes


BAD_LINES = [
    json.dumps({"instruction": "Count from 1 to 3.", "input": "", "output": "1, 2, 3"}),
    json.dumps({"instruction": "Count from 1 to 4."}),
    "{not json",
    json.dumps({"instruction": "Count from 1 to 5.", "input": "", "output": "1, 2, 3, 4, 5"}),
    json.dumps({"instruction": "", "output": "nothing asked"}),
    json.dumps({"instruction": "Count from 1 to 6.", "input": "", "output": "1, 2, 3, 4, 5, 6"}),
]


@pytest.fixture
def bad_dir(workdir):
    data = workdir / "data"
    data.mkdir()
    (data / "bad.jsonl").write_text("\n".join(BAD_LINES) + "\n", encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps({"bad": {"file_name": "bad.jsonl"}}), encoding="utf-8")
    return "data"


def test_invalid_records_are_listed_with_file_line_reason_and_count(tiny_model, bad_dir, workdir, capsys):
    cfg = _cfg_file(workdir, base_config(tiny_model, bad_dir, "out", dataset="bad"))
    rc, err = _train(capsys, cfg)
    assert rc == 1
    assert _error_line(err) == (
        "tunelab train: error: 3 invalid records:\n"
        "  data/bad.jsonl:2: the 'output' field is missing or empty\n"
        "  data/bad.jsonl:3: invalid JSON: Expecting property name enclosed in double quotes at column 2\n"
        "  data/bad.jsonl:5: the 'instruction' field is missing or empty\n"
        "Fix them, or set `skip_invalid: true` to skip invalid records (the number skipped is reported).")
    _assert_nothing_written(workdir / "out")


def test_skip_invalid_trains_on_the_rest_and_reports_the_count(tiny_model, bad_dir, workdir, capsys):
    """One run checks three things: skip_invalid, the fp16 fallback warning (once), and no false zero-grad alarm."""
    cfg = _cfg_file(workdir, base_config(tiny_model, bad_dir, "out", dataset="bad", skip_invalid=True, fp16=True,
                                         max_steps=3, save_steps=3))
    rc, err = _train(capsys, cfg)
    assert rc == 0, err
    assert "train data: skipped 3 invalid records (skip_invalid: true); first: data/bad.jsonl:2: the 'output' field is missing or empty" in err
    assert "data: 3 training samples" in err
    assert err.count(FP16_WARNING) == 1, err
    assert "fp16" not in err.replace(FP16_WARNING, "")  # no second message about it from a library
    assert ZERO_GRAD_WARNING not in err
    assert os.path.isfile(workdir / "out" / "adapter_model.safetensors")
    with open(workdir / "out" / "tunelab_config.yaml", encoding="utf-8") as fh:
        saved = yaml.safe_load(fh)
    assert saved["given"]["fp16"] is True and saved["resolved"]["fp16"] is False
    assert saved["resolved"]["compute_dtype"] == "float32" and saved["resolved"]["warnings"] == [FP16_WARNING]


def test_unregistered_dataset_lists_the_registered_names(tiny_model, toy_dir, workdir, capsys):
    cfg = _cfg_file(workdir, base_config(tiny_model, toy_dir, "out", dataset="toi"))
    rc, err = _train(capsys, cfg)
    assert rc == 1
    assert _error_line(err) == (
        f"tunelab train: error: Dataset 'toi' is not registered in {toy_dir}/dataset_info.json, is not a built-in "
        "dataset, and is not an existing file or folder.\n"
        "Did you mean 'toy'?\n"
        f"Registered in {toy_dir}/dataset_info.json: toy.\n"
        "Built-in: alpaca_gpt4_en, alpaca_gpt4_zh.")
    _assert_nothing_written(workdir / "out")


# ---------------------------------------------------------------- model mistakes


def test_missing_model_folder(toy_dir, workdir, capsys):
    cfg = _cfg_file(workdir, base_config("./models/qwen2.5-0.5b", toy_dir, "out"))
    rc, err = _train(capsys, cfg)
    assert rc == 1
    assert _error_line(err) == (
        f"tunelab train: error: model_name_or_path './models/qwen2.5-0.5b': no such folder ({workdir}/models/qwen2.5-0.5b "
        "does not exist; it is a path: it starts with ./, / or ~ or has several /).")
    _assert_nothing_written(workdir / "out")


def test_model_folder_without_weights(tiny_model, toy_dir, workdir, capsys):
    import shutil

    folder = workdir / "tokenizer-only"
    folder.mkdir()
    for name in os.listdir(tiny_model):
        if name.startswith(("tokenizer", "chat_template")):
            shutil.copy(os.path.join(tiny_model, name), folder / name)
    cfg = _cfg_file(workdir, base_config(str(folder), toy_dir, "out"))
    rc, err = _train(capsys, cfg)
    assert rc == 1
    line = _error_line(err)
    assert line.startswith(f"tunelab train: error: cannot load the model config of '{folder}' (tried the local folder {folder}): ")
    assert line.endswith("Check model_name_or_path (a folder with config.json, or a hub id reachable from this machine).")
    _assert_nothing_written(workdir / "out")


# ---------------------------------------------------------------- loss health


def test_nan_loss_stops_with_the_step_and_keeps_earlier_checkpoints(tiny_model, toy_dir, workdir, capsys):
    import signal

    cfg = _cfg_file(workdir, base_config(tiny_model, toy_dir, "out", learning_rate=1e30, max_steps=4, save_steps=1))
    before = signal.getsignal(signal.SIGTERM)
    rc, err = _train(capsys, cfg)
    assert rc == 1
    # the error left the loop before on_train_end: the run's graceful-stop handler is removed all the same
    assert signal.getsignal(signal.SIGTERM) is before
    line = _error_line(err)
    out = workdir / "out"
    steps = checkpoint_steps(out)
    assert steps, "no checkpoint was kept"
    bad_step = steps[-1] + 1
    assert line.startswith("tunelab train: error: the loss became ")
    assert f" at step {bad_step}: training stopped, and nothing after step {bad_step - 1} was saved. The checkpoints in {out} are kept" in line
    assert line.split("the loss became ")[1].split(" ")[0] in ("nan", "inf", "-inf")
    for s in steps:
        assert os.path.isfile(out / f"checkpoint-{s}" / COMPLETE_MARKER)
    names = set(os.listdir(out))
    for final in ("adapter_model.safetensors", "adapter_config.json", "train_results.json", "all_results.json"):
        assert final not in names, f"{final} written after a NaN loss"
    assert [r["current_steps"] for r in read_jsonl(out / "trainer_log.jsonl")] == list(range(1, bad_step))


def test_zero_gradients_warn_once(tiny_model, toy_dir, workdir, monkeypatch, caplog):
    """A loss that does not depend on the trainable parameters (here: multiplied by 0, as a detached or fully masked
    loss would be) leaves every gradient exactly zero: one warning after the first 3 steps."""
    import tunelab
    from tunelab.train.trainer import TunelabTrainer

    original = TunelabTrainer.compute_loss

    def zero_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return original(self, model, inputs, return_outputs, num_items_in_batch) * 0.0

    monkeypatch.setattr(TunelabTrainer, "compute_loss", zero_loss)
    with caplog.at_level("WARNING", logger="tunelab"):
        tunelab.run(base_config(tiny_model, toy_dir, str(workdir / "out"), max_steps=4, save_steps=4))
    warnings = [r for r in caplog.records if ZERO_GRAD_WARNING in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"
    assert warnings[0].name == "tunelab.train.callbacks"
