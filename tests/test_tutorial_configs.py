"""Every shipped tutorial config (examples/*.yaml except the quickstart) runs on the tiny model with only the model
path and the step count changed (the datasets they name are registered in a local data/dataset_info.json, the
alpaca_gpt4_* names overridden by small local files), and leaves every output of section 6 of the train issue.

Each config runs through `tunelab train <config> model_name_or_path=... max_steps=2`, from a temporary working
folder (their output_dir and dataset_dir are relative paths).
"""
from __future__ import annotations

import glob
import os

import pytest
import yaml

from helpers_train import (  # noqa: F401  (fixtures)
    assert_section6_outputs,
    counting_records,
    isolated_env,
    offline_session,
    read_json,
    read_jsonl,
    sharegpt_records,
    tiny_model,
    write_dataset_dir,
)
from tunelab.cli import main

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
CONFIGS = sorted(p for p in glob.glob(os.path.join(EXAMPLES, "*.yaml")) if os.path.basename(p) != "quickstart.yaml")
MAX_STEPS = 2


def test_the_tutorial_configs_are_all_covered():
    names = {os.path.basename(p) for p in CONFIGS}
    assert names == {
        "qwen2-7b-instruct_qlora_alpaca_en.yaml", "qwen2-7b_lora_math.yaml", "qwen2-7b_qlora_math.yaml",
        "qwen2.5-3b-instruct_lora_sharegpt.yaml", "qwen2.5-3b-instruct_qlora4_sharegpt.yaml",
        "qwen2.5-3b-instruct_qlora8_sharegpt.yaml", "qwen2.5-7b-instruct_qlora_alpaca_zh.yaml",
    }


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working folder with data/dataset_info.json naming every dataset the tutorials use."""
    monkeypatch.chdir(tmp_path)
    zh = [{"instruction": f"从1数到{3 + i % 5}。", "input": "", "output": "、".join(str(j) for j in range(1, 4 + i % 5))} for i in range(20)]
    write_dataset_dir(tmp_path / "data", {
        "math_train": ("alpaca", counting_records(20)),
        "math_eval": ("alpaca", counting_records(4, start=20)),
        "my_sharegpt": ("sharegpt", sharegpt_records(20)),
        "alpaca_gpt4_en": ("alpaca", counting_records(20)),
        "alpaca_gpt4_zh": ("alpaca", zh),
    })
    return tmp_path


@pytest.mark.parametrize("config", CONFIGS, ids=[os.path.basename(p)[:-5] for p in CONFIGS])
def test_tutorial_config_runs_on_the_tiny_model(config, tiny_model, workdir, capsys):
    with open(config, encoding="utf-8") as fh:
        original = yaml.safe_load(fh)
    overrides = {"model_name_or_path": tiny_model, "max_steps": MAX_STEPS}
    rc = main(["train", config, *(f"{k}={v}" for k, v in overrides.items())])
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    out = os.path.join(workdir, original["output_dir"])
    has_eval = bool(original.get("val_size") or original.get("eval_dataset"))
    assert_section6_outputs(out, eval_expected=has_eval, plots=bool(original.get("plot_loss")))

    with open(os.path.join(out, "tunelab_config.yaml"), encoding="utf-8") as fh:
        saved = yaml.safe_load(fh)
    # the run used the tutorial's values: only the model path and the step count differ
    assert saved["given"] == {**original, **overrides}
    assert {k: saved["config"][k] for k in original if k not in overrides} == {k: v for k, v in original.items() if k not in overrides}
    log = read_jsonl(os.path.join(out, "trainer_log.jsonl"))
    assert all(r["total_steps"] == MAX_STEPS for r in log)
    if original.get("load_best_model_at_end"):
        state = read_json(os.path.join(out, "trainer_state.json"))
        assert state["best_model_checkpoint"] == os.path.join(out, f"checkpoint-{MAX_STEPS}")
    if original.get("fp16"):  # fp16 on a CPU: one warning, float32 training
        assert saved["resolved"]["compute_dtype"] == "float32"
        assert err.count("fp16 was requested but training runs on the CPU") == 1


def test_preprocessing_num_workers_gives_the_same_encoding(qwen_tokenizer):
    """The tutorials' preprocessing_num_workers (8, 16) encode in worker processes from 2000 samples on: the result
    equals the serial encoding, in order."""
    from tunelab.data.conversation import Conversation
    from tunelab.data.processing import encode_conversations
    from tunelab.data.template import get_template

    template = get_template("qwen", qwen_tokenizer)
    convs = [Conversation(messages=[{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}])
             for r in counting_records(2000)]
    serial, dropped_serial = encode_conversations(convs, template, cutoff_len=24, train_on_prompt=False, mask_history=False)
    parallel, dropped_parallel = encode_conversations(convs, template, cutoff_len=24, train_on_prompt=False, mask_history=False,
                                                      num_workers=16)
    assert parallel.input_ids == serial.input_ids and parallel.labels == serial.labels
    assert dropped_parallel == dropped_serial


def test_encoding_workers_end_under_an_inherited_sigterm_handler():
    """A process with a Python SIGTERM handler that only sets a flag (as a training run's graceful stop does)
    forks the encoding pool: a stopped worker must still end (a worker that inherits the flag-only handler
    ignores the pool's SIGTERM, and the pool's exit waited forever in a CI run). Each worker reports its own
    SIGTERM disposition; run in a subprocess with a deadline, so a regression fails instead of hanging."""
    import subprocess
    import sys

    script = """
import signal
from tunelab.data import processing
signal.signal(signal.SIGTERM, lambda *a: None)
processing._encode_one = lambda template, conv, args: [conv, signal.getsignal(signal.SIGTERM) is signal.SIG_DFL]
out = processing._encode_parallel(list(range(600)), None, None, 3)
assert out == [[i, True] for i in range(600)], out[:3]
print("ok", signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["ok", "True"]
