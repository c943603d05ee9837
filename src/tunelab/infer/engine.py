"""The one inference engine: base model + adapters + chat template -> generated text. Chat, eval, the API server
and the web UI all use it.

    from tunelab.config import load_config
    from tunelab.data.conversation import Conversation
    from tunelab.infer import Engine

    engine = Engine.from_config(load_config(["model_name_or_path=Qwen/Qwen2.5-0.5B-Instruct", "quantization_bit=4"]))
    conv = Conversation(messages=[{"role": "user", "content": "Hello!"}])
    engine.generate([conv], do_sample=False, max_new_tokens=64)     # -> ["Hello! How can I help you today?"]
    for piece in engine.stream(conv):                                 # text pieces as they are generated
        print(piece, end="", flush=True)

Boundary: the engine turns conversations into token ids with the template layer, runs a decode backend, and turns
ids back into text. It knows nothing about terminals, files or HTTP; callers (tunelab.commands.chat, eval, serve)
do that. Evaluation that needs log-likelihoods uses `engine.model` / `engine.tokenizer` / `engine.template`.

Why it is built this way:
- Batches are sorted by prompt length and cut into groups of `max_batch_size`, then left-padded: similar lengths
  waste little padding, and left padding keeps every prompt's last token at the same position for decoding.
- Generation stops on the template's stop tokens (the turn end marker, eos, template extras), so a model never runs
  on into a made-up next turn; greedy decoding (do_sample false) is deterministic.
- The decode loop is a replaceable backend (`DECODE_BACKENDS`, chosen by `decode_backend`). 'hf' calls
  `model.generate` with the dynamic KV cache. Batch-1 decode of a 7B model is overhead-bound in plain generate
  (see docs/chat_export.md), so 'static' decodes step-wise over a static KV cache with one CUDA graph per step,
  around the torch.compile'd decoder layer (tunelab.infer.decoder; compiled at the first call, ~20 s for a 7B;
  the API server batches continuously on the same decoder); 'auto' is static on CUDA and hf elsewhere. Greedy
  output is the same token for token on the CPU (tested); on CUDA the graph path was tested before the compiled
  layer and the grouped LoRA products came, whose GPU test is written but not yet run (docs/serve.md).
- Streaming runs the backend in a worker thread that feeds token ids to a queue; the caller's thread decodes them
  incrementally (holding back a piece that ends inside a multi-byte character), so the pieces joined equal the
  text `generate` returns. Closing the iterator (or Ctrl-C in the caller) stops the worker at the next token.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

from tunelab.config.parse import Config
from tunelab.data.conversation import Conversation
from tunelab.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class GenerationSettings:
    """How to decode. `stop_token_ids=None` means the template's stop tokens; `()` never stops early."""

    do_sample: bool = False
    temperature: float = 0.95
    top_p: float = 0.7
    top_k: int = 50
    num_beams: int = 1
    max_new_tokens: int = 1024
    max_length: int | None = None
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    min_new_tokens: int = 0
    stop_token_ids: tuple[int, ...] | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> "GenerationSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: getattr(cfg, k) for k in names if k not in ("min_new_tokens", "stop_token_ids")})

    def updated(self, **changes: Any) -> "GenerationSettings":
        """A copy with some settings changed; an unknown name is a ConfigError (a typo must not pass silently)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(f"unknown generation setting '{unknown[0]}'; known: {', '.join(sorted(names))}.")
        if changes.get("stop_token_ids") is not None:
            changes["stop_token_ids"] = tuple(changes["stop_token_ids"])
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------- decode backends
class DecodeBackend(Protocol):
    """Runs the decode loop: left-padded prompts in, new token ids out ([batch, new], pad after a stop token).

    `streamer` (optional) has put(ids) / end() like transformers' streamers (the first put is the prompt);
    `should_stop` (optional) is polled once per step, and the loop ends when it returns True.
    """

    name: str

    def __call__(
        self,
        model: Any,
        input_ids: Any,
        attention_mask: Any,
        settings: GenerationSettings,
        *,
        stop_token_ids: Sequence[int],
        pad_token_id: int,
        streamer: Any = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Any: ...


class HFDecodeBackend:
    """`model.generate` with the dynamic KV cache, configured from scratch (the model's own generation_config
    sampling defaults do not leak in: what the user set is what runs)."""

    name = "hf"

    def __call__(self, model, input_ids, attention_mask, settings, *, stop_token_ids, pad_token_id, streamer=None, should_stop=None):
        from transformers import GenerationConfig

        max_new = settings.max_new_tokens
        if max_new <= 0 and settings.max_length is not None:  # LLaMA-Factory: max_length counts only without max_new_tokens
            max_new = max(1, settings.max_length - input_ids.shape[1])
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max_new,
            do_sample=settings.do_sample,
            num_beams=settings.num_beams,
            repetition_penalty=settings.repetition_penalty,
            pad_token_id=pad_token_id,
            eos_token_id=list(stop_token_ids) or None,
            use_cache=True,
        )
        if settings.min_new_tokens:
            kwargs["min_new_tokens"] = settings.min_new_tokens
        if settings.do_sample:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
        if settings.num_beams > 1:
            kwargs["length_penalty"] = settings.length_penalty
        criteria = _stopping_criteria(should_stop) if should_stop is not None else None
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=GenerationConfig(**kwargs),
            streamer=streamer,
            stopping_criteria=criteria,
        )
        return out[:, input_ids.shape[1] :]


def _stopping_criteria(flag: Callable[[], bool]):
    """A StoppingCriteriaList that ends generation (every row) once `flag()` is true."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopWhen(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), bool(flag()), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopWhen()])


