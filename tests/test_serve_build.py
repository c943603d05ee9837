"""Assembling `tunelab api` without HTTP: a QLoRA adapter is served on the 4-bit base it was trained on, the
command's own flags and config key (lora_modules), and their errors as sentences."""
from __future__ import annotations

import pytest

from helpers_infer import tiny_run

from tunelab.errors import ConfigError


def test_qlora_adapter_is_served_on_its_4bit_base(tmp_path_factory):
    import torch

    from tunelab.config import load_config
    from tunelab.data.conversation import Conversation
    from tunelab.serve.server import build_service

    model, run = tiny_run(tmp_path_factory, "qlora4", quantization_bit=4)  # the export tests' QLoRA run
    cfg = load_config({"model_name_or_path": model, "do_sample": False, "max_new_tokens": 8})  # no quantization_bit
    service = build_service(cfg, loras={"q": run}, max_slots=2, max_len=256)
    engine = service.engine
    layer = engine.model.get_base_model().model.layers[0].self_attn.q_proj
    assert type(layer.base_layer).__name__ == "Linear4bit"
    assert list(service.models.items()) == [("tiny-qwen2", None), ("q", "q")]
    assert engine.template.name == "qwen"  # from the adapter's training config too
    prompt = engine.encode(Conversation(messages=[{"role": "user", "content": "Count from 1 to 4."}]))
    engine.model.set_adapter("q")
    expected = engine.generate_ids([prompt], stop_token_ids=(), max_new_tokens=8)[0]
    dec = service.scheduler.decoder
    with torch.inference_mode():
        tokens = [int(torch.argmax(dec.prefill(0, prompt, "q")))]
        while len(tokens) < 8:
            tokens.append(int(torch.argmax(dec.step({0: tokens[-1]})[0])))
    dec.release(0)
    assert tokens == expected
    engine.unload()


def test_api_flags_config_key_and_their_errors(tmp_path):
    from tunelab.commands.api import load_api_config, split_options

    opts, rest = split_options(["--lora", "zh=saves/zh", "--lora=math=saves/math", "--max-batch", "4", "--no-cuda-graphs",
                                "model_name_or_path=m", "--template", "qwen"], {})
    assert opts.lora == {"zh": "saves/zh", "math": "saves/math"} and opts.max_batch == 4 and not opts.cuda_graphs
    assert rest == ["model_name_or_path=m", "--template", "qwen"]
    assert opts.max_prefill_tokens is None  # the scheduler's default
    opts2, rest2 = split_options(["--max-prefill-tokens=0", "--no-cuda-graphs=false", "cfg.yaml"], {})
    assert (opts2.max_prefill_tokens, opts2.cuda_graphs, rest2) == (0, True, ["cfg.yaml"])  # =false keeps the graphs
    assert split_options(["--max_prefill_tokens", "4096", "--no-cuda-graphs=yes"], {})[0].max_prefill_tokens == 4096
    assert not split_options(["--no-cuda-graphs=yes"], {})[0].cuda_graphs
    cfg_file = tmp_path / "serve.yaml"
    cfg_file.write_text("model_name_or_path: some/model\ntemplate: qwen\nlora_modules:\n  - zh=saves/other\n  - code=saves/code\n")
    cfg = load_api_config([str(cfg_file)], opts)
    assert cfg.model_name_or_path == "some/model"
    assert opts.lora == {"zh": "saves/zh", "math": "saves/math", "code": "saves/code"}  # --lora wins over the file
    cfg_file.write_text("model_name_or_path: some/model\nlora_modules: {a: saves/a}\n")
    assert load_api_config([str(cfg_file)], split_options([], {})[0]).model_name_or_path == "some/model"
    cases = [
        (lambda: split_options(["--port", "http"], {}), "--port 'http' is not valid: expected an integer."),
        (lambda: split_options([], {"API_PORT": "x"}), "API_PORT 'x' is not valid: expected an integer."),
        (lambda: split_options(["--port", "70000"], {}), "--port 70000 is out of range."),
        (lambda: split_options(["--lora", "justapath"], {}), "--lora 'justapath' is not NAME=PATH (e.g. --lora zh=saves/qwen-zh)."),
        (lambda: split_options(["--lora", "a=x", "--lora", "a=y"], {}), "--lora a is given twice."),
        (lambda: split_options(["--host"], {}), "--host needs a value."),
        (lambda: split_options(["--max-prefill-tokens", "-1"], {}), "--max-prefill-tokens -1 is out of range."),
        (lambda: split_options(["--max-prefill-tokens", "lots"], {}), "--max-prefill-tokens 'lots' is not valid: expected an integer."),
    ]
    for call, message in cases:
        with pytest.raises(ConfigError) as err:
            call()
        assert str(err.value) == message
    cfg_file.write_text("model_name_or_path: m\nlora_modules: saves/a\n")
    with pytest.raises(ConfigError, match="lora_modules must be a list of NAME=PATH strings or a mapping"):
        load_api_config([str(cfg_file)], split_options([], {})[0])
    with pytest.raises(ConfigError, match="lora_rnak"):
        load_api_config(["model_name_or_path=m", "lora_rnak=8"], split_options([], {})[0])


def test_api_help_lists_the_flags(capsys):
    from tunelab.cli import main

    assert main(["api", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--lora NAME=PATH" in out and "API_KEY" in out and "max_new_tokens" in out and "--max-prefill-tokens N" in out
