"""`tunelab api` end to end: a real server process (uvicorn on 127.0.0.1, a free port) on the tiny Qwen2 model with
two LoRA adapters, driven by the official `openai` client (and raw httpx for malformed requests).

One server for the whole module. Answers are checked against the in-process engine with plain `generate` (the
'hf' backend), so the server's batched, slot-decoded answers must equal transformers' own greedy output.
The `tools` adapter (tests/test_serve_data/tool_adapter, made by tools/make_tool_adapter.py with `tunelab train`
on this tiny model) answers weather questions with a Qwen tool call.
"""
from __future__ import annotations

import asyncio
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

from helpers_infer import TOOL_ADAPTER, lora_run, plain_engine  # noqa: F401 (fixture)

from tunelab.data.conversation import Conversation

KEY = "test-key-123"
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
QUESTIONS = ["Hello!", "Count from 1 to 5.", "What is the capital of France? Please answer in one short sentence."]
MAX_TOKENS = 24
CONTEXT = 512


# ------------------------------------------------------------------------------------------------ the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], log_path: pathlib.Path, env_extra: dict[str, str] | None = None, timeout: float = 240.0):
    """`tunelab api ARGS --port P` in a subprocess; returns (process, base URL) once /health answers."""
    import httpx

    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="2", **(env_extra or {}))
    src = str(pathlib.Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "api", *args, "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"the server did not start in {timeout} s:\n{log_path.read_text()[-3000:]}")


def stop_server(proc) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


@pytest.fixture(scope="module")
def server(lora_run, tmp_path_factory):
    model, run = lora_run
    log = tmp_path_factory.mktemp("serve") / "server.log"
    proc, url = start_server(
        ["--model_name_or_path", model, "--template", "qwen", "--do_sample", "false", "--max_new_tokens", str(MAX_TOKENS),
         "--lora", f"a={run}", "--lora", f"tools={TOOL_ADAPTER}", "--max-model-len", str(CONTEXT),
         "--max-request-bytes", "65536"],
        log, env_extra={"API_KEY": KEY},
    )
    yield {"proc": proc, "url": url, "port": int(url.rsplit(":", 1)[1]), "log": log, "model": model}
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(lora_run):
    """The in-process engine with plain generate: base + adapter 'default' (= a) + 'tools'."""
    engine = plain_engine(lora_run, template="qwen", max_new_tokens=MAX_TOKENS)
    engine.add_adapter("tools", TOOL_ADAPTER)

    def answer_ids(which: str, conv: Conversation) -> list[int]:
        if which == "base":
            with engine.adapter_disabled():
                return engine.generate_ids([engine.encode(conv)])[0]
        engine.model.set_adapter("default" if which == "a" else which)
        return engine.generate_ids([engine.encode(conv)])[0]

    engine.answer_ids = answer_ids
    engine.answer = lambda which, conv: engine.decode(answer_ids(which, conv))
    yield engine
    engine.unload()


def _user(text: str, tools=None) -> Conversation:
    return Conversation(messages=[{"role": "user", "content": text}], tools=tools)


def _chat(client, model: str, text: str, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], temperature=0, **kw)


