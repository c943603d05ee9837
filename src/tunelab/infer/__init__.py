"""Inference: one engine (model + adapters + template -> text, batched or streamed) used by chat, eval, the API
server and the web UI. Importing this package is light; torch and transformers load when an engine is built."""
from tunelab.infer.engine import ChatSession, DecodeBackend, Engine, GenerationSettings, register_decode_backend

__all__ = ["ChatSession", "DecodeBackend", "Engine", "GenerationSettings", "register_decode_backend"]
