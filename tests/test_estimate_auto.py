"""per_device_train_batch_size: auto (the estimate picks the batch on the GPU at hand; 1 on a CPU), the warning before a
run that will not fit, and the real peak memory a run records (GPU test)."""
from __future__ import annotations

import logging
import os
import types
from dataclasses import replace

import pytest
from helpers_train import base_config, isolated_env, read_json, read_jsonl, tiny_model, toy_records, write_dataset_dir  # noqa: F401

from tunelab.config import load_config
from tunelab.estimate import estimate, model_shape
from tunelab.estimate import runtime
from tunelab.estimate.terms import GiB

QLORA_7B = {"model_name_or_path": "Qwen/Qwen2.5-7B-Instruct", "quantization_bit": 4, "cutoff_len": 1024,
            "per_device_train_batch_size": "auto", "do_train": True, "dataset": "x"}


def test_auto_is_a_valid_value_and_other_words_are_not():
    assert load_config(QLORA_7B).per_device_train_batch_size == "auto"
    with pytest.raises(Exception, match="expected an integer or one of 'auto'"):
        load_config({**QLORA_7B, "per_device_train_batch_size": "max"})


def test_auto_on_a_gpu_picks_the_largest_batch_that_fits(monkeypatch):
    from tunelab.train.workflow import resolve_batch_size

    free = 22 * GiB  # a 24 GiB card with its context and a display on it
    monkeypatch.setattr(runtime, "free_gpu_bytes", lambda: free)
    cfg = resolve_batch_size(load_config(QLORA_7B), types.SimpleNamespace(device="cuda"))
    batch = cfg.per_device_train_batch_size
    shape = model_shape("Qwen/Qwen2.5-7B-Instruct")
    u = runtime.setup_from_config(cfg, batch=1, ask_triton=True)[1]  # the settings the trainer will run on this machine
    need = lambda b: estimate(shape, replace(u, batch=b, mask=True)).nvidia_smi  # noqa: E731
    budget = free - runtime.MARGIN + runtime.CUDA_CONTEXT
    assert batch in (1, 2, 4, 8, 16, 32, 64) and batch >= 4
    assert need(batch) <= budget < need(2 * batch)


def test_train_time_estimates_take_the_trainers_compile_decision(monkeypatch):
    """At train time (on the GPU) the estimate asks the trainer's own compile_decision, Triton check included: with
    Triton it is the compiled path; without (torch.utils._triton.has_triton False) the eager one."""
    import torch.utils._triton

    from tunelab.estimate.from_config import setup_and_plan_from_config

    monkeypatch.delenv("TUNELAB_FAST_COMPILE", raising=False)
    cfg = load_config({**QLORA_7B, "per_device_train_batch_size": 4})
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    _, u, _, plan = setup_and_plan_from_config(cfg, ask_triton=True)
    assert u.compiled and plan.compiled_reason == "decoder layers compiled"
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)
    _, u, _, plan = setup_and_plan_from_config(cfg, ask_triton=True)
    assert not u.compiled and plan.compiled_reason == "Triton is not available for torch.compile"
    eager = estimate(model_shape(QLORA_7B["model_name_or_path"]), u).nvidia_smi - runtime.CUDA_CONTEXT
    monkeypatch.setattr(runtime, "free_gpu_bytes", lambda: 2 * GiB)  # neither path fits: the warning names the need
    assert f"the memory estimate for this run is {eager / GiB:.1f} GiB" in runtime.fit_warning(cfg, "cuda")
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    _, u, _, _ = setup_and_plan_from_config(cfg, ask_triton=True)
    compiled = estimate(model_shape(QLORA_7B["model_name_or_path"]), u).nvidia_smi - runtime.CUDA_CONTEXT
    assert f"{compiled / GiB:.1f}" != f"{eager / GiB:.1f}"
    assert f"the memory estimate for this run is {compiled / GiB:.1f} GiB" in runtime.fit_warning(cfg, "cuda")


def test_auto_on_a_cpu_is_batch_one_and_logged(caplog):
    from tunelab.train.workflow import resolve_batch_size

    with caplog.at_level(logging.INFO, logger="tunelab"):
        cfg = resolve_batch_size(load_config(QLORA_7B), types.SimpleNamespace(device="cpu"))
    assert cfg.per_device_train_batch_size == 1
    assert "per_device_train_batch_size: auto -> 1" in caplog.text


def test_warning_names_the_setting_to_change(monkeypatch):
    cfg = load_config({**QLORA_7B, "per_device_train_batch_size": 16, "gradient_accumulation_steps": 2})
    shape, u, _ = runtime.setup_from_config(cfg, ask_triton=True)  # what the trainer will run on this machine
    need = lambda b: estimate(shape, replace(u, batch=b)).nvidia_smi - runtime.CUDA_CONTEXT  # noqa: E731
    free = (need(4) + need(8)) // 2 + runtime.MARGIN  # batch 4 fits, 8 and 16 do not
    monkeypatch.setattr(runtime, "free_gpu_bytes", lambda: free)
    text = runtime.fit_warning(cfg, "cuda")
    assert text and f"{free / GiB:.1f} GiB free" in text and "per_device_train_batch_size: 4 " in text
    batch = int(text.split("per_device_train_batch_size: ")[1].split(" ")[0])
    assert batch < 16 and f"gradient_accumulation_steps: {16 * 2 // batch}" in text
    assert runtime.fit_warning(load_config({**QLORA_7B, "per_device_train_batch_size": 1}), "cuda") is None
    assert runtime.fit_warning(cfg, "cpu") is None


def test_a_cpu_run_with_batch_auto_trains_at_batch_one(tiny_model, tmp_path, caplog):  # noqa: F811
    import tunelab

    data = write_dataset_dir(tmp_path / "data", {"toy": ("alpaca", toy_records(4))})
    out = str(tmp_path / "out")
    with caplog.at_level(logging.INFO, logger="tunelab"):
        tunelab.run(base_config(tiny_model, data, out, per_device_train_batch_size="auto", max_steps=1, save_strategy="no"))
    assert "per_device_train_batch_size: auto -> 1" in caplog.text
    assert read_json(os.path.join(out, "all_results.json"))["train_samples_per_second"] > 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
def test_a_gpu_run_records_its_peak_memory(tiny_model, tmp_path):  # noqa: F811
    import tunelab

    data = write_dataset_dir(tmp_path / "data", {"toy": ("alpaca", toy_records(8))})
    out = str(tmp_path / "out")
    tunelab.run(base_config(tiny_model, data, out, max_steps=2, save_strategy="no", bf16=True))
    results = read_json(os.path.join(out, "all_results.json"))
    assert 0 < results["peak_memory_allocated_gib"] <= results["peak_memory_reserved_gib"]
    log = [r for r in read_jsonl(os.path.join(out, "trainer_log.jsonl")) if "loss" in r]
    assert log and all(r["gpu_memory_reserved_gib"] >= r["gpu_memory_gib"] > 0 for r in log)