def _streamed(client, model: str, text: str, **kw) -> tuple[str, list, str, object]:
    """(content, tool-call deltas merged, finish_reason, usage) of a streamed chat answer."""
    stream = _chat(client, model, text, stream=True, stream_options={"include_usage": True}, **kw)
    content, calls, finish, usage = [], {}, None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                content.append(choice.delta.content)
            for call in choice.delta.tool_calls or []:
                slot = calls.setdefault(call.index, {"name": "", "arguments": "", "id": None})
                slot["id"] = call.id or slot["id"]
                slot["name"] += call.function.name or ""
                slot["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return "".join(content), [calls[i] for i in sorted(calls)], finish, usage


# ------------------------------------------------------------------------------------------------ tests
def test_default_bind_address_and_environment(server):
    from tunelab.commands.api import split_options

    opts, rest = split_options([], {})
    assert (opts.host, opts.port, opts.api_key) == ("127.0.0.1", 8000, None)
    opts, rest = split_options(["cfg.yaml", "--port", "9001"], {"API_HOST": "0.0.0.0", "API_PORT": "9000", "API_KEY": "k"})
    assert (opts.host, opts.port, opts.api_key, rest) == ("0.0.0.0", 9001, "k", ["cfg.yaml"])
    # the running server (started without --host) listens on the loopback address only
    listening = set()
    for line in pathlib.Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A":  # LISTEN
            addr, port = local.split(":")
            listening.add((addr, int(port, 16)))
    assert ("0100007F", server["port"]) in listening
    assert not any(p == server["port"] and a != "0100007F" for a, p in listening)


def test_models_list(client, server):
    ids = [m.id for m in client.models.list().data]
    assert ids == [os.path.basename(server["model"]), "a", "tools"]
    assert client.models.retrieve("a").id == "a"


@pytest.mark.parametrize("which", ["base", "a"])
def test_chat_equals_plain_generate_and_stream_equals_non_stream(client, server, reference, which):
    model = os.path.basename(server["model"]) if which == "base" else which
    for q in QUESTIONS:
        ids = reference.answer_ids(which, _user(q))
        expected = reference.decode(ids)
        r = _chat(client, model, q)
        assert r.choices[0].message.content == expected
        assert r.choices[0].message.tool_calls is None
        prompt = len(reference.encode(_user(q)))
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt, len(ids), prompt + len(ids))
        assert r.choices[0].finish_reason == ("length" if len(ids) == MAX_TOKENS else "stop")
        content, calls, finish, usage = _streamed(client, model, q)
        assert (content, calls, finish) == (expected, [], r.choices[0].finish_reason)
        assert usage.completion_tokens == r.usage.completion_tokens


def test_two_adapters_give_their_own_answers(client, server, reference):
    base = os.path.basename(server["model"])
    answers = {m: _chat(client, m, QUESTIONS[1]).choices[0].message.content for m in (base, "a", "tools")}
    assert answers["a"] == reference.answer("a", _user(QUESTIONS[1]))
    assert answers["tools"] == reference.answer("tools", _user(QUESTIONS[1]))
    assert answers[base] == reference.answer("base", _user(QUESTIONS[1]))
    assert len(set(answers.values())) == 3


def test_tool_calls_plain_and_streamed(client, reference):
    from tunelab.serve.tools import parse_all

    q = "What is the weather in Paris?"
    raw = reference.answer("tools", _user(q, tools=[WEATHER_TOOL]))
    assert raw == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'  # what the adapter learned
    r = _chat(client, "tools", q, tools=[WEATHER_TOOL])
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert msg.content is None
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == [("function", "get_weather", {"city": "Paris"})]
    assert msg.tool_calls[0].id.startswith("call_")
    content, calls, finish, _ = _streamed(client, "tools", q, tools=[WEATHER_TOOL])
    assert (content, finish) == ("", "tool_calls")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert parse_all(raw)[1] == [{"name": c["name"], "arguments": c["arguments"]} for c in calls]
    # tool_choice none: no tools in the prompt and no parsing; the text is the adapter's plain answer
    r = _chat(client, "tools", q, tools=[WEATHER_TOOL], tool_choice="none")
    assert r.choices[0].message.content == reference.answer("tools", _user(q)) and r.choices[0].message.tool_calls is None
    # a tool result turn goes back into the prompt (the template's tool role)
    messages = [{"role": "user", "content": q},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"}]
    r = client.chat.completions.create(model="tools", messages=messages, tools=[WEATHER_TOOL], temperature=0)
    conv = Conversation(messages=[{"role": "user", "content": q},
                                  {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]},
                                  {"role": "tool", "content": "Sunny, 21 C"}], tools=[WEATHER_TOOL])
    assert r.usage.prompt_tokens == len(reference.encode(conv))


