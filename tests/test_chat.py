"""`tunelab chat` on a tiny Qwen2 model with a LoRA adapter trained by the real trainer (CPU, offline)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers_infer import lora_run, tiny_run as _tiny_run  # noqa: F401 (fixture)

from tunelab.data.conversation import Conversation


@pytest.fixture(scope="session")
def args(lora_run):
    model, run = lora_run
    return [f"model_name_or_path={model}", f"adapter_name_or_path={run}", "--do_sample", "false", "max_new_tokens=10"]


@pytest.fixture(scope="session")
def engine(lora_run):
    from tunelab.config import load_config
    from tunelab.infer import Engine

    model, run = lora_run
    return Engine.from_config(load_config({"model_name_or_path": model, "adapter_name_or_path": run, "do_sample": False, "max_new_tokens": 10}))


def _conv(*turns: str) -> Conversation:
    roles = ["user", "assistant"]
    return Conversation(messages=[{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)])


def _plain_generate(engine, conv) -> str:
    """What plain model.generate gives for the same prompt ids (greedy, stop on the template's stop tokens)."""
    import torch

    ids = engine.encode(conv)
    out = engine.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=10, eos_token_id=engine.template.stop_token_ids)
    new = out[0, len(ids):].tolist()
    new = new[: next((i for i, t in enumerate(new) if t in engine.template.stop_token_ids), len(new))]
    return engine.tokenizer.decode(new, skip_special_tokens=True)


def test_split_options_keeps_config_arguments():
    from tunelab.commands.chat import ChatOptions, split_options

    opts, rest = split_options(["cfg.yaml", "--prompt", "Hi there", "top_k=5", "--compare-base", "--max_new_tokens", "4", "--batch-size=3"])
    assert opts == ChatOptions(prompt="Hi there", batch_size=3, compare_base=True)
    assert rest == ["cfg.yaml", "top_k=5", "--max_new_tokens", "4"]


def test_option_errors():
    from tunelab.commands.chat import split_options
    from tunelab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^--prompt and --prompts are both given: choose one\.$"):
        split_options(["--prompt", "a", "--prompts", "b.txt"])
    with pytest.raises(ConfigError, match=r"^--batch-size must be at least 1, got 0\.$"):
        split_options(["--batch-size", "0"])


def test_prompt_prints_only_the_answer(args, engine, capsys):
    from tunelab.commands import chat

    assert chat.main([*args, "--prompt", "What is the capital of France?"]) == 0
    out = capsys.readouterr().out
    assert out == _plain_generate(engine, _conv("What is the capital of France?")) + "\n"


