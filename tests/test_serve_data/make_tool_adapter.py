"""Rebuild tests/test_serve_data/tool_adapter: a LoRA adapter for the tiny test model (tunelab.model.tiny, seed 0)
that answers weather questions with a Qwen tool call, made by the real trainer. Stored in the repository so the
API tests need not spend CI time training it (about 60 s on 2 cores); run this after a change to the tiny model.

    python tests/test_serve_data/make_tool_adapter.py          # writes tests/test_serve_data/tool_adapter

150 steps of LoRA r=16 at a constant 1e-2 on four ShareGPT samples whose prompts carry the get_weather tool
(so the prompt is what the API renders for a request with `tools`) and whose answer is a function_call turn.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city.",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
ASKS = ["What is the weather in Paris?", "Weather in Paris, please.", "Is it raining in Paris?", "How warm is Paris today?"]


def main() -> None:
    from tunelab.config import load_config
    from tunelab.model.tiny import build_tiny_model
    from tunelab.train.workflow import run_train

    work = pathlib.Path(tempfile.mkdtemp(prefix="tool_adapter_"))
    model = build_tiny_model(str(work / "tiny-qwen2"))
    data = work / "data"
    data.mkdir()
    records = [{"conversations": [{"from": "human", "value": a}, {"from": "function_call", "value": json.dumps(CALL)}],
                "tools": json.dumps(TOOLS)} for a in ASKS]
    (data / "tools.json").write_text(json.dumps(records))
    (data / "dataset_info.json").write_text(json.dumps({"tools": {"file_name": "tools.json", "formatting": "sharegpt",
                                                                  "columns": {"messages": "conversations", "tools": "tools"}}}))
    run = work / "run"
    run_train(load_config(dict(
        model_name_or_path=model, do_train=True, template="qwen", dataset="tools", dataset_dir=str(data), cutoff_len=384,
        output_dir=str(run), overwrite_output_dir=True, logging_steps=10, save_steps=1000, max_steps=150,
        learning_rate=1e-2, lr_scheduler_type="constant", per_device_train_batch_size=2, lora_rank=16, report_to="none", seed=0,
    )))
    out = HERE / "tool_adapter"
    out.mkdir(exist_ok=True)
    shutil.copy(run / "adapter_model.safetensors", out / "adapter_model.safetensors")
    config = json.loads((run / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "tiny-qwen2"
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(work)
    print(f"wrote {out}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
