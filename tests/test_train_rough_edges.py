"""The rough edges of issue 8 a new user hit with `tunelab train`: output_dir that is a file, a second run into a
busy output_dir (and a stale lock left by a killed run), overwrite_output_dir leaving the old run's files, a missing
local model taken for a hub id, the loss curve's smoothing, files written 0600, secrets in saved files and logs,
and data errors reported only after the tokenizer loaded.
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from helpers_train import (  # noqa: F401  (fixtures)
    base_config,
    cli_env,
    counting_records,
    isolated_env,
    offline_session,
    tiny_model,
    toy_records,
    write_dataset_dir,
)
from tunelab.cli import main


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def toy_dir(workdir):
    return write_dataset_dir(workdir / "data", {"toy": ("alpaca", toy_records(4))})


def _cfg_file(workdir, cfg: dict, name: str = "cfg.yaml") -> str:
    path = workdir / name
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return str(path)


def _train_error(capsys, cfg_path: str) -> str:
    assert main(["train", cfg_path]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tunelab train: error: ")]
    assert len(lines) == 1, err
    return err[err.index("tunelab train: error: ") + len("tunelab train: error: "):].rstrip("\n")  # the error is last


@pytest.fixture
def fake_model(tmp_path):
    """A model folder for runs that must stop before anything is loaded from it."""
    (tmp_path / "model").mkdir()
    return str(tmp_path / "model")


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the tokenizer or the model is loaded: these checks must come first."""
    import tunelab.model.loader
    import tunelab.model.tokenizer

    def boom(*args, **kwargs):
        raise AssertionError("the tokenizer/model was loaded before the check")

    monkeypatch.setattr(tunelab.model.tokenizer, "load_tokenizer", boom)
    monkeypatch.setattr(tunelab.model.loader, "load_model", boom)


# ---------------------------------------------------------------- 1. output_dir that is a file


def test_output_dir_that_is_a_file_is_refused_first(fake_model, toy_dir, workdir, capsys, no_model_load):
    (workdir / "taken").write_text("not a folder")
    assert _train_error(capsys, _cfg_file(workdir, base_config(fake_model, toy_dir, "taken"))) == (
        "output_dir 'taken' is a file: give a folder (new or one of an earlier run) for the adapter, checkpoints and logs.")
    assert _train_error(capsys, _cfg_file(workdir, base_config(fake_model, toy_dir, "taken/run"))) == (
        f"output_dir 'taken/run' lies under '{workdir}/taken', which is a file, so the folder cannot be made: choose "
        "another output_dir.")


# ---------------------------------------------------------------- 4. one run per output_dir