class StaticDecodeBackend:
    """Step-wise decoding over a static KV cache (tunelab.infer.decoder.SlotDecoder): the prompts of a batch
    prefilled together into their own cache rows (one packed forward, `prefill_many`; one prompt: the plain
    one-prompt prefill), then one token per row per step; on CUDA each step is a replayed CUDA graph. Greedy output
    equals 'hf' token for token (tested). Beam search is not step-wise here: num_beams > 1 runs 'hf'.

    The decoder (its cache and graphs) is kept between calls and rebuilt larger when a call needs more rows or
    positions: lengths are rounded up to a power of two (at least 256) so a chat does not rebuild every turn."""

    name = "static"

    def __init__(self) -> None:
        self.decoder: Any = None

    def __call__(self, model, input_ids, attention_mask, settings, *, stop_token_ids, pad_token_id, streamer=None, should_stop=None):
        import torch

        from tunelab.infer.sampling import RowState, SamplingParams, choose_all, choose_batch

        if settings.num_beams > 1:
            return HFDecodeBackend()(model, input_ids, attention_mask, settings, stop_token_ids=stop_token_ids,
                                     pad_token_id=pad_token_id, streamer=streamer, should_stop=should_stop)
        prompts = [row[m.bool()].tolist() for row, m in zip(input_ids.cpu(), attention_mask.cpu())]
        max_new = settings.max_new_tokens
        if settings.max_length is not None:
            max_new = max(1, min(max_new, settings.max_length - input_ids.shape[1]))
        ahead = _ahead_steps(model.get_input_embeddings().weight.device)
        dec = self._decoder(model, len(prompts), max(len(p) for p in prompts) + max_new, pad_token_id, ahead=ahead > 1)
        params = SamplingParams(
            do_sample=settings.do_sample, temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
            repetition_penalty=settings.repetition_penalty, min_tokens=settings.min_new_tokens,
        )
        adapter = _active_adapter(model)
        rows = {i: RowState(params, prompt=p) for i, p in enumerate(prompts)}
        # TUNELAB_DECODE_AHEAD=k (greedy only; 8 by default on CUDA): k steps per host sync, the picks on the device (step_ahead)
        use_ahead = ahead > 1 and dec.ahead and params.plain_greedy
        if streamer is not None:
            streamer.put(input_ids.cpu())
        stops = set(stop_token_ids)
        try:
            first = dec.prefill_many([(i, p, adapter) for i, p in enumerate(prompts)])  # a batch: one packed forward
            todo = [choose_all(first, rows, list(stop_token_ids))]  # picked tokens per step, not yet taken
            while todo:
                picked = {i: t for i, t in todo.pop(0).items() if i in dec.lengths}  # rows that ended mid-way: done
                for i, tok in picked.items():
                    rows[i].output.append(tok)
                    if tok in stops or len(rows[i].output) >= max_new:
                        dec.release(i)
                if streamer is not None and picked:
                    streamer.put(torch.tensor([picked[i] for i in sorted(picked)]))
                if should_stop is not None and should_stop():
                    break
                if todo:
                    continue
                if not dec.lengths:
                    break
                live = {i: rows[i].output[-1] for i in dec.lengths}
                if use_ahead:
                    k = min(ahead, max(max_new - len(rows[i].output) for i in live), dec.max_len - max(dec.lengths.values()))
                    slots, seqs = dec.step_ahead(live, k, counts={i: len(rows[i].output) for i in live},
                                                 min_tokens={i: params.min_tokens for i in live}, stop_ids=list(stop_token_ids))
                    todo = [{s: seq[j] for s, seq in zip(slots, seqs)} for j in range(k)]
                else:
                    slots, logits = dec.step_batch(live)
                    todo = [choose_batch(slots, logits, rows, list(stop_token_ids))]
        finally:
            for i in list(dec.lengths):
                dec.release(i)
            if streamer is not None:
                streamer.end()
        width = max(len(r.output) for r in rows.values())
        out = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
        for i, r in rows.items():
            out[i, : len(r.output)] = torch.tensor(r.output, dtype=torch.long)
        return out

    def _decoder(self, model, rows: int, length: int, pad_token_id: int, ahead: bool = False):
        from tunelab.infer.decoder import MIN_LEN_BUCKET, SlotDecoder

        max_len = MIN_LEN_BUCKET
        while max_len < length:
            max_len *= 2
        dec = self.decoder
        if dec is not None and dec.model is model and dec.max_slots >= rows and dec.max_len >= length and dec.ahead == ahead:
            return dec
        if dec is not None and dec.model is model:
            rows, max_len = max(rows, dec.max_slots), max(max_len, dec.max_len)
        self.decoder = None
        del dec
        gc.collect()
        names = list(getattr(model, "peft_config", {}) or {})
        dec = SlotDecoder(model, max_slots=rows, max_len=max_len, adapters=names, pad_token_id=pad_token_id, ahead=ahead)
        dec.warmup()
        self.decoder = dec
        return dec


