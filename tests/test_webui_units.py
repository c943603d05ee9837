"""The web UI's parts without a browser: the locale table, schema widgets and value collection, the run files
(busy refusal, the end of a run read from its files), and the two commands' argument handling."""
from __future__ import annotations

import json
import os
import pathlib
import string
import subprocess
import sys
import time

import pytest

from helpers_train import isolated_env, tiny_model  # noqa: F401
from tunelab.errors import ConfigError


def _fields(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


def test_every_string_has_both_languages_with_the_same_placeholders():
    from tunelab.webui.locale import STRINGS

    for key, (en, zh) in STRINGS.items():
        assert en.strip() and zh.strip(), key
        assert _fields(en) == _fields(zh), key


def test_chinese_help_covers_schema_keys_and_falls_back_to_english():
    from tunelab.config.parse import FIELDS
    from tunelab.webui.locale import SCHEMA_HELP_ZH, field_help

    assert set(SCHEMA_HELP_ZH) <= set(FIELDS)  # no help for a key that does not exist
    assert field_help("learning_rate", "zh") == "峰值学习率。"
    assert field_help("learning_rate", "en") == FIELDS["learning_rate"][1].metadata["help"]
    missing = next((k for k in FIELDS if k not in SCHEMA_HELP_ZH), None)
    if missing:  # a key added later without a translation shows its English help
        assert field_help(missing, "zh") == FIELDS[missing][1].metadata["help"]


def test_widget_kinds_follow_the_schema_types():
    from tunelab.webui.ui import choices_of, widget_kind

    assert widget_kind("finetuning_type") == "dropdown"
    assert choices_of("finetuning_type") == ["lora", "freeze", "full"]
    assert widget_kind("quantization_bit") == "dropdown" and choices_of("quantization_bit") == ["", "4", "8"]
    assert widget_kind("plot_loss") == "checkbox"
    assert widget_kind("packing") == "tristate" and choices_of("packing") == ["", "true", "false"]
    assert widget_kind("lora_rank") == "int" and widget_kind("learning_rate") == "float"
    assert widget_kind("max_samples") == "text"  # Optional[int]: empty means unset
    assert widget_kind("resume_from_checkpoint") == "text"


def test_collect_keeps_only_what_differs_from_the_default():
    from tunelab.webui.ui import collect

    keys = ["learning_rate", "lora_rank", "template", "quantization_bit", "dataset", "max_samples", "plot_loss", "packing"]
    values = [5e-5, 16.0, "auto", "4", ["demo", "extra"], "  ", True, ""]
    assert collect(keys, values) == {"lora_rank": 16, "quantization_bit": "4", "dataset": "demo,extra", "plot_loss": True}


def test_train_config_is_validated_by_the_one_parser():
    from tunelab.webui.train_tab import command_text, train_config

    config = train_config(["output_dir", "lora_rank", "max_steps"], ["saves/a", 4, 10], {"model_name_or_path": "m"})
    assert config == {"model_name_or_path": "m", "stage": "sft", "do_train": True, "lora_rank": 4,
                      "output_dir": "saves/a", "max_steps": 10}
    assert command_text(config).splitlines()[0] == "tunelab train saves/a/tunelab_webui.yaml"
    with pytest.raises(ConfigError, match="lora_rank"):
        train_config(["lora_rank"], ["eight"], {"model_name_or_path": "m"})


def test_a_second_start_on_the_same_device_is_refused_and_writes_nothing(tmp_path):
    from tunelab.webui import runs

    busy = tmp_path / "saves" / "busy"
    busy.mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "tunelab", "train"])
    try:
        # Popen can return (vfork) before the kernel has set the child's argument pages: /proc/<pid>/cmdline reads
        # empty for that moment, and pid_alive, which checks it for "tunelab", would call the run dead (one
        # fresh-clone CI run failed so). Wait for the command line the run check reads.
        deadline = time.time() + 10
        cmdline = pathlib.Path(f"/proc/{sleeper.pid}/cmdline")
        while os.path.isdir("/proc") and b"tunelab" not in cmdline.read_bytes() and time.time() < deadline:
            time.sleep(0.01)
        (busy / runs.RUN_FILE).write_text(json.dumps({"pid": sleeper.pid, "device": runs.current_device(), "started": time.time()}))
        other = tmp_path / "saves" / "other"
        with pytest.raises(ConfigError, match=f"already training on {runs.current_device()}.*pid {sleeper.pid}"):
            runs.start_run({"output_dir": str(other), "model_name_or_path": "m"}, str(tmp_path / "saves"))
        assert not other.exists()
        assert [r["output_dir"] for r in runs.find_live_runs(str(tmp_path / "saves"))] == [str(busy)]
    finally:
        sleeper.kill()
        sleeper.wait()
    assert runs.find_live_runs(str(tmp_path / "saves")) == []  # a dead pid is not a live run
    assert runs.stop_run(str(busy)) is False


