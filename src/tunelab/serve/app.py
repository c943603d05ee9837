"""The HTTP layer of `tunelab api` (FastAPI): routes, the API key, the request size cap, errors in OpenAI's shape.

    GET  /health                 {"status": "ok" | "draining", "running", "waiting", "slots", ...}   (no key needed)
    GET  /v1/models              the base model and every adapter, as model ids
    POST /v1/chat/completions    chat (plain / server-sent events), tools -> tool_calls
    POST /v1/completions         raw prompts

Routes never touch the model: they parse and validate the body, hand it to serving.Service, and carry the answer.
Every failure is an APIError answered as {"error": {"message", "type", "param", "code"}} with a 4xx status for
anything the client sent (malformed JSON, a wrong type, a missing field, an unknown model ...); an unexpected
exception is a 500 with a sentence, and never stops the server. (FastAPI is imported at module level: its route
signatures are resolved from this module's names; only `tunelab api` imports this module.) The API key (API_KEY / --api-key) is compared with
hmac.compare_digest (constant time).
"""
from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunelab.serve import protocol as P

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024


def create_app(service: Any, *, api_key: str | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
    app = FastAPI(title="tunelab api", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    def error_response(exc: P.APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(P.APIError)
    async def _api_error(request: Request, exc: P.APIError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = {404: f"no route {request.url.path}", 405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error_response(P.APIError(exc.status_code, message + ".", code="not_found" if exc.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error on %s", request.url.path)
        return error_response(P.APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error"))

    app.add_middleware(_Guard, api_key=api_key, max_request_bytes=max_request_bytes)

    async def read_body(request: Request, schema: type) -> Any:
        body = b""
        async for chunk in request.stream():  # counted as it arrives: chunked uploads are capped too
            body += chunk
            if len(body) > max_request_bytes:
                raise P.APIError(413, f"The request body is larger than this server's limit of {max_request_bytes} bytes.", code="request_too_large")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise P.APIError(400, f"The request body is not valid JSON: {exc}.", code="invalid_json") from None
        if not isinstance(data, dict):
            raise P.APIError(400, f"The request body must be a JSON object, got {type(data).__name__}.", code="invalid_json")
        return validate(schema, data)

    @app.get("/health")
    async def health():
        stats = service.scheduler.stats()
        return {"status": "draining" if service.scheduler.draining else "ok", **stats}

    @app.get("/v1/models")
    async def models():
        return service.model_list()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        for card in service.model_list()["data"]:
            if card["id"] == model_id:
                return card
        raise P.APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")

    async def generate(request: Request, prep):
        job = service.submit(prep)
        if prep.stream:
            return StreamingResponse(service.stream(prep, job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(await service.complete(prep, job, request.is_disconnected))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await read_body(request, P.ChatCompletionRequest)
        return await generate(request, await run_in_threadpool(service.prepare_chat, req))

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await read_body(request, P.CompletionRequest)
        return await generate(request, await run_in_threadpool(service.prepare_completion, req))

    return app


class _Guard:
    """Pure ASGI (streams and disconnects pass untouched): the API key on /v1/*, and a declared body size cap."""

    def __init__(self, app: Any, *, api_key: str | None, max_request_bytes: int) -> None:
        self.app, self.api_key, self.max_bytes = app, api_key, max_request_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            error = None
            if self.api_key and scope["path"].startswith("/v1/"):
                given = headers.get("authorization", "")
                token = given[7:] if given[:7].lower() == "bearer " else ""
                if not hmac.compare_digest(token.encode("utf-8"), self.api_key.encode("utf-8")):
                    error = P.APIError(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key")
            length = headers.get("content-length")
            if error is None and length is not None and (not length.isdigit() or int(length) > self.max_bytes):
                error = P.APIError(413, f"The request body is larger than this server's limit of {self.max_bytes} bytes.", code="request_too_large")
            if error is not None:
                body = json.dumps(error.body()).encode("utf-8")
                await send({"type": "http.response.start", "status": error.status,
                            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def validate(schema: type, data: dict[str, Any]) -> Any:
    """The pydantic model of a request body, or a 400 naming the first bad field and what was wrong."""
    from pydantic import ValidationError

    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        # The deepest location is the most specific (for a union such as content: str | [parts], the part's field);
        # pydantic's union-member tags ('str', 'list[TextPart]') are not field names and are left out.
        err = max(exc.errors(), key=lambda e: len(e.get("loc", ())))
        where = ".".join(str(p) for p in err.get("loc", ()) if not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS)))
        if err.get("type") == "extra_forbidden":
            message = f"Unknown field '{where}'."
        elif err.get("type") == "missing":
            message = f"Missing required field '{where}'."
        else:
            message = f"Invalid value for '{where}': {err.get('msg')} (got {json.dumps(err.get('input'), default=str)[:100]})."
        raise P.APIError(400, message, param=where or None, code="invalid_value") from None


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}
