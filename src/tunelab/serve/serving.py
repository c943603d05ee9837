"""Serving logic between the wire format (protocol.py) and the scheduler: requests -> prompt ids and sampling
settings (validated against the model: known model id, context length, token limits), token streams -> OpenAI
responses and server-sent-event chunks (incremental detokenization, stop strings, Qwen tool calls).

The model ids: the base model's id (`served_model_name`, default the model path's last part), the adapter of
`adapter_name_or_path` if set, and every `--lora name=path`. A request's `model` picks one; the scheduler runs it
with that adapter in the shared batch.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable

from tunelab.errors import TunelabError
from tunelab.infer.engine import IncrementalDecoder
from tunelab.infer.sampling import SamplingParams
from tunelab.serve import protocol as P
from tunelab.serve.scheduler import Job, QueueFull, ShuttingDown
from tunelab.serve.tools import ToolCallParser, parse_all

MAX_STOP_STRINGS = 4


@dataclasses.dataclass
class Prepared:
    """A validated request, ready for the scheduler."""

    kind: str  # "chat" | "completion"
    model: str
    prompt: list[int]
    adapter: str | None
    params: SamplingParams
    max_tokens: int
    stops: list[str]
    stream: bool
    include_usage: bool
    tools: bool


class Service:
    def __init__(self, engine: Any, scheduler: Any, *, models: dict[str, str | None], context: int) -> None:
        self.engine = engine
        self.scheduler = scheduler
        self.models = models  # model id -> adapter name (None: the base)
        self.context = context
        self.created = int(time.time())
        self.stop_ids = list(engine.template.stop_token_ids)
        # Requests are encoded in worker threads; a fast tokenizer's settings are mutable state ("Already
        # borrowed" under concurrent calls), so encoding is one at a time (it takes about a millisecond).
        self._encode_lock = threading.Lock()

    # ----- models ---------------------------------------------------------------------------------------------
    def model_list(self) -> dict[str, Any]:
        base = next(m for m, a in self.models.items() if a is None)
        cards = [P.ModelCard(id=m, created=self.created, root=base, parent=None if a is None else base) for m, a in self.models.items()]
        return P.ModelList(data=cards).model_dump()

    def _adapter(self, model: str) -> str | None:
        if model not in self.models:
            raise P.APIError(404, f"The model '{model}' does not exist; served models: {', '.join(self.models)}.", param="model", code="model_not_found")
        return self.models[model]

    # ----- requests -> prompts ----------------------------------------------------------------------------------
    def prepare_chat(self, req: P.ChatCompletionRequest) -> Prepared:
        from tunelab.data.conversation import Conversation

        adapter = self._adapter(req.model)
        _unsupported_common(req)
        if req.top_logprobs:
            raise P.APIError(400, "top_logprobs is not supported.", param="top_logprobs")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise P.APIError(400, "response_format other than text is not supported (no constrained decoding).", param="response_format")
        if not req.messages:
            raise P.APIError(400, "messages is empty: give at least one user message.", param="messages")
        tools = bool(req.tools) and req.tool_choice != "none"
        if req.tool_choice not in (None, "none", "auto"):
            raise P.APIError(400, "tool_choice can be 'auto' or 'none': forcing a tool call needs constrained decoding, which tunelab does not do.", param="tool_choice")
        system, messages = _conversation_messages(req.messages)
        conv = Conversation(messages=messages, system=system, tools=[t.model_dump(exclude_none=True) for t in req.tools] if tools else None)
        try:
            with self._encode_lock:
                prompt = self.engine.encode(conv)
        except TunelabError as exc:
            raise P.APIError(400, str(exc), param="messages") from None
        except Exception as exc:  # the chat template (Jinja) refused these messages / tools
            raise P.APIError(400, f"The chat template could not render these messages: {type(exc).__name__}: {str(exc)[:200]}.", param="messages") from None
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        return self._prepared("chat", req, prompt, adapter, limit, param, tools)

    def prepare_completion(self, req: P.CompletionRequest) -> Prepared:
        adapter = self._adapter(req.model)
        _unsupported_common(req)
        if req.echo:
            raise P.APIError(400, "echo is not supported.", param="echo")
        if req.suffix:
            raise P.APIError(400, "suffix is not supported.", param="suffix")
        if req.best_of not in (None, 1):
            raise P.APIError(400, "best_of must be 1.", param="best_of")
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(x, str) for x in prompt):
            if len(prompt) != 1:
                raise P.APIError(400, f"prompt holds {len(prompt)} prompts; send one per request.", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            with self._encode_lock:
                ids = self.engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            vocab = len(self.engine.tokenizer)
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise P.APIError(400, f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1}).", param="prompt")
            ids = list(prompt)
        limit = 16 if req.max_tokens is None else req.max_tokens  # OpenAI's default for completions
        return self._prepared("completion", req, ids, adapter, limit, "max_tokens", False)

    def _prepared(self, kind, req, prompt, adapter, limit, param, tools) -> Prepared:
        if not prompt:
            raise P.APIError(400, "the prompt is empty (0 tokens).", param="prompt" if kind == "completion" else "messages")
        room = self.context - len(prompt)
        if room < 1:
            raise P.APIError(400, f"the prompt is {len(prompt)} tokens long; this server's context is {self.context} tokens.",
                             param="prompt" if kind == "completion" else "messages", code="context_length_exceeded")
        if limit is None:
            limit = min(self.engine.settings.max_new_tokens, room)
        if limit < 1:
            raise P.APIError(400, f"{param} must be at least 1, got {limit}.", param=param)
        if limit > room:
            raise P.APIError(400, f"{param}={limit} does not fit: the prompt is {len(prompt)} tokens and the context {self.context} "
                             f"(at most {room} new tokens).", param=param, code="context_length_exceeded")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise P.APIError(400, f"stop takes up to {MAX_STOP_STRINGS} non-empty strings.", param="stop")
        if req.min_tokens > limit:
            raise P.APIError(400, f"min_tokens={req.min_tokens} exceeds {param}={limit}.", param="min_tokens")
        return Prepared(kind, req.model, list(prompt), adapter, self._sampling(req), limit, stops, req.stream,
                        bool(req.stream_options and req.stream_options.include_usage), tools)

    def _sampling(self, req) -> SamplingParams:
        """The request's settings over the server's generation defaults; temperature 0 is greedy."""
        s = self.engine.settings
        temperature = s.temperature if req.temperature is None else req.temperature
        do_sample = s.do_sample if req.temperature is None else req.temperature > 0
        return SamplingParams(
            do_sample=do_sample and temperature > 0,
            temperature=temperature,
            top_p=s.top_p if req.top_p is None else req.top_p,
            top_k=(s.top_k if req.top_p is None else 0) if req.top_k is None else req.top_k,
            repetition_penalty=s.repetition_penalty if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            min_tokens=req.min_tokens,
            seed=req.seed,
        )

    # ----- running ----------------------------------------------------------------------------------------------
    def submit(self, prep: Prepared) -> Job:
        job = Job(prep.prompt, prep.adapter, prep.params, prep.max_tokens)
        job.bind()
        try:
            self.scheduler.submit(job)
        except QueueFull as exc:
            raise P.APIError(429, f"The server is busy: {exc}.", code="queue_full", headers={"Retry-After": str(exc.retry_after)}) from None
        except ShuttingDown as exc:
            raise P.APIError(503, f"{exc}.", code="shutting_down") from None
        return job

    async def _texts(self, job: Job, prep: Prepared) -> AsyncIterator[str]:
        """Text pieces of the answer (stop strings applied: the text ends before the first one, the job stops)."""
        decoder = IncrementalDecoder(self.engine.tokenizer, self.stop_ids)
        held = ""
        longest = max((len(s) for s in prep.stops), default=0)
        consumed = 0
        try:
            while toks := await job.next_tokens():  # every token that arrived since the last turn: one piece for all
                if not prep.stops:
                    consumed += len(toks)
                    held += decoder.add(toks)
                    if held:
                        yield held
                        held = ""
                    continue
                for tok in toks:  # with stop strings token by token, so the cut (and usage) is at the exact token
                    consumed += 1
                    held += decoder.add([tok])
                    cut = _first_stop(held, prep.stops)
                    if cut is not None:
                        job.cancel()
                        job.finish_reason, job.stop_at = "stop", consumed
                        if held[:cut]:
                            yield held[:cut]
                        return
                safe = len(held) - (longest - 1)
                if safe > 0:
                    yield held[:safe]
                    held = held[safe:]
            held += decoder.flush()
            cut = _first_stop(held, prep.stops) if prep.stops else None
            if cut is not None:
                held, job.finish_reason, job.stop_at = held[:cut], "stop", consumed
            if held:
                yield held
        finally:
            job.cancel()  # a no-op when finished; frees the slot when the client went away

    def _finish(self, job: Job, calls: int) -> str:
        if job.error is not None:
            raise P.APIError(500, f"generation failed: {job.error}", code="generation_error")
        if calls:
            return "tool_calls"
        return "length" if job.finish_reason == "length" else "stop"

    def _usage(self, job: Job) -> P.Usage:
        n = len(job.output) - (1 if job.output and job.output[-1] in self.stop_ids else 0)
        if job.stop_at is not None:  # a stop string: the tokens through the one that completed it (the scheduler
            n = min(n, job.stop_at)  # may have decoded a few more before it saw the cancel)
        return P.Usage(prompt_tokens=len(job.prompt), completion_tokens=n, total_tokens=len(job.prompt) + n)

    async def complete(self, prep: Prepared, job: Job, disconnected: Callable[[], Awaitable[bool]]) -> dict[str, Any]:
        """A whole (non-streamed) answer; stops generating if the client goes away while waiting."""
        pieces: list[str] = []

        async def collect() -> None:
            async for piece in self._texts(job, prep):
                pieces.append(piece)

        task = asyncio.ensure_future(collect())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.5)
                if not task.done() and await disconnected():
                    job.cancel()
            task.result()
        finally:
            job.cancel()
            if not task.done():
                task.cancel()
        text = "".join(pieces)
        rid = _id(prep.kind)
        if prep.kind == "completion":
            choice = P.CompletionChoice(text=text, finish_reason=self._finish(job, 0))
            return P.Completion(id=rid, model=prep.model, choices=[choice], usage=self._usage(job)).model_dump()
        content, calls = parse_all(text) if prep.tools else (text, [])
        message = P.ResponseMessage(content=content or (None if calls else ""), tool_calls=[_tool_call(c) for c in calls] or None)
        choice = P.ChatChoice(message=message, finish_reason=self._finish(job, len(calls)))
        return P.ChatCompletion(id=rid, model=prep.model, choices=[choice], usage=self._usage(job)).model_dump(exclude_none=True)

    async def stream(self, prep: Prepared, job: Job) -> AsyncIterator[str]:
        """Server-sent events: chunks, an optional usage chunk, then `data: [DONE]`."""
        rid = _id(prep.kind)
        if prep.kind == "completion":
            async for piece in self._texts(job, prep):
                yield _sse(P.Completion(id=rid, model=prep.model, choices=[P.CompletionChoice(text=piece)]).model_dump(exclude_none=True))
            last = P.Completion(id=rid, model=prep.model, choices=[P.CompletionChoice(text="", finish_reason=self._finish_or_error(job, 0))])
            yield _sse(last.model_dump(exclude_none=True))
        else:
            def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
                c = P.ChatCompletionChunk(id=rid, model=prep.model, choices=[P.ChunkChoice(delta=delta, finish_reason=finish)])
                return _sse(c.model_dump(exclude_none=True))

            yield chunk({"role": "assistant", "content": ""})
            parser = ToolCallParser() if prep.tools else None
            calls = 0
            async for piece in self._texts(job, prep):
                for kind, value in (parser.feed(piece) if parser else [("content", piece)]):
                    if kind == "content":
                        yield chunk({"content": value})
                    else:
                        yield chunk({"tool_calls": [dict(_tool_call(value), index=calls)]})
                        calls += 1
            for kind, value in (parser.finish() if parser else []):
                if kind == "content":
                    yield chunk({"content": value})
            yield chunk({}, self._finish_or_error(job, calls))
        if prep.include_usage:
            usage = P.ChatCompletionChunk if prep.kind == "chat" else P.Completion
            body = usage(id=rid, model=prep.model, choices=[], usage=self._usage(job)).model_dump(exclude_none=True)
            yield _sse(body)
        yield "data: [DONE]\n\n"

    def _finish_or_error(self, job: Job, calls: int) -> str:
        """In a stream an error can only be reported in-band: finish_reason 'error' (the headers are sent)."""
        return "error" if job.error is not None else self._finish(job, calls)


# ------------------------------------------------------------------------------------------------- helpers
def _unsupported_common(req) -> None:
    if req.n != 1:
        raise P.APIError(400, f"n={req.n} is not supported: one choice per request (n=1).", param="n")
    if req.logprobs:
        raise P.APIError(400, "logprobs are not supported.", param="logprobs")


def _conversation_messages(messages: list[P.ChatMessage]) -> tuple[str | None, list[dict[str, Any]]]:
    """Leading system/developer messages -> the system prompt; the rest -> the Conversation's messages."""
    systems: list[str] = []
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if m.role in ("system", "developer"):
            if out:
                raise P.APIError(400, f"messages[{i}] is a {m.role} message after the conversation started; put system messages first.", param=f"messages.{i}.role")
            systems.append(m.text())
            continue
        msg: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.tool_calls:
            if m.role != "assistant":
                raise P.APIError(400, f"messages[{i}] has tool_calls but role '{m.role}' (only assistant messages call tools).", param=f"messages.{i}.tool_calls")
            msg["tool_calls"] = [{"name": c.function.name, "arguments": _json_or_text(c.function.arguments)} for c in m.tool_calls]
        elif m.content is None and m.role != "assistant":
            raise P.APIError(400, f"messages[{i}] ({m.role}) has no content.", param=f"messages.{i}.content")
        out.append(msg)
    if not out:
        raise P.APIError(400, "messages holds only system messages: add a user message.", param="messages")
    return ("\n\n".join(systems) if systems else None), out


def _json_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except (json.JSONDecodeError, ValueError):
        return arguments


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _tool_call(call: dict[str, Any]) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}


def _id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
