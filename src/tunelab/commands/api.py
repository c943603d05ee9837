"""`tunelab api`: serve a base model and its fine-tuned adapters over an OpenAI-compatible HTTP API.

    tunelab api cfg.yaml                                             # the config's model (+ adapter), 127.0.0.1:8000
    tunelab api --model_name_or_path Qwen/Qwen2.5-7B-Instruct --lora zh=saves/zh --lora math=saves/math
    API_KEY=secret API_PORT=9000 tunelab api cfg.yaml --host 0.0.0.0  # a key is then required of every client

Then any OpenAI client: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")`, with `model=` one of the
ids `/v1/models` lists (the base, and each adapter by name). The config's keys are chat's (model, quantization,
generation defaults); a config file may also list adapters as `lora_modules: [name=path, ...]` (or a mapping
name: path). Details, choices and measured speed: docs/serve.md.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from tunelab.commands.flags import take_flags
from tunelab.errors import ConfigError

USAGE = (
    "usage: tunelab api [config.yaml] [key=value ...] [--key value ...]\n"
    "                   [--host H] [--port P] [--api-key K] [--lora NAME=PATH ...] [--max-batch N] [--max-queue N]\n"
    "                   [--max-model-len N] [--served-model-name NAME] [--grace-period S] [--max-request-bytes N]\n"
    "                   [--max-prefill-tokens N] [--no-cuda-graphs]"
)
FLAGS_HELP = """api options:
  --host H              address to bind (default $API_HOST, else 127.0.0.1: only this machine can connect)
  --port P              port (default $API_PORT, else 8000)
  --api-key K           require 'Authorization: Bearer K' on /v1/* (default $API_KEY; unset: no key)
  --lora NAME=PATH      serve an adapter (a run folder or adapter folder) as model id NAME; repeatable
  --max-batch N         requests decoded together (KV-cache slots; default 32)
  --max-queue N         requests waiting for a slot before answering 429 (default 64)
  --max-model-len N     context per request, prompt + answer (default min(model's, 4096))
  --served-model-name   model id of the base model (default the model path's last part, or its hub id)
  --grace-period S      on SIGTERM, seconds to let running requests finish (default 30)
  --max-request-bytes N largest request body accepted (default 4194304)
  --max-prefill-tokens N  waiting prompts prefilled together in one forward, up to N tokens (default 8192;
                        0: one prompt per forward)
  --no-cuda-graphs      decode steps without CUDA graphs (for debugging)
"""
SECTIONS = ("model", "quantization", "generation")
_VALUE_FLAGS = {"host", "port", "api_key", "lora", "max_batch", "max_queue", "max_model_len", "served_model_name",
                "grace_period", "max_request_bytes", "max_prefill_tokens"}
_INT_FLAGS = ("port", "max_batch", "max_queue", "max_model_len", "max_request_bytes", "max_prefill_tokens")
_ZERO_OK = ("max_queue", "max_prefill_tokens")  # 0 is meaningful: no queue; one prompt per prefill forward


@dataclass
class ApiOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    lora: dict[str, str] = field(default_factory=dict)
    max_batch: int = 32
    max_queue: int = 64
    max_model_len: int | None = None
    served_model_name: str | None = None
    grace_period: float = 30.0
    max_request_bytes: int | None = None
    max_prefill_tokens: int | None = None  # None: the scheduler's default (8192)
    cuda_graphs: bool = True


def _lora_pair(text: str, where: str) -> tuple[str, str]:
    name, eq, path = str(text).partition("=")
    if not eq or not name.strip() or not path.strip():
        raise ConfigError(f"{where} {text!r} is not NAME=PATH (e.g. --lora zh=saves/qwen-zh).")
    return name.strip(), path.strip()


def split_options(argv: list[str], env: dict[str, str]) -> tuple[ApiOptions, list[str]]:
    """Take api's own flags out of argv (environment variables fill in host, port and key); the rest is config."""
    opts = ApiOptions(host=env.get("API_HOST") or "127.0.0.1", api_key=env.get("API_KEY") or None)
    raw: dict[str, Any] = {"port": env["API_PORT"]} if env.get("API_PORT") else {}
    taken, rest = take_flags(argv, _VALUE_FLAGS, ("no_cuda_graphs",))
    for key, value in taken:
        if key == "no_cuda_graphs":
            opts.cuda_graphs = not value  # --no-cuda-graphs (or =true/1/yes/on) turns them off; =false keeps them
        elif key == "lora":
            lname, path = _lora_pair(value, "--lora")
            if lname in opts.lora:
                raise ConfigError(f"--lora {lname} is given twice.")
            opts.lora[lname] = path
        else:
            raw[key] = value
    for key, value in raw.items():
        if key in _INT_FLAGS:
            try:
                value = int(value)
            except ValueError:
                src = "API_PORT" if key == "port" and "--port" not in " ".join(argv) else f"--{key.replace('_', '-')}"
                raise ConfigError(f"{src} {value!r} is not valid: expected an integer.") from None
            if value < (0 if key in _ZERO_OK else 1) or (key == "port" and value > 65535):
                raise ConfigError(f"--{key.replace('_', '-')} {value} is out of range.")
        elif key == "grace_period":
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"--grace-period {value!r} is not valid: expected seconds.") from None
        setattr(opts, key, value)
    return opts, rest


def load_api_config(rest: list[str], opts: ApiOptions):
    """The validated config; `lora_modules` in the config file is api's own key (adapters to serve), taken out first."""
    from tunelab.config.parse import FIELDS, _unknown_key_error, build_config, parse_cli_args, read_config_file

    config_file, cli = parse_cli_args(rest)
    values = read_config_file(config_file) if config_file else {}
    listed = values.pop("lora_modules", None) or []
    where = f"{config_file}: lora_modules" if config_file else "lora_modules"
    items = list(listed.items()) if isinstance(listed, dict) else [_lora_pair(x, where) for x in listed] if isinstance(listed, list) else None
    if items is None:
        raise ConfigError(f"{where} must be a list of NAME=PATH strings or a mapping of names to paths.")
    for name, path in items:
        opts.lora.setdefault(str(name), str(path))  # --lora wins over the file
    for key in cli:
        if key not in FIELDS:
            raise _unknown_key_error(key, "the command line")
    values.update(cli)
    return build_config(values, source=config_file or "command line")


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        from tunelab.config.help import format_help

        print(format_help("api", USAGE, SECTIONS) + "\n" + FLAGS_HELP)
        return 0
    from tunelab.utils.logging import setup_logging

    from tunelab.config.parse import parse_cli_args
    from tunelab.model.loader import use_trained_adapter

    opts, rest = split_options(argv, dict(os.environ))
    cfg = load_api_config(rest, opts)  # validated before anything heavy is imported
    cfg = use_trained_adapter(cfg, "api", set(parse_cli_args(rest)[1]))  # a training config: the adapter it wrote, as chat
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ConfigError("tunelab api needs the api extra: pip install 'tunelab[api]'.") from None
    setup_logging()
    from tunelab.serve.server import build_service, serve

    service = build_service(cfg, loras=opts.lora, max_slots=opts.max_batch, max_len=opts.max_model_len, max_queue=opts.max_queue,
                            served_model_name=opts.served_model_name, use_graphs=None if opts.cuda_graphs else False,
                            max_prefill_tokens=opts.max_prefill_tokens)
    serve(service, host=opts.host, port=opts.port, api_key=opts.api_key, grace=opts.grace_period, max_request_bytes=opts.max_request_bytes)
    return 0
