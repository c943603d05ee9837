"""Putting `tunelab api` together: engine + named adapters -> slot decoder -> scheduler -> service -> uvicorn.

    service = build_service(cfg, loras={"zh": "saves/zh", "math": "saves/math"}, max_slots=32, max_len=4096)
    serve(service, host="127.0.0.1", port=8000, api_key=None)

QLoRA adapters are served on the 4-bit base they were trained on: when the config does not set quantization_bit,
the adapters' saved training configs (tunelab_config.yaml) decide, and adapters trained on different bases are a
ConfigError. SIGTERM (or Ctrl-C): the scheduler stops admitting (new requests get 503, uvicorn stops accepting
connections), running and queued requests finish within the grace period, then the process exits.
"""
from __future__ import annotations

import logging
import os
import signal
from typing import Any

from tunelab.errors import ConfigError

logger = logging.getLogger(__name__)


def _trained(paths: list[str]) -> list[dict[str, Any]]:
    from tunelab.model.adapters import adapter_dir, training_settings

    out = []
    for p in paths:
        got = training_settings(adapter_dir(p))
        if got:
            out.append(got["config"])
    return out


def _as_trained(cfg: Any, paths: list[str]) -> Any:
    """quantization_bit (and template) from the adapters' training configs when the config leaves them unset."""
    trained = _trained(paths)
    changes: dict[str, Any] = {}
    for key in ("quantization_bit", "template"):
        if key in cfg.given:
            continue
        values = {t.get(key) for t in trained if key in t}
        if len(values) > 1:
            raise ConfigError(f"the adapters were trained with different {key} values ({', '.join(map(str, sorted(values, key=str)))}): "
                              f"set {key} to choose what to serve them on.")
        if values and (value := values.pop()) is not None and value != getattr(cfg, key):
            changes[key] = value
    if changes:
        logger.info("serving as the adapters were trained: %s", ", ".join(f"{k}={v}" for k, v in changes.items()))
        cfg = cfg.replace(**changes)
    return cfg


def base_model_id(cfg: Any) -> str:
    name = cfg.model_name_or_path.rstrip("/\\")
    return os.path.basename(name) if os.path.isdir(name) else name


def build_service(cfg: Any, *, loras: dict[str, str], max_slots: int = 32, max_len: int | None = None, max_queue: int = 64,
                  served_model_name: str | None = None, use_graphs: bool | None = None, max_prefill_tokens: int | None = None):
    from tunelab.infer import Engine
    from tunelab.infer.decoder import SlotDecoder
    from tunelab.serve.scheduler import Scheduler
    from tunelab.serve.serving import Service

    first = [a.strip() for a in (cfg.adapter_name_or_path or "").split(",") if a.strip()]
    cfg = _as_trained(cfg, first + list(loras.values()))
    engine = Engine.from_config(cfg, max_batch_size=max_slots)
    models: dict[str, str | None] = {served_model_name or base_model_id(cfg): None}
    if engine.adapters:
        models[os.path.basename(engine.adapters[-1].rstrip("/\\"))] = "default"
    for name, path in loras.items():
        if name in models:
            raise ConfigError(f"model id '{name}' is given twice (--lora names must differ from each other and from the base).")
        engine.add_adapter(name, path)
        models[name] = name
    limit = getattr(engine.model.config, "max_position_embeddings", None) or 4096
    context = min(limit, max_len or 4096)
    adapters = [a for a in models.values() if a is not None]
    decoder = SlotDecoder(engine.model, max_slots=max_slots, max_len=context, adapters=adapters, use_graphs=use_graphs,
                          pad_token_id=engine.pad_token_id)
    decoder.warmup([engine.pad_token_id] * 2)
    if max_prefill_tokens is None:
        from tunelab.serve.scheduler import DEFAULT_MAX_PREFILL_TOKENS as max_prefill_tokens
    scheduler = Scheduler(decoder, engine.template.stop_token_ids, max_queue=max_queue, max_prefill_tokens=max_prefill_tokens)
    step = "eager decode steps"
    if decoder.graphs:
        layers = "compiled decoder layers" if decoder.compiled is not None else f"eager decoder layers ({decoder.compile_error or 'TUNELAB_COMPILE_DECODE=0'})"
        step = f"{len(decoder.graphs)} CUDA graphs of the {layers}, built in {decoder.warmup_seconds:.0f} s"
    prefill = f"prefill up to {max_prefill_tokens} tokens per forward" if max_prefill_tokens else "one prompt per prefill forward"
    logger.info("serving %s: %d slots x %d positions, queue %d, %s, %s", ", ".join(models), max_slots, context, max_queue, prefill, step)
    return Service(engine, scheduler, models=models, context=context)


def serve(service: Any, *, host: str, port: int, api_key: str | None, grace: float = 30.0,
          max_request_bytes: int | None = None, log_level: str = "info") -> None:
    import uvicorn

    from tunelab.serve.app import DEFAULT_MAX_REQUEST_BYTES, create_app

    app = create_app(service, api_key=api_key, max_request_bytes=max_request_bytes or DEFAULT_MAX_REQUEST_BYTES)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace,
                            access_log=False, lifespan="off")

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM / SIGINT: refuse new work first, then uvicorn's drain
            service.scheduler.drain()
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:  # a finished drain is a clean exit (status 0), not death by the signal
                self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    service.scheduler.start()
    try:
        Server(config).run()
    finally:
        service.scheduler.stop()
