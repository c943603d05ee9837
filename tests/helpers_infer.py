"""Shared by the chat, engine and export tests: a tiny Qwen2 model and LoRA runs made by the real trainer,
built once per pytest session under its base temp folder (test files import `tiny_run` and the `lora_run` fixture)."""
from __future__ import annotations

import pathlib

import pytest

# a second adapter for the tiny model (trained apart, checked in): the serve and engine tests mix it with lora_run's
TOOL_ADAPTER = str(pathlib.Path(__file__).parent / "test_serve_data" / "tool_adapter")


def plain_engine(lora_run, **keys):
    """The in-process engine on lora_run's model and adapter with plain generate (decode_backend hf), greedy: the
    reference the fast decoders and the server are compared with; keys add to the config."""
    from tunelab.config import load_config
    from tunelab.infer import Engine

    model, run = lora_run
    return Engine.from_config(load_config({"model_name_or_path": model, "adapter_name_or_path": run, "do_sample": False,
                                           "decode_backend": "hf", **keys}))


def tiny_run(tmp_path_factory, name: str, **overrides) -> tuple[str, str]:
    """(tiny model folder, run folder): built once per pytest session and shared by the tunelab test files."""
    from tunelab.config import load_config
    from tunelab.data.demo import write_demo_dataset
    from tunelab.model.tiny import build_tiny_model
    from tunelab.train.workflow import run_train

    root = tmp_path_factory.getbasetemp() / "tunelab_tiny_runs"
    model = build_tiny_model(str(root / "tiny-qwen2"))
    data = root / "data"
    if not (data / "dataset_info.json").exists():
        write_demo_dataset(str(data))
    run = root / name
    if not (run / "adapter_config.json").exists():
        cfg = dict(
            model_name_or_path=model, do_train=True, template="qwen", dataset="demo", dataset_dir=str(data), cutoff_len=64,
            max_samples=16, output_dir=str(run), overwrite_output_dir=True, logging_steps=2, save_steps=4, max_steps=8,
            learning_rate=5e-3, per_device_train_batch_size=2, report_to="none", seed=0,
        )
        cfg.update(overrides)
        run_train(load_config(cfg))
    return model, str(run)


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory):
    return tiny_run(tmp_path_factory, "lora16")