AHEAD_DEFAULT = 8  # greedy steps per host sync on CUDA when TUNELAB_DECODE_AHEAD is unset (docs/serve.md)


def _ahead_steps(device=None) -> int:
    """TUNELAB_DECODE_AHEAD: greedy decode steps per host sync in the static backend. Unset or 'auto': 8 on CUDA
    (measured on the H200: +1-3% single-stream tokens/s, the same tokens), one step elsewhere; 0 or 1: one step."""
    value = os.environ.get("TUNELAB_DECODE_AHEAD", "auto").strip().lower() or "auto"
    if value == "auto":
        return AHEAD_DEFAULT if str(getattr(device, "type", device)).startswith("cuda") else 0
    try:
        steps = int(value)
    except ValueError:
        raise ConfigError(f"TUNELAB_DECODE_AHEAD must be a whole number of steps or 'auto' (got {value!r}).") from None
    from tunelab.infer.decoder import AHEAD_MAX

    if not 0 <= steps <= AHEAD_MAX:
        raise ConfigError(f"TUNELAB_DECODE_AHEAD must be between 0 and {AHEAD_MAX} (got {steps}).")
    return steps


def _active_adapter(model) -> str | None:
    """The PEFT adapter a forward would apply now (None: no adapter, or inside `disable_adapter()`)."""
    if not hasattr(model, "peft_config"):
        return None
    from peft.tuners.lora import LoraLayer

    layer = next((m for m in model.modules() if isinstance(m, LoraLayer)), None)
    if layer is None or layer.disable_adapters:
        return None
    active = model.active_adapter
    return active if isinstance(active, str) else active[0]


def _auto_backend() -> DecodeBackend:
    """'auto': the static-cache backend on CUDA, plain generate elsewhere (decided at the first call)."""
    return _AutoBackend()


class _AutoBackend:
    name = "auto"

    def __init__(self) -> None:
        self.inner: Any = None

    def __call__(self, model, *args, **kwargs):
        if self.inner is None:
            device = model.get_input_embeddings().weight.device
            self.inner = StaticDecodeBackend() if device.type == "cuda" else HFDecodeBackend()
            self.name = f"auto ({self.inner.name})"
        return self.inner(model, *args, **kwargs)


DECODE_BACKENDS: dict[str, Callable[[], DecodeBackend]] = {"hf": HFDecodeBackend, "static": StaticDecodeBackend, "auto": _auto_backend}


