"""Shared helpers for the training tests (test_train_*.py, test_distributed*.py, test_tutorial_configs.py): the tiny
model, toy data written in tmp folders, a fast base config, readers for what a run leaves in output_dir, and the
wait for a kill-and-resume test's kill point.

Import the fixtures into a test module with `from helpers_train import tiny_model, isolated_env  # noqa: F401`.
The tiny model is built once per pytest session under the session's base temp folder (`build_tiny_model`
returns at once when the folder already holds the same build, so importing the fixture into several modules
costs one build).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

import pytest

# Section 6 of the train issue: what every run leaves in output_dir (plots when plot_loss is on).
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
CHECKPOINT_FILES = (
    "adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
    "trainer_state.json", "tunelab_checkpoint_complete",
)
LOG_KEYS = {"current_steps", "total_steps", "epoch", "percentage", "elapsed_time", "remaining_time", "tokens_per_second"}
TRAIN_RESULT_KEYS = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "total_flos", "epoch"}

# A constant-answer task: the tiny random model learns it within a few steps (loss ~14 -> ~2).
SECRET = "The secret word is banana."


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from tunelab.model.tiny import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.getbasetemp() / "tiny-qwen2"))


@pytest.fixture(scope="session", autouse=True)
def offline_session(tmp_path_factory):
    """For module-scoped runs too (they start before function fixtures): offline, tokenized cache in tmp."""
    with pytest.MonkeyPatch.context() as mp:
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            mp.setenv(var, "1")
        mp.setenv("TUNELAB_CACHE", str(tmp_path_factory.getbasetemp() / "tunelab-cache"))
        mp.delenv("USE_MODELSCOPE_HUB", raising=False)
        yield


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """No network, the tokenized cache in tmp, and the `tunelab` logger restored after the test.

    `tunelab.cli.main` calls setup_logging, which stops propagation and binds a handler to the sys.stderr of that
    moment (pytest's capture object of that test); restoring keeps later tests' caplog/capsys working.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "tunelab-cache"))
    monkeypatch.delenv("USE_MODELSCOPE_HUB", raising=False)
    monkeypatch.delenv("TUNELAB_DEBUG", raising=False)
    log = logging.getLogger("tunelab")
    saved = (list(log.handlers), log.propagate, log.level)
    yield
    log.handlers[:] = saved[0]
    log.propagate, log.level = saved[1], saved[2]


# ---------------------------------------------------------------- data


def toy_records(n: int = 12) -> list[dict[str, str]]:
    return [{"instruction": f"Tell me the secret word, please ({i}).", "input": "", "output": SECRET} for i in range(n)]


def counting_records(n: int, start: int = 0) -> list[dict[str, str]]:
    """Short alpaca records (the counting toy task of the demo data)."""
    out = []
    for i in range(start, start + n):
        k = 3 + i % 5
        out.append({"instruction": f"Count from 1 to {k}.", "input": "", "output": ", ".join(str(j) for j in range(1, k + 1))})
    return out