def test_run_state_reads_the_end_of_a_run_from_its_files(tmp_path):
    from tunelab.webui import runs

    out = tmp_path / "run"
    out.mkdir()
    (out / "trainer_log.jsonl").write_text("".join(json.dumps({"current_steps": s, "total_steps": 9, "loss": 1.0 / s}) + "\n"
                                                   for s in (1, 2, 3)))
    (out / runs.OUTPUT_FILE).write_text("[tunelab] step 3/9\ntunelab train: error: stopped on request (SIGTERM) at step 3 "
                                        "of 9: checkpoint-3 is saved and complete; run the same command again.\n")
    state = runs.run_state(str(out))
    assert (state.running, state.end, state.stopped_step) == (False, "stopped", 3)
    assert state.last == {"current_steps": 3, "total_steps": 9, "loss": 1.0 / 3}
    (out / runs.OUTPUT_FILE).write_text("tunelab train: error: dataset 'nope' is not registered.\n")
    state = runs.run_state(str(out))
    assert (state.end, state.message) == ("failed", "dataset 'nope' is not registered.")
    (out / runs.OUTPUT_FILE).write_text("[tunelab] loading the model\n")
    (out / runs.RUN_FILE).write_text(json.dumps({"pid": 2**22 + 7, "returncode": -15}))
    assert runs.run_state(str(out)).message == "the process was ended by signal SIGTERM before its first step."
    (out / runs.RUN_FILE).unlink()
    (out / runs.OUTPUT_FILE).write_text("[tunelab] done\n")
    (out / "all_results.json").write_text("{}")
    assert runs.run_state(str(out)).end == "done"
    assert runs.run_state(str(tmp_path / "absent")).end is None


def test_progress_line_and_loss_frame():
    from tunelab.webui.runs import RunState
    from tunelab.webui.train_tab import loss_frame, progress_text

    state = RunState("saves/a", running=True, pid=7, records=[
        {"current_steps": 5, "total_steps": 10, "loss": 2.5, "lr": 1e-3, "percentage": 50.0, "tokens_per_second": 100.0,
         "elapsed_time": "0:00:05", "remaining_time": "0:00:05"},
        {"current_steps": 5, "total_steps": 10, "eval_loss": 2.25, "percentage": 50.0}])
    assert progress_text(state, "en") == ("step 5/10 (50%) | loss 2.5000 | lr 1.00e-03 | 100 tok/s | eval_loss 2.2500 | "
                                          "0:00:05 elapsed, 0:00:05 left\n\nRunning (pid 7).")
    assert progress_text(state, "zh").startswith("第 5/10 步（50%）")
    frame = loss_frame(state)
    assert frame.to_dict("records") == [{"step": 5, "value": 2.5, "series": "loss"},
                                        {"step": 5, "value": 2.25, "series": "eval_loss"}]


def test_commands_are_listed_and_refuse_bad_input(capsys):
    from tunelab.cli import COMMANDS, main

    assert COMMANDS["webui"][0] == "tunelab.commands.webui" and COMMANDS["webchat"][0] == "tunelab.commands.webchat"
    assert main(["webui", "--help"]) == 0
    assert "--port" in capsys.readouterr().out
    assert main(["webchat", "max_new_tokens=8"]) == 1
    assert "needs a model" in capsys.readouterr().err
    assert main(["webui", "lora_rnak=8"]) == 1
    assert "lora_rank" in capsys.readouterr().err


def test_webchat_serves_the_chat_alone_for_one_model(tiny_model, monkeypatch):  # noqa: F811
    import socket
    import urllib.request

    from tunelab.webui import chat_tab
    from tunelab.webui.app import build_webchat

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    model = tiny_model
    demo = build_webchat({"model_name_or_path": model, "template": "qwen", "max_new_tokens": 8}, lang="zh")
    try:
        assert chat_tab.HOLDER.engine is not None and chat_tab.HOLDER.what == model
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        config = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=10).read())
        ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
        assert {"chat-send", "chat-tuned", "chat-message"} <= ids
        assert not ids & {"start-btn", "preview-btn", "export-run", "chat-load"}  # the chat alone, its model fixed
        labels = {c.get("props", {}).get("label") for c in config["components"]}
        assert "消息" in labels  # --lang zh
    finally:
        demo.close()
        chat_tab.HOLDER.unload()


def test_template_check_names_the_template_and_warns_on_a_mismatch(tiny_model):  # noqa: F811
    from tunelab.webui.locale import t
    from tunelab.webui.model_panel import template_check

    ok = template_check(tiny_model, "auto", "en")
    assert ok.startswith("Template check: ") and t("template_ok", "en") in ok
    other = template_check(tiny_model, "llama3", "en")
    assert other.startswith("Template check: llama3: ") and t("template_ok", "en") not in other
    bad = template_check("/no/such/model", "auto", "en")
    assert bad.startswith("Error: ") and "/no/such/model" in bad


def test_run_choices_list_checkpoints_with_step_eval_loss_and_the_best(tmp_path):
    from tunelab.webui.model_panel import run_choices

    run = tmp_path / "saves" / "run"
    for folder in (run, run / "checkpoint-2", run / "checkpoint-4"):
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
        (folder / "adapter_model.safetensors").write_bytes(b"")
    (run / "trainer_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"current_steps": 2, "loss": 3.0}, {"current_steps": 2, "eval_loss": 1.5},
        {"current_steps": 4, "loss": 2.0}, {"current_steps": 4, "eval_loss": 1.75})))
    assert run_choices(str(tmp_path / "saves"), "en") == [
        ("(none: base model)", ""),
        ("run · step 4 · eval_loss 1.7500", str(run)),
        ("run/checkpoint-2 · step 2 · eval_loss 1.5000 · ★ best", str(run / "checkpoint-2")),
        ("run/checkpoint-4 · step 4 · eval_loss 1.7500", str(run / "checkpoint-4")),
    ]
    assert run_choices(str(tmp_path / "none"), "zh") == [("（无：基座模型）", "")]