HOLD_LOCK = """
import sys, time
from tunelab.utils.lock import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _hold_lock(folder) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True, env=cli_env())
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_run_into_a_busy_output_dir_is_refused(fake_model, toy_dir, workdir, capsys, no_model_load):
    out = workdir / "out"
    holder = _hold_lock(out)
    try:
        message = _train_error(capsys, _cfg_file(workdir, base_config(fake_model, toy_dir, "out")))
        assert message.startswith(f"output_dir '{out}' is in use by another tunelab run (pid {holder.pid}, started ")
        assert message.endswith("): two runs in one folder would mix their checkpoints and logs. Wait for that run to end "
                                "(or stop it), or choose another output_dir.")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the killed holder left its lock file (pid inside) behind: it must not block the next run
    from tunelab.utils.lock import LOCK_NAME, RunLock

    assert (out / LOCK_NAME).read_text().split()[0] == str(holder.pid)
    with RunLock(str(out)) as lock:
        assert (out / LOCK_NAME).read_text().split()[0] == str(os.getpid()) and lock.fd is not None
    assert not (out / LOCK_NAME).exists()


# ---------------------------------------------------------------- 5. overwrite_output_dir starts from an empty run


def test_overwrite_output_dir_removes_every_old_output_first(tiny_model, toy_dir, workdir, monkeypatch, capsys):
    import tunelab.model.loader

    out = workdir / "out"
    old = ["adapter_model.safetensors", "adapter_config.json", "all_results.json", "train_results.json",
           "training_loss.png", "tunelab_config.yaml", "trainer_log.jsonl", "generated_predictions.jsonl"]
    (out / "checkpoint-5").mkdir(parents=True)
    (out / "checkpoint-5" / "adapter_model.safetensors").write_text("old")
    for name in old:
        (out / name).write_text("old")
    (out / "notes.txt").write_text("mine")  # not a run output: stays

    def killed(*args, **kwargs):  # the new run dies right after preparing the folder, before the model loads
        raise KeyboardInterrupt

    monkeypatch.setattr(tunelab.model.loader, "load_model", killed)
    assert main(["train", _cfg_file(workdir, base_config(tiny_model, toy_dir, "out", overwrite_output_dir=True))]) == 130
    assert sorted(os.listdir(out)) == ["notes.txt"]


# ---------------------------------------------------------------- 6. local folder or hub id, decided at once


def test_missing_local_model_is_not_taken_for_a_hub_id(toy_dir, workdir, capsys, no_model_load):
    (workdir / "examples" / "tiny-qwen2").mkdir(parents=True)
    start = time.time()
    assert _train_error(capsys, _cfg_file(workdir, base_config("examples/tiny-qwen3", toy_dir, "out"))) == (
        f"model_name_or_path 'examples/tiny-qwen3': no such folder ({workdir}/examples/tiny-qwen3 does not exist; "
        "'examples' is a local folder, so this is a path, not a hub id). Did you mean 'examples/tiny-qwen2'?")
    assert _train_error(capsys, _cfg_file(workdir, base_config("tiny-qwen3", toy_dir, "out"))) == (
        f"model_name_or_path 'tiny-qwen3': no such folder ({workdir}/tiny-qwen3 does not exist; a hub id would read "
        "'org/name', like Qwen/Qwen2.5-7B-Instruct).")
    assert time.time() - start < 5


def test_hub_id_is_said_to_be_one():
    from tunelab.model.loader import model_source

    assert model_source("Qwen/Qwen2.5-0.5B-Instruct") == "hub"


# ---------------------------------------------------------------- 7. the smoothed loss curve


def test_loss_smoothing_is_llamafactory_adaptive_ema():
    from tunelab.train.plots import adaptive_weight, smooth

    assert adaptive_weight(10) == pytest.approx(1.8 * (1 / (1 + math.exp(-0.5)) - 0.5))
    assert adaptive_weight(200) == pytest.approx(0.8999, abs=1e-4)
    raw = [4.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    w, want, last = adaptive_weight(10), [], 4.0
    for v in raw:
        last = last * w + (1 - w) * v
        want.append(last)
    assert smooth(raw) == pytest.approx(want)
    assert smooth(raw)[-1] < 1.001  # a 10-point run's curve ends at the raw loss, not far above it (0.9 fixed: 1.5)
    assert smooth([2.0, 4.0], weight=0.5) == [2.0, 3.0]


# ---------------------------------------------------------------- 8 + 9. file modes and secrets of a real run


def test_run_outputs_honour_the_umask_and_hold_no_secret(tiny_model, toy_dir, workdir, capsys):
    secrets = {"hf_hub_token": "hf_SECRETtoken123", "swanlab_api_key": "swan-SECRET-456"}
    old = os.umask(0o022)
    try:
        assert main(["train", _cfg_file(workdir, base_config(tiny_model, toy_dir, "out", save_steps=1, **secrets))]) == 0
    finally:
        os.umask(old)
    err = capsys.readouterr().err
    modes = {}
    for folder, _, names in os.walk(workdir / "out"):
        for name in names:
            path = os.path.join(folder, name)
            modes[os.path.relpath(path, workdir / "out")] = oct(os.stat(path).st_mode & 0o777)
            with open(path, "rb") as fh:  # every file, binary ones too (training_args.bin is a pickle)
                data = fh.read()
            assert not any(s.encode() in data for s in secrets.values()), path
    assert "adapter_model.safetensors" in modes and "checkpoint-2/adapter_model.safetensors" in modes
    assert {p: m for p, m in modes.items() if m != "0o644"} == {}
    assert not any(s in err for s in secrets.values())
    with open(workdir / "out" / "tunelab_config.yaml", encoding="utf-8") as fh:
        saved = yaml.safe_load(fh)
    assert saved["config"]["hf_hub_token"] == saved["given"]["swanlab_api_key"] == "<redacted>"


def test_redact_covers_token_and_api_key_names():
    from tunelab.utils.secrets import redact

    assert redact({"hf_hub_token": "x", "wandb_api_key": "y", "max_new_tokens": 5, "use_fast_tokenizer": True,
                   "swanlab_api_key": None, "nested": {"ms_hub_token": "z"}}) == {
        "hf_hub_token": "<redacted>", "wandb_api_key": "<redacted>", "max_new_tokens": 5, "use_fast_tokenizer": True,
        "swanlab_api_key": None, "nested": {"ms_hub_token": "<redacted>"}}


def test_atomic_writes_honour_the_umask(tmp_path):
    from tunelab.utils import io

    old = os.umask(0o027)
    io._UMASK = None
    try:
        io.atomic_write_json(str(tmp_path / "a.json"), {"x": 1})
        assert oct(os.stat(tmp_path / "a.json").st_mode & 0o777) == "0o640"
    finally:
        os.umask(old)
        io._UMASK = None


# ---------------------------------------------------------------- 11. data errors before the tokenizer


@pytest.mark.parametrize("case", ["missing file", "unregistered", "broken line", "record shape"])
def test_data_errors_come_before_the_tokenizer(fake_model, workdir, capsys, no_model_load, case):
    data = workdir / "data"
    write_dataset_dir(data, {"toy": ("alpaca", toy_records(4))})
    cfg = base_config(fake_model, str(data), "out")
    if case == "missing file":
        os.remove(data / "toy.json")
        assert "toy.json" in _train_error(capsys, _cfg_file(workdir, cfg))
    elif case == "unregistered":
        assert _train_error(capsys, _cfg_file(workdir, dict(cfg, dataset="toi"))).startswith("Dataset 'toi' is not registered")
    elif case == "broken line":
        (data / "toy.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output"\n')
        write_dataset_dir(data, {})  # re-register below
        (data / "dataset_info.json").write_text('{"toy": {"file_name": "toy.jsonl"}}')
        assert "toy.jsonl:2" in _train_error(capsys, _cfg_file(workdir, cfg))
    else:
        (data / "toy.json").write_text('[{"instruction": "a", "output": "b"}, {"question": "no alpaca keys"}]')
        assert "toy.json" in _train_error(capsys, _cfg_file(workdir, cfg))
    assert not os.path.exists(workdir / "out")


# ---------------------------------------------------------------- 2. a training config given to eval


def test_training_config_given_to_eval_scores_its_adapter(workdir):
    from tunelab.commands.eval import trained_adapter_eval
    from tunelab.config import load_config

    run = workdir / "run"
    (run / "checkpoint-4").mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (run / "checkpoint-4" / name).write_text("{}")
    (workdir / "m").mkdir()
    cfg_path = _cfg_file(workdir, {"model_name_or_path": "m", "do_train": True, "output_dir": "run", "adapter_name_or_path": "base_adapter"})
    argv = [cfg_path, "task=perplexity"]
    cfg = trained_adapter_eval(load_config(argv), argv)
    assert (cfg.adapter_name_or_path, cfg.save_dir) == ("run", os.path.join("run", "eval_perplexity"))
    argv = [cfg_path, "task=perplexity", "adapter_name_or_path=other", "save_dir=elsewhere"]
    cfg = trained_adapter_eval(load_config(argv), argv)
    assert (cfg.adapter_name_or_path, cfg.save_dir) == ("other", "elsewhere")


def test_training_config_scoring_another_model_writes_beside_not_into_the_run(workdir):
    """The base model (adapter_name_or_path=none) or another adapter scored from a training config: results in a
    subfolder named for it, never the run folder (whose tunelab_config.yaml chat and export read)."""
    from tunelab.commands.eval import trained_adapter_eval
    from tunelab.config import load_config

    (workdir / "m").mkdir()
    cfg_path = _cfg_file(workdir, {"model_name_or_path": "m", "do_train": True, "output_dir": "run"})
    cases = {
        ("adapter_name_or_path=none",): (None, os.path.join("run", "eval_predict_base")),
        ("adapter_name_or_path=saves/other/",): ("saves/other/", os.path.join("run", "eval_predict_other")),
        ("adapter_name_or_path=a,b", "save_dir=mine"): ("a,b", "mine"),
    }
    for extra, expected in cases.items():
        argv = [cfg_path, "task=predict", *extra]
        cfg = trained_adapter_eval(load_config(argv), argv)
        assert (cfg.adapter_name_or_path, cfg.save_dir) == expected, extra
    # a full fine-tuning config scores model_name_or_path: the base
    cfg_path = _cfg_file(workdir, {"model_name_or_path": "m", "do_train": True, "output_dir": "run",
                                   "finetuning_type": "full"})
    cfg = trained_adapter_eval(load_config([cfg_path, "task=mmlu"]), [cfg_path, "task=mmlu"])
    assert (cfg.adapter_name_or_path, cfg.save_dir) == (None, os.path.join("run", "eval_mmlu_base"))
    # not a training config: output_dir as given, as before
    cfg_path = _cfg_file(workdir, {"model_name_or_path": "m", "output_dir": "saves/eval"})
    cfg = trained_adapter_eval(load_config([cfg_path, "task=predict"]), [cfg_path, "task=predict"])
    assert (cfg.adapter_name_or_path, cfg.save_dir, cfg.output_dir) == (None, None, "saves/eval")


def test_eval_compare_runs_a_training_config_on_its_adapter_beside_the_run(workdir, monkeypatch):
    """`tunelab eval compare train.yaml other` evaluates the trained adapter into <output_dir>/eval_<task>, as
    `tunelab eval train.yaml` does (before: the base model, written into the run folder itself)."""
    import tunelab.eval
    from tunelab.eval.compare import _as_folder

    run = workdir / "run"
    run.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (run / name).write_text("{}")
    (workdir / "m").mkdir()
    seen = []
    monkeypatch.setattr(tunelab.eval, "run_eval", seen.append)  # the model run itself is tested elsewhere
    cfg_path = _cfg_file(workdir, {"model_name_or_path": "m", "do_train": True, "output_dir": "run",
                                   "task": "perplexity"})
    assert _as_folder(cfg_path) == str(workdir / "run" / "eval_perplexity")
    assert [(c.adapter_name_or_path, c.save_dir) for c in seen] == [("run", os.path.join("run", "eval_perplexity"))]
    eval_cfg = _cfg_file(workdir, {"model_name_or_path": "m", "output_dir": "saves/e", "task": "perplexity"}, "e.yaml")
    assert _as_folder(eval_cfg) == str(workdir / "saves" / "e")  # an evaluation config: as before
    assert (seen[-1].adapter_name_or_path, seen[-1].save_dir) == (None, None)