def register_decode_backend(name: str, factory: Callable[[], DecodeBackend]) -> None:
    """Make a decode backend available as `decode_backend: <name>` (a static-cache / CUDA-graph loop, say)."""
    DECODE_BACKENDS[name] = factory


# ------------------------------------------------------------------------------------------------- chat history
@dataclass
class ChatSession:
    """Multi-turn history for interactive chat: the messages so far, and the prompt for the next user turn."""

    system: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)

    def conversation(self, user_text: str) -> Conversation:
        """The conversation to answer: the history plus a new user message (not stored until `add`)."""
        return Conversation(messages=[*self.messages, {"role": "user", "content": user_text}], system=self.system)

    def add(self, user_text: str, reply: str) -> None:
        self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": reply}]

    def clear(self) -> None:
        self.messages = []


# ------------------------------------------------------------------------------------------------- the engine
class Engine:
    """A loaded model ready to answer conversations. Attributes: model, tokenizer, template, device, settings."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        template: Any,
        *,
        settings: GenerationSettings | None = None,
        system: str | None = None,
        decode_backend: str = "hf",
        max_batch_size: int = 8,
        adapters: Sequence[str] = (),
    ) -> None:
        if decode_backend not in DECODE_BACKENDS:
            raise ConfigError(f"decode_backend '{decode_backend}' is not available; choose one of {', '.join(DECODE_BACKENDS)}.")
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.settings = settings or GenerationSettings()
        self.system = system
        self.backend = DECODE_BACKENDS[decode_backend]()
        self.max_batch_size = max(1, max_batch_size)
        self.adapters = list(adapters)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # ----- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Config, *, resolved: Any = None, max_batch_size: int = 8) -> "Engine":
        """Load tokenizer, template, base model (4/8/16-bit) and adapters as the config says, for inference."""
        from tunelab.config.resolve import resolve
        from tunelab.data.template import get_template, template_mismatch_warning
        from tunelab.model.adapters import training_settings
        from tunelab.model.loader import attach_lora, load_base_model
        from tunelab.model.tokenizer import load_tokenizer

        if not cfg.model_name_or_path:
            raise ConfigError("model_name_or_path is not set: give a local model folder or a hub id (e.g. Qwen/Qwen2.5-7B-Instruct).")
        resolved = resolved or resolve(cfg)
        adapters = resolve_adapters(cfg)
        trained = training_settings(adapters[-1]) if adapters else None
        template_name = cfg.template
        if "template" not in cfg.given and trained and trained["config"].get("template"):
            template_name = trained["config"]["template"]  # chat the way the adapter was trained
            logger.info("template: %s (from the adapter's training config)", template_name)
        tokenizer = load_tokenizer(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code, cache_dir=cfg.cache_dir, revision=cfg.model_revision)
        template = get_template(template_name, tokenizer, enable_thinking=cfg.enable_thinking)
        mismatch = template_mismatch_warning(template, tokenizer)
        if mismatch:
            logger.warning(mismatch)
        dtype = inference_dtype(cfg, resolved.device)
        model = load_base_model(cfg, resolved, dtype=dtype)
        if adapters:
            model = attach_lora(model, cfg.replace(adapter_name_or_path=",".join(adapters)), resolved, is_trainable=False)
        model.eval()
        what = f"{cfg.model_name_or_path}" + (f" + {', '.join(adapters)}" if adapters else "")
        bits = f"{cfg.quantization_bit}-bit" if cfg.quantization_bit else dtype
        logger.info("model: %s (%s on %s), template %s", what, bits, resolved.device, template.name)
        return cls(
            model,
            tokenizer,
            template,
            settings=GenerationSettings.from_config(cfg),
            system=cfg.system if cfg.system is not None else cfg.default_system,
            decode_backend=cfg.decode_backend,
            max_batch_size=max_batch_size,
            adapters=adapters,
        )

    def add_adapter(self, name: str, path: str) -> None:
        """Load one more LoRA adapter under `name` beside those loaded (the API server's model ids). The base
        weights are shared; `tunelab.infer.adapters.AdapterRouter` picks an adapter per batch row."""
        from peft import PeftModel

        from tunelab.model.adapters import adapter_dir

        folder = adapter_dir(path)
        try:
            if hasattr(self.model, "load_adapter") and hasattr(self.model, "peft_config"):
                if name in self.model.peft_config:
                    raise ModelError(f"an adapter named '{name}' is already loaded.")
                self.model.load_adapter(folder, adapter_name=name, is_trainable=False)
            else:
                self.model = PeftModel.from_pretrained(self.model, folder, adapter_name=name, is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ModelError(f"adapter '{folder}' does not fit this base model: {str(exc).splitlines()[0][:300]}") from None
        self.model.eval()
        self.adapters.append(folder)

    @property
    def device(self):
        """Where inputs go (the input embedding's device; with a device map, the first shard)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def has_adapter(self) -> bool:
        return bool(self.adapters) and hasattr(self.model, "disable_adapter")

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator["Engine"]:
        """Answer with the base model inside this block (PEFT's disable_adapter: no second copy of the weights)."""
        if not self.has_adapter:
            raise ModelError("no adapter is loaded, so there is no fine-tuned model to compare with the base: set adapter_name_or_path.")
        with self.model.disable_adapter():
            yield self

    # ----- encoding -------------------------------------------------------------------------------------------
    def encode(self, conv: Conversation) -> list[int]:
        """Prompt ids for a conversation (the engine's system prompt fills in when the conversation has none)."""
        if conv.system is None and self.system is not None:
            conv = dataclasses.replace(conv, system=self.system)
        return self.template.encode_prompt(conv)

    def render(self, conv: Conversation) -> str:
        """The prompt text (what `encode` tokenizes), for showing users exactly what the model sees."""
        if conv.system is None and self.system is not None:
            conv = dataclasses.replace(conv, system=self.system)
        return self.template.render_prompt(conv)

    def _settings(self, gen: dict[str, Any]) -> tuple[GenerationSettings, tuple[int, ...]]:
        settings = self.settings.updated(**gen) if gen else self.settings
        stops = settings.stop_token_ids if settings.stop_token_ids is not None else tuple(self.template.stop_token_ids)
        return settings, stops

    def _batch(self, prompts: Sequence[Sequence[int]]):
        """Left-padded input_ids and attention_mask on the model's device."""
        import torch

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            if p:
                ids[row, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
                mask[row, width - len(p) :] = 1
        return ids.to(self.device), mask.to(self.device)

    # ----- generation -----------------------------------------------------------------------------------------
    def generate(self, convs: Sequence[Conversation], **gen: Any) -> list[str]:
        """Answers for conversations, in order. `gen` overrides GenerationSettings fields for this call."""
        ids = self.generate_ids([self.encode(c) for c in convs], **gen)
        return [self.decode(x) for x in ids]

    def generate_ids(self, prompts: Sequence[Sequence[int]], **gen: Any) -> list[list[int]]:
        """New token ids for prompt ids (stop token and padding removed), in order; batched by similar length."""
        import torch

        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ModelError("cannot generate from an empty prompt (0 tokens).")
        settings, stops = self._settings(gen)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[list[int]] = [[] for _ in prompts]
        for start in range(0, len(order), self.max_batch_size):
            group = order[start : start + self.max_batch_size]
            input_ids, mask = self._batch([prompts[i] for i in group])
            with torch.inference_mode():
                new = self.backend(self.model, input_ids, mask, settings, stop_token_ids=stops, pad_token_id=self.pad_token_id)
            for row, i in enumerate(group):
                results[i] = _cut_at_stop(new[row].tolist(), stops)
        return results

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def stream(self, conv: Conversation, **gen: Any) -> Iterator[str]:
        """Text pieces of the answer as they are generated (joined, they equal `generate([conv])[0]`)."""
        return self.stream_ids(self.encode(conv), **gen)

    def stream_ids(self, prompt: Sequence[int], **gen: Any) -> Iterator[str]:
        settings, stops = self._settings(gen)
        if settings.num_beams > 1:
            raise ConfigError("streaming needs num_beams: 1 (beam search only knows its answer at the end).")
        input_ids, mask = self._batch([prompt])
        return self._stream(input_ids, mask, settings, stops)

    def _stream(self, input_ids, mask, settings, stops) -> Iterator[str]:
        import torch

        pieces: queue.Queue = queue.Queue()
        stop = threading.Event()
        done = object()

        def work() -> None:
            try:
                with torch.inference_mode():
                    self.backend(
                        self.model, input_ids, mask, settings, stop_token_ids=stops, pad_token_id=self.pad_token_id,
                        streamer=_QueueStreamer(pieces), should_stop=stop.is_set,
                    )
            except BaseException as exc:  # handed to the caller's thread
                pieces.put(exc)
            finally:
                pieces.put(done)

        worker = threading.Thread(target=work, name="tunelab-decode", daemon=True)
        worker.start()
        decoder = IncrementalDecoder(self.tokenizer, stops)
        try:
            while True:
                try:
                    item = pieces.get(timeout=0.05)  # a timeout keeps the caller's thread responsive to Ctrl-C
                except queue.Empty:
                    continue
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                text = decoder.add(item)
                if text:
                    yield text
            tail = decoder.flush()
            if tail:
                yield tail
        finally:
            stop.set()
            worker.join()

    # ----- clean-up -------------------------------------------------------------------------------------------
    def unload(self) -> None:
        """Free the model's memory (the engine cannot generate afterwards)."""
        import torch

        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------- helpers
def resolve_adapters(cfg: Config) -> list[str]:
    """Local adapter folders from adapter_name_or_path (comma list); `checkpoint` picks within the last one's run."""
    from tunelab.model.adapters import adapter_dir

    names = [a.strip() for a in (cfg.adapter_name_or_path or "").split(",") if a.strip()]
    out = [adapter_dir(name, cfg.checkpoint if i == len(names) - 1 else None) for i, name in enumerate(names)]
    if cfg.checkpoint and not names:
        raise ConfigError(f"checkpoint={cfg.checkpoint!r} needs adapter_name_or_path (the run folder to pick from).")
    return out


def inference_dtype(cfg: Config, device: str) -> str:
    """infer_dtype, or for auto: bf16 on GPUs that support it, fp16 on other GPUs, float32 on the CPU."""
    if cfg.infer_dtype != "auto":
        return cfg.infer_dtype
    if device == "cuda":
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device == "npu":
        return "bfloat16"
    if device == "mps":
        return "float16"
    return "float32"


def _cut_at_stop(ids: list[int], stops: Sequence[int]) -> list[int]:
    stop_set = set(stops)
    for k, t in enumerate(ids):
        if t in stop_set:
            return ids[:k]
    return ids


class _QueueStreamer:
    """transformers streamer protocol: the first put() is the prompt (skipped), then one step's tokens per put()."""

    def __init__(self, q: queue.Queue) -> None:
        self.q = q
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.q.put(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


class IncrementalDecoder:
    """Token ids in, new text out, holding back text that ends in an incomplete character (U+FFFD) until the next
    token completes it. With a fast tokenizer whose decode is its Rust decode alone (no clean-up of spaces), the
    text comes from tokenizers' `DecodeStream` (a few tokens of context per step, ~1 us a token, instead of
    decoding the whole answer again at every token, ~50 us); `flush` then checks it against one decode of the
    whole answer and emits what that adds (held-back bytes). Other tokenizers decode everything so far and emit
    what was not emitted yet."""

    def __init__(self, tokenizer: Any, stops: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.stops = set(stops)
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False
        self._raw, self._stream = _decode_stream(tokenizer)

    def add(self, ids: list[int]) -> str:
        new: list[int] = []
        for t in ids:
            if self.stopped:
                break
            if t in self.stops:
                self.stopped = True
            else:
                new.append(t)
        self.ids.extend(new)
        if self._stream is not None:
            try:
                piece = "".join(self._stream.step(self._raw, t) or "" for t in new)
            except Exception as exc:  # an id the stream cannot place: decode the whole answer from here on
                logger.debug("incremental decoding fell back to whole decodes: %s", exc)
                self._stream = None
            else:
                self.emitted += piece
                return piece
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        return self._take(text)

    def flush(self) -> str:
        return self._take(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _take(self, text: str) -> str:
        if not text.startswith(self.emitted):  # decoding changed earlier text (rare): emit nothing twice
            return ""
        new, self.emitted = text[len(self.emitted) :], text
        return new


def _decode_stream(tokenizer: Any) -> tuple[Any, Any]:
    """(the Rust tokenizer, a DecodeStream) when the tokenizer's decode is exactly the Rust decode, else (None, None)."""
    raw = getattr(tokenizer, "backend_tokenizer", None)
    if raw is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None, None
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:  # tokenizers < 0.21
        return None, None
    return raw, DecodeStream(skip_special_tokens=True)
