"""Kill-and-resume: a run killed with SIGKILL and started again with the same command ends with the same adapter as
an uninterrupted run (same data order, same dropout RNG); incomplete checkpoints are ignored; resume_from_checkpoint
and overwrite_output_dir behave as documented.

Run A (uninterrupted) runs in this process; run B (killed, then restarted) is `python -m tunelab.cli train cfg.yaml`
in a subprocess, twice. Run B's first launch gets a `sitecustomize` (through PYTHONPATH) that, right
after trainer_log.jsonl receives step 5's record, touches a file and sleeps: the test waits for that file and for
checkpoint-4's completion marker, then SIGKILLs the process. That is a kill at a known moment (after step 5 was
logged, before checkpoint-6), so the resumed run must also drop step 5's record from the log.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import yaml

import tunelab
from helpers_train import (  # noqa: F401  (fixtures)
    adapter_tensors,
    assert_section6_outputs,
    base_config,
    checkpoint_steps,
    cli_env,
    counting_records,
    isolated_env,
    offline_session,
    read_jsonl,
    tiny_model,
    wait_for_kill_point,
    write_dataset_dir,
)
from tunelab.errors import ConfigError
from tunelab.utils.checkpoints import COMPLETE_MARKER

MAX_STEPS = 6
KILL_AFTER_LOGGED_STEP = 5

PAUSE_HOOK = '''
import os, time
_step = int(os.environ.get("TUNELAB_TEST_PAUSE_AT_STEP", "0"))
if _step:
    import tunelab.utils.io as _io
    _append = _io.append_jsonl

    def append_jsonl(path, record):
        _append(path, record)
        if record.get("current_steps") == _step and "loss" in record:
            open(os.environ["TUNELAB_TEST_PAUSE_FILE"], "w").close()
            time.sleep(600)  # the test kills us here

    _io.append_jsonl = append_jsonl
'''


def _config(tiny: str, data_dir: str, out: str, **overrides) -> dict:
    # 10 samples, batch 1 x accumulation 2: 5 steps per epoch, so the resumed part crosses an epoch boundary.
    return base_config(
        tiny, data_dir, out, quantization_bit=4, max_steps=MAX_STEPS, save_steps=2, logging_steps=1,
        per_device_train_batch_size=1, gradient_accumulation_steps=2, lora_dropout=0.1, learning_rate=2e-3,
        lr_scheduler_type="cosine", seed=7, **overrides,
    )


def _write_cfg(path, cfg: dict) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg, fh)
    return str(path)


def _train_cmd(cfg_path: str) -> list[str]:
    return [sys.executable, "-m", "tunelab.cli", "train", cfg_path]


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data_dir = write_dataset_dir(root / "data", {"toy": ("alpaca", counting_records(10))})
    out_a, out_b = str(root / "run_a"), str(root / "run_b")
    cfg_a = _config(tiny_model, data_dir, out_a, tokenized_path=str(root / "cache_a"))
    cfg_b_dict = _config(tiny_model, data_dir, out_b, tokenized_path=str(root / "cache_b"))
    cfg_b = _write_cfg(root / "b.yaml", cfg_b_dict)
    hook_dir = root / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(PAUSE_HOOK, encoding="utf-8")
    pause_file = str(root / "paused")

    env_b = cli_env(extra_pythonpath=str(hook_dir))
    env_b.update(TUNELAB_TEST_PAUSE_AT_STEP=str(KILL_AFTER_LOGGED_STEP), TUNELAB_TEST_PAUSE_FILE=pause_file)
    proc_b = subprocess.Popen(_train_cmd(cfg_b), cwd=root, env=env_b, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        tunelab.run(cfg_a)  # run A, uninterrupted, in this process while B's first launch runs
        wait_for_kill_point([pause_file, os.path.join(out_b, "checkpoint-4", COMPLETE_MARKER)], proc_b, run="run B",
                            timeout=300.0)
        os.kill(proc_b.pid, signal.SIGKILL)
        proc_b.wait(timeout=60)
    finally:
        if proc_b.poll() is None:
            proc_b.kill()
    killed_state = {
        "returncode": proc_b.returncode,
        "log_steps": [r["current_steps"] for r in read_jsonl(os.path.join(out_b, "trainer_log.jsonl"))],
        "checkpoints": checkpoint_steps(out_b),
        "has_final_adapter": os.path.exists(os.path.join(out_b, "adapter_model.safetensors")),
    }
    # the same command again, no resume flag
    resumed = subprocess.run(_train_cmd(cfg_b), cwd=root, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"root": root, "data_dir": data_dir, "a": out_a, "b": out_b, "killed": killed_state,
            "resumed_stderr": resumed.stderr, "cfg_b": cfg_b_dict}


def test_the_kill_happened_mid_run(runs):
    killed = runs["killed"]
    assert killed["returncode"] == -signal.SIGKILL
    assert killed["log_steps"] == [1, 2, 3, 4, 5]
    assert killed["checkpoints"] == [2, 4]
    assert not killed["has_final_adapter"]


def test_restarted_run_continues_from_the_latest_checkpoint(runs):
    assert "continuing from" in runs["resumed_stderr"] and "checkpoint-4" in runs["resumed_stderr"]
    assert checkpoint_steps(runs["b"]) == [2, 4, 6]
    assert_section6_outputs(runs["b"], eval_expected=False, plots=False)


def test_killed_and_resumed_adapter_equals_the_uninterrupted_one(runs):
    a, b = adapter_tensors(runs["a"]), adapter_tensors(runs["b"])
    assert a.keys() == b.keys() and len(a) == 28
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    # and the checkpoints written before the kill equal the uninterrupted run's
    a4, b4 = adapter_tensors(os.path.join(runs["a"], "checkpoint-4")), adapter_tensors(os.path.join(runs["b"], "checkpoint-4"))
    assert all(torch.equal(a4[k], b4[k]) for k in a4)


def test_trainer_log_has_exactly_one_record_per_logging_step(runs):
    log_a = read_jsonl(os.path.join(runs["a"], "trainer_log.jsonl"))
    log_b = read_jsonl(os.path.join(runs["b"], "trainer_log.jsonl"))
    assert [r["current_steps"] for r in log_b] == list(range(1, MAX_STEPS + 1))
    assert [r["current_steps"] for r in log_a] == list(range(1, MAX_STEPS + 1))
    for ra, rb in zip(log_a, log_b, strict=True):  # same data order and dropout masks: the same losses, step by step
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5), (ra, rb)
        assert rb["lr"] == ra["lr"] and rb["epoch"] == ra["epoch"] and rb["total_steps"] == MAX_STEPS


def _copy_run(runs, name: str) -> str:
    dst = str(runs["root"] / name)
    shutil.copytree(runs["a"], dst)
    return dst


def test_checkpoint_without_completion_marker_is_ignored(runs, caplog):
    """A kill during the save of checkpoint-6: the folder exists without its marker (and no final adapter yet)."""
    out = _copy_run(runs, "torn_save")
    os.remove(os.path.join(out, "checkpoint-6", COMPLETE_MARKER))
    os.remove(os.path.join(out, "adapter_model.safetensors"))
    os.remove(os.path.join(out, "checkpoint-6", "optimizer.pt"))  # the save was cut before this file
    cfg = dict(runs["cfg_b"], output_dir=out)
    with caplog.at_level("INFO", logger="tunelab"):
        tunelab.run(cfg)
    assert "ignoring incomplete checkpoint(s) checkpoint-6" in caplog.text
    assert f"continuing from {os.path.join(out, 'checkpoint-4')}" in caplog.text
    assert checkpoint_steps(out) == [2, 4, 6]
    assert os.path.isfile(os.path.join(out, "checkpoint-6", COMPLETE_MARKER))
    assert [r["current_steps"] for r in read_jsonl(os.path.join(out, "trainer_log.jsonl"))] == list(range(1, MAX_STEPS + 1))
    a, got = adapter_tensors(runs["a"]), adapter_tensors(out)
    for key in a:
        torch.testing.assert_close(got[key], a[key], rtol=0, atol=1e-6, msg=key)


def test_rerunning_a_finished_run_changes_nothing(runs):
    out = _copy_run(runs, "finished")
    before = adapter_tensors(out)
    tunelab.run(dict(runs["cfg_b"], output_dir=out))
    after = adapter_tensors(out)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert checkpoint_steps(out) == [2, 4, 6]  # no step past max_steps
    assert [r["current_steps"] for r in read_jsonl(os.path.join(out, "trainer_log.jsonl"))] == list(range(1, MAX_STEPS + 1))


@pytest.mark.parametrize("leftover", ["empty", "incomplete_checkpoint"])
def test_resume_true_without_a_checkpoint_is_a_config_error(tiny_model, tmp_path, leftover):
    data_dir = write_dataset_dir(tmp_path / "data", {"toy": ("alpaca", counting_records(4))})
    out = tmp_path / "out"
    if leftover == "incomplete_checkpoint":
        (out / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(ConfigError) as info:
        tunelab.run(base_config(tiny_model, data_dir, str(out), resume_from_checkpoint=True))
    assert str(info.value) == f"resume_from_checkpoint: true, but {out} holds no complete checkpoint to resume from."
    # nothing was written: the decision is taken before the output folder is prepared
    assert not out.exists() if leftover == "empty" else sorted(os.listdir(out)) == ["checkpoint-2"]


def test_resume_from_an_explicit_checkpoint_path(runs, caplog):
    out = str(runs["root"] / "explicit")
    cfg = dict(runs["cfg_b"], output_dir=out, resume_from_checkpoint=os.path.join(runs["a"], "checkpoint-4"))
    tunelab.run(cfg)
    assert [r["current_steps"] for r in read_jsonl(os.path.join(out, "trainer_log.jsonl"))] == [5, 6]
    a, got = adapter_tensors(runs["a"]), adapter_tensors(out)
    for key in a:
        torch.testing.assert_close(got[key], a[key], rtol=0, atol=1e-6, msg=key)


def test_overwrite_output_dir_starts_over(runs, caplog):
    out = _copy_run(runs, "overwrite")
    cfg = dict(runs["cfg_b"], output_dir=out, overwrite_output_dir=True, max_steps=2, save_steps=2)
    with caplog.at_level("INFO", logger="tunelab"):
        tunelab.run(cfg)
    assert "continuing from" not in caplog.text
    assert checkpoint_steps(out) == [2]
    log = read_jsonl(os.path.join(out, "trainer_log.jsonl"))
    assert [r["current_steps"] for r in log] == [1, 2] and all(r["total_steps"] == 2 for r in log)
    # a fresh start takes the same first steps as run A did (same seed, same data order)
    log_a = read_jsonl(os.path.join(runs["a"], "trainer_log.jsonl"))
    assert log[0]["loss"] == pytest.approx(log_a[0]["loss"], abs=1e-5)


def test_same_seed_gives_the_same_adapter(tiny_model, tmp_path):
    """`seed` covers the adapter's initialisation too (LoRA A is random): without it no resumed run could equal an
    uninterrupted one, nor a run repeat itself. Two runs in one process, the second after other random draws."""
    data_dir = write_dataset_dir(tmp_path / "data", {"toy": ("alpaca", counting_records(4))})
    cfg = base_config(tiny_model, data_dir, str(tmp_path / "one"), max_steps=1, save_steps=1, seed=3)
    tunelab.run(cfg)
    torch.rand(10)  # whatever ran before in the process must not matter
    tunelab.run(dict(cfg, output_dir=str(tmp_path / "two")))
    one, two = adapter_tensors(tmp_path / "one"), adapter_tensors(tmp_path / "two")
    differ = [k for k in one if not torch.equal(one[k], two[k])]
    assert not differ, f"{len(differ)} of {len(one)} adapter tensors differ between two runs with seed 3, e.g. {differ[0]}"