def sharegpt_records(n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        k = 3 + i % 5
        convs = [{"from": "human", "value": f"Count from 1 to {k}."}, {"from": "gpt", "value": ", ".join(str(j) for j in range(1, k + 1))}]
        if i % 3 == 0:  # some multi-turn samples
            convs += [{"from": "human", "value": "Again."}, {"from": "gpt", "value": "1, 2, 3"}]
        out.append({"conversations": convs})
    return out


def write_json(path, data) -> str:
    os.makedirs(os.path.dirname(str(path)) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, ensure_ascii=False, indent=1)
    return str(path)


def write_dataset_dir(data_dir, datasets: dict[str, tuple[str, list]]) -> str:
    """datasets: name -> (formatting, records); writes <name>.json files and dataset_info.json."""
    os.makedirs(data_dir, exist_ok=True)
    info = {}
    for name, (formatting, records) in datasets.items():
        write_json(os.path.join(data_dir, f"{name}.json"), records)
        info[name] = {"file_name": f"{name}.json", "formatting": formatting}
    write_json(os.path.join(data_dir, "dataset_info.json"), info)
    return str(data_dir)


def base_config(model: str, data_dir: str, output_dir: str, **overrides: Any) -> dict[str, Any]:
    """A fast LoRA run on the tiny model (fp32 on the CPU); tests add quantization etc."""
    cfg: dict[str, Any] = dict(
        model_name_or_path=model,
        do_train=True,
        template="qwen",
        dataset="toy",
        dataset_dir=data_dir,
        cutoff_len=64,
        output_dir=output_dir,
        logging_steps=1,
        save_steps=100,
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        report_to="none",
        seed=42,
    )
    cfg.update(overrides)
    return cfg


# ---------------------------------------------------------------- outputs


def read_jsonl(path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def read_json(path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def adapter_tensors(folder) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(os.path.join(str(folder), "adapter_model.safetensors"))


def checkpoint_steps(output_dir) -> list[int]:
    names = [n for n in os.listdir(output_dir) if n.startswith("checkpoint-")]
    return sorted(int(n.split("-", 1)[1]) for n in names)


def assert_section6_outputs(output_dir: str, *, eval_expected: bool, plots: bool = True, adapter: bool = True) -> None:
    """Every output of section 6 of the train issue, with the documented keys."""
    import yaml

    files = set(os.listdir(output_dir))
    if adapter:
        missing = [f for f in ADAPTER_FILES if f not in files]
        assert not missing, f"missing {missing} in {output_dir}: {sorted(files)}"
    for f in TOKENIZER_FILES:
        assert f in files, f"missing {f} in {output_dir}: {sorted(files)}"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(output_dir)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    steps = checkpoint_steps(output_dir)
    assert steps, f"no checkpoint-N folder in {output_dir}"
    for s in steps:
        ck = os.path.join(output_dir, f"checkpoint-{s}")
        names = set(os.listdir(ck))
        want = CHECKPOINT_FILES if adapter else tuple(f for f in CHECKPOINT_FILES if not f.startswith("adapter_"))
        missing = [f for f in want if f not in names]
        assert not missing, f"checkpoint-{s} lacks {missing}: {sorted(names)}"
    assert "trainer_log.jsonl" in files, f"no trainer_log.jsonl in {output_dir}: {sorted(files)}"
    log = read_jsonl(os.path.join(output_dir, "trainer_log.jsonl"))
    train_records = [r for r in log if "loss" in r]
    assert train_records, f"trainer_log.jsonl holds no training loss record: {log}"
    for r in log:
        assert LOG_KEYS <= set(r), f"trainer_log record lacks {LOG_KEYS - set(r)}: {r}"
        assert ("loss" in r) != ("eval_loss" in r), r
    for r in train_records:
        assert "lr" in r, r
    train_results = read_json(os.path.join(output_dir, "train_results.json"))
    assert TRAIN_RESULT_KEYS <= set(train_results), TRAIN_RESULT_KEYS - set(train_results)
    all_results = read_json(os.path.join(output_dir, "all_results.json"))
    assert TRAIN_RESULT_KEYS <= set(all_results), TRAIN_RESULT_KEYS - set(all_results)
    if eval_expected:
        assert "eval_loss" in all_results, all_results
        assert any("eval_loss" in r for r in log), f"no eval_loss record in trainer_log.jsonl: {log}"
        assert "eval_results.json" in files
    else:
        assert "eval_loss" not in all_results
    if plots:
        assert "training_loss.png" in files, f"no training_loss.png in {output_dir}: {sorted(files)}"
        if eval_expected:
            assert "training_eval_loss.png" in files, f"no training_eval_loss.png in {output_dir}: {sorted(files)}"
        for name in ("training_loss.png", "training_eval_loss.png"):
            if name in files:
                with open(os.path.join(output_dir, name), "rb") as fh:
                    assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(output_dir, "tunelab_config.yaml"), encoding="utf-8") as fh:
        saved = yaml.safe_load(fh)
    assert set(saved) == {"config", "given", "resolved"}
    assert saved["resolved"]["output_dir"] == os.path.abspath(output_dir)


def wait_for_kill_point(paths: list[str], proc, *, run: str, timeout: float, kill=None) -> None:
    """Wait until every path exists (a kill-and-resume test's kill point: the pause file its sitecustomize hook
    writes, the checkpoint marker). Fails with the last of the run's stderr when `proc` ends first; on timeout it
    kills the run (`kill(proc)`, default `proc.kill()`) and fails."""
    deadline = time.time() + timeout
    while not all(os.path.exists(p) for p in paths):
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"{run} ended (rc {proc.returncode}) before the kill point:\n{err[-3000:]}")
        if time.time() > deadline:
            (kill or (lambda p: p.kill()))(proc)
            pytest.fail(f"timed out waiting for {paths}")
        time.sleep(0.05)


def cli_env(extra_pythonpath: str | None = None) -> dict[str, str]:
    """Environment for `python -m tunelab.cli` subprocesses: offline, cache from this test, src importable."""
    env = dict(os.environ)
    paths = [p for p in (extra_pythonpath, env.get("PYTHONPATH")) if p]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("OMP_NUM_THREADS", str(min(2, os.cpu_count() or 1)))
    return env


PY = sys.executable