def test_prompts_file_writes_jsonl(args, engine, tmp_path):
    from tunelab.commands import chat

    src = tmp_path / "prompts.jsonl"
    src.write_text(
        json.dumps({"id": 7, "prompt": "Hello!"}) + "\n"
        + json.dumps({"instruction": "Translate to French:", "input": "good morning"}) + "\n"
        + json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}) + "\n",
        encoding="utf-8",
    )
    out = tmp_path / "answers.jsonl"
    assert chat.main([*args, "--prompts", str(src), "--out", str(out), "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    convs = [_conv("Hello!"), _conv("Translate to French:\ngood morning"), Conversation(messages=[{"role": "user", "content": "Hi"}], system="Be brief.")]
    expected = [_plain_generate(engine, c) for c in convs]
    assert rows == [
        {"id": 7, "prompt": "Hello!", "answer": expected[0]},
        {"prompt": "Translate to French:\ngood morning", "answer": expected[1]},
        {"prompt": "Hi", "answer": expected[2]},
    ]


def test_compare_base_narrow_and_wide(args, engine, capsys, monkeypatch):
    from tunelab.commands import chat

    conv = _conv("Hello!")
    tuned = engine.generate([conv])[0]
    with engine.adapter_disabled():
        base = engine.generate([conv])[0]
    assert base != tuned
    monkeypatch.setenv("COLUMNS", "60")
    assert chat.main([*args, "--prompt", "Hello!", "--compare-base"]) == 0
    assert capsys.readouterr().out == f"Base: {base}\nFine-tuned: {tuned}\n"
    monkeypatch.setenv("COLUMNS", "140")
    assert chat.main([*args, "--prompt", "Hello!", "--compare-base"]) == 0
    lines = capsys.readouterr().out.splitlines()
    width = (140 - 3) // 2
    assert lines[0] == "base".ljust(width) + " | fine-tuned"
    assert lines[1] == "-" * width + " | " + "-" * width
    left = " ".join(line.split(" | ")[0].strip() for line in lines[2:])
    right = " ".join(line.split(" | ", 1)[1].strip() for line in lines[2:] if " | " in line)
    assert left.split() == base.split() and right.split() == tuned.split()


def test_compare_base_needs_an_adapter(lora_run):
    from tunelab.commands import chat
    from tunelab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^--compare-base compares the base model with a fine-tuned one: set adapter_name_or_path\.$"):
        chat.main([f"model_name_or_path={lora_run[0]}", "--prompt", "Hi", "--compare-base"])


def test_interactive_chat_through_a_pipe(args, engine, tmp_path):
    """question, question (sees the first exchange), clear, question (sees nothing before), exit, ignored line."""
    cfg = tmp_path / "chat.yaml"
    cfg.write_text("\n".join(a.replace("=", ": ", 1) for a in args if "=" in a) + "\n", encoding="utf-8")
    env = {**os.environ, "COLUMNS": "80", "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run(
        [sys.executable, "-m", "tunelab.cli", "chat", str(cfg), "--do_sample", "false", "--show-prompt"],
        input="Hello!\nTell me more.\nclear\nWho are you?\nexit\nnever read\n",
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    a1 = _plain_generate(engine, _conv("Hello!"))
    a2 = _plain_generate(engine, _conv("Hello!", a1, "Tell me more."))
    a3 = _plain_generate(engine, _conv("Who are you?"))
    assert proc.stdout == f"Assistant: {a1}\nAssistant: {a2}\nAssistant: {a3}\n"
    prompts = [line for line in proc.stderr.splitlines() if line.startswith("[prompt")]
    assert len(prompts) == 3
    assert "Hello!<|im_end|>\\n<|im_start|>assistant\\n" + a1.replace("\n", "\\n") + "<|im_end|>\\n<|im_start|>user\\nTell me more." in prompts[1]
    assert "Hello!" not in prompts[2] and "Who are you?" in prompts[2]
    assert "(history cleared)" in proc.stderr


def _training_config(tmp_path, model: str, output_dir: str) -> str:
    """A `tunelab train` config (do_train: true) whose output_dir is a finished run."""
    import yaml

    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": model, "do_train": True, "template": "qwen", "dataset": "demo",
                                    "output_dir": output_dir, "max_steps": 8}), encoding="utf-8")
    return str(path)


def test_training_config_chats_with_the_adapter_its_run_wrote(lora_run, engine, tmp_path, capsys):
    from tunelab.cli import main

    model, run = lora_run
    cfg = _training_config(tmp_path, model, run)
    assert main(["chat", cfg, "--prompt", "What is the capital of France?", "do_sample=false", "max_new_tokens=10"]) == 0
    captured = capsys.readouterr()
    assert captured.out == _plain_generate(engine, _conv("What is the capital of France?")) + "\n"
    assert (f"chat: {cfg} is a training config, so chat uses the adapter its training wrote, in {run} (set "
            "adapter_name_or_path to choose another, or adapter_name_or_path=none for the base model)") in captured.err
    # adapter_name_or_path=none on the command line: the base model alone, as asked
    assert main(["chat", cfg, "--prompt", "What is the capital of France?", "do_sample=false", "max_new_tokens=10",
                 "adapter_name_or_path=none"]) == 0
    with engine.adapter_disabled():
        assert capsys.readouterr().out == _plain_generate(engine, _conv("What is the capital of France?")) + "\n"


def test_training_config_before_training_says_so(lora_run, tmp_path, capsys):
    from tunelab.cli import main

    cfg = _training_config(tmp_path, lora_run[0], str(tmp_path / "not-yet"))
    assert main(["chat", cfg, "--prompt", "Hi"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"tunelab chat: error: {cfg} is a training config (do_train: true), but its output_dir '{tmp_path}/not-yet' "
        f"holds no trained adapter yet: run `tunelab train {cfg}` first, or set adapter_name_or_path (a run folder, "
        "or adapter_name_or_path=none for the base model alone).")