def test_completions_plain_and_streamed(client, server, reference):
    base = os.path.basename(server["model"])
    prompt = "The quick brown fox"
    ids = reference.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with reference.adapter_disabled():
        expected = reference.decode(reference.generate_ids([ids], max_new_tokens=12)[0])
    r = client.completions.create(model=base, prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == expected
    assert r.usage.prompt_tokens == len(ids)
    pieces = [c.choices[0].text for c in client.completions.create(model=base, prompt=prompt, max_tokens=12, temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == expected
    assert client.completions.create(model=base, prompt=ids, max_tokens=12, temperature=0).choices[0].text == expected


def test_stop_strings_and_seeded_sampling(client, server, reference):
    full = _chat(client, "a", QUESTIONS[0]).choices[0].message.content
    assert len(full) > 6
    stop = full[3:6]
    r = _chat(client, "a", QUESTIONS[0], stop=[stop])
    assert r.choices[0].message.content == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = _streamed(client, "a", QUESTIONS[0], stop=stop)
    assert streamed[0] == full[: full.index(stop)]
    # usage counts the tokens through the one that completed the stop string, whatever the scheduler decoded after
    ids = reference.answer_ids("a", _user(QUESTIONS[0]))
    through = next(k for k in range(1, len(ids) + 1) if stop in reference.decode(ids[:k]))
    assert r.usage.completion_tokens == streamed[3].completion_tokens == through < len(ids)
    base = os.path.basename(server["model"])  # the random base model: a flat distribution, so seeds differ visibly
    sampled = [client.chat.completions.create(model=base, messages=[{"role": "user", "content": "Hi"}], temperature=1.0, top_p=1.0,
                                              seed=s, max_tokens=16).choices[0].message.content for s in (7, 7, 8)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]


def test_32_concurrent_streams_each_equal_to_its_solo_answer(client, server):
    from openai import AsyncOpenAI

    import httpx

    base = os.path.basename(server["model"])
    models = [base, "a", "tools"]
    jobs = [(models[i % 3], f"Count from 1 to {3 + i % 7}, item {i}.") for i in range(32)]
    solo = [_chat(client, m, q).choices[0].message.content for m, q in jobs]
    steps_before = httpx.get(server["url"] + "/health").json()["steps"]

    async def run_all():
        aclient = AsyncOpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=300)

        async def one(m, q):
            stream = await aclient.chat.completions.create(model=m, messages=[{"role": "user", "content": q}], temperature=0, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        try:
            return await asyncio.gather(*(one(m, q) for m, q in jobs))
        finally:
            await aclient.close()

    together = asyncio.run(run_all())
    assert together == solo
    health = httpx.get(server["url"] + "/health").json()
    assert health["peak_running"] >= 16  # they were decoded together, not one after another
    assert health["peak_prefill"] >= 2 and health["prefills"] < health["steps"]  # waiting prompts were prefilled together
    assert health["steps"] - steps_before < 32 * MAX_TOKENS / 4
    assert (health["running"], health["waiting"]) == (0, 0)


def test_disconnect_mid_stream_frees_the_slot(server):
    import httpx

    body = {"model": "a", "messages": [{"role": "user", "content": "Talk forever."}], "max_tokens": 480, "min_tokens": 480, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    before = httpx.get(server["url"] + "/health").json()["steps"]
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", server["url"] + "/v1/chat/completions", json=body, headers=headers) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert got[0].startswith("data: ")
            assert httpx.get(server["url"] + "/health").json()["running"] == 1
    deadline = time.monotonic() + 10
    while httpx.get(server["url"] + "/health").json()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    health = httpx.get(server["url"] + "/health").json()
    assert health["running"] == 0
    assert health["steps"] - before < 470  # the request was stopped, not run to its 480 tokens


BAD_REQUESTS = [
    # (what, body or raw bytes, status, param, code)
    ("malformed JSON", b'{"model": "a", "messages": [', 400, None, "invalid_json"),
    ("body not an object", b"[1, 2]", 400, None, "invalid_json"),
    ("missing messages", {"model": "a"}, 400, "messages", "invalid_value"),
    ("wrong type", {"model": "a", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature", "invalid_value"),
    ("temperature out of range", {"model": "a", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, 400, "temperature", "invalid_value"),
    ("empty messages", {"model": "a", "messages": []}, 400, "messages", None),
    ("unknown role", {"model": "a", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role", "invalid_value"),
    ("only a system message", {"model": "a", "messages": [{"role": "system", "content": "x"}]}, 400, "messages", None),
    ("ends with the assistant", {"model": "a", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, 400, "messages", None),
    ("image content", {"model": "a", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages.0.content.0.type", "invalid_value"),
    ("prompt longer than the context", {"model": "a", "messages": [{"role": "user", "content": "word " * 600}]}, 400, "messages", "context_length_exceeded"),
    ("max_tokens 0", {"model": "a", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens", None),
    ("max_tokens past the context", {"model": "a", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}, 400, "max_tokens", "context_length_exceeded"),
    ("max_completion_tokens negative", {"model": "a", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -5}, 400, "max_completion_tokens", None),
    ("unknown model", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, 404, "model", "model_not_found"),
    ("n > 1", {"model": "a", "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n", None),
    ("unknown field", {"model": "a", "messages": [{"role": "user", "content": "x"}], "max_token": 5}, 400, "max_token", "invalid_value"),
    ("penalty out of range", {"model": "a", "messages": [{"role": "user", "content": "x"}], "presence_penalty": 5}, 400, "presence_penalty", "invalid_value"),
    ("forced tool choice", {"model": "a", "messages": [{"role": "user", "content": "x"}], "tools": [WEATHER_TOOL], "tool_choice": "required"}, 400, "tool_choice", None),
    ("logprobs", {"model": "a", "messages": [{"role": "user", "content": "x"}], "logprobs": True}, 400, "logprobs", None),
    ("five stop strings", {"model": "a", "messages": [{"role": "user", "content": "x"}], "stop": list("abcde")}, 400, "stop", None),
    ("body over the size cap", {"model": "a", "messages": [{"role": "user", "content": "x" * 70000}]}, 413, None, "request_too_large"),
]


def test_every_bad_request_is_a_4xx_and_the_server_keeps_serving(server, client):
    import httpx

    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = server["url"] + "/v1/chat/completions"
    for what, body, status, param, code in BAD_REQUESTS:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(url, content=data, headers=headers, timeout=30)
        assert r.status_code == status, (what, r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, what
        assert err["message"].endswith(".") and len(err["message"]) > 10, (what, err)
        assert (err["param"], err["code"]) == (param, code), (what, err)
    completions = server["url"] + "/v1/completions"
    for body, param in [({"model": "a", "prompt": ["x", "y"]}, "prompt"), ({"model": "a", "prompt": [999999999]}, "prompt"),
                        ({"model": "a", "prompt": "x", "echo": True}, "echo"), ({"model": "a", "prompt": ""}, "prompt")]:
        r = httpx.post(completions, json=body, headers=headers, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    assert httpx.get(url, headers=headers).status_code == 405
    assert httpx.get(server["url"] + "/v1/nothing", headers=headers).status_code == 404
    assert server["proc"].poll() is None
    assert _chat(client, "a", "Hi").choices[0].message.content  # still serving
    assert httpx.get(server["url"] + "/health").json()["status"] == "ok"


def test_api_key_is_enforced(server):
    import httpx
    from openai import AuthenticationError, OpenAI

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0).models.list()
    r = httpx.get(server["url"] + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server["url"] + "/v1/models", headers={"Authorization": KEY}).status_code == 401  # no Bearer
    assert httpx.get(server["url"] + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(server["url"] + "/health").status_code == 200  # health checks need no key
