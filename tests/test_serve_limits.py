"""`tunelab api` under pressure: one KV-cache slot and a queue of one, so the limits are reached with three requests.
The queue-full answer (429 + Retry-After), a disconnect freeing the only slot, and SIGTERM draining a running
request before the process exits. A real server process on the tiny model, the base model only, no API key.
"""
from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from test_serve_api import start_server, stop_server

LONG = 400  # tokens a "long" request is made to generate (min_tokens = max_tokens): seconds on a CPU


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tunelab.model.tiny import build_tiny_model

    model = build_tiny_model(str(tmp_path_factory.getbasetemp() / "tunelab_tiny_runs" / "tiny-qwen2"))  # helpers_infer's
    log = tmp_path_factory.mktemp("serve_limits") / "server.log"
    proc, url = start_server(["--model_name_or_path", model, "--template", "qwen", "--do_sample", "false", "--max-batch", "1",
                              "--max-queue", "1", "--max-model-len", "512", "--grace-period", "60"], log)
    yield {"proc": proc, "url": url, "log": log, "model": model.rstrip("/").rsplit("/", 1)[-1]}
    stop_server(proc)


def _body(model: str, n: int, stream: bool = True) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Go on."}], "max_tokens": n, "min_tokens": n, "stream": stream}


class Stream:
    """A streaming request read in a background thread; `close()` hangs up mid-stream."""

    def __init__(self, url: str, body: dict) -> None:
        self.client = httpx.Client(timeout=120)
        self.resp = self.client.send(self.client.build_request("POST", url + "/v1/chat/completions", json=body), stream=True)
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for line in self.resp.iter_lines():
                self.lines.append(line)
        except httpx.HTTPError:
            pass

    def wait_for(self, n_events: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while sum(1 for x in self.lines if x.startswith("data: ")) < n_events:
            assert time.monotonic() < deadline, f"only {len(self.lines)} lines in {timeout} s"
            time.sleep(0.02)

    def close(self) -> None:
        self.resp.close()
        self.client.close()


def _health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=10).json()


def _wait_idle(url: str, timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = _health(url)
        if h["running"] == 0 and h["waiting"] == 0:
            return h
        time.sleep(0.05)
    raise AssertionError(f"still busy after {timeout} s: {_health(url)}")


def test_queue_full_is_429_with_retry_after_and_disconnect_frees_the_slot(server):
    url, model = server["url"], server["model"]
    first = Stream(url, _body(model, LONG))
    first.wait_for(3)  # running in the only slot
    second = Stream(url, _body(model, LONG))  # waits in the queue of one
    deadline = time.monotonic() + 30
    while _health(url)["waiting"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    r = httpx.post(url + "/v1/chat/completions", json=_body(model, 4, stream=False), timeout=30)
    assert r.status_code == 429
    assert int(r.headers["Retry-After"]) >= 1
    err = r.json()["error"]
    assert (err["type"], err["code"]) == ("rate_limit_error", "queue_full") and "busy" in err["message"]
    from openai import OpenAI, RateLimitError

    with pytest.raises(RateLimitError):
        OpenAI(base_url=url + "/v1", api_key="none", max_retries=0).chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
    first.close()  # hang up: the slot goes to the queued request at once
    second.wait_for(3, timeout=30)
    assert _health(url)["running"] == 1
    second.close()
    h = _wait_idle(url)
    assert h["steps"] < 2 * LONG - 50  # neither request ran to its end
    r = httpx.post(url + "/v1/chat/completions", json=_body(model, 4, stream=False), timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_sigterm_finishes_the_running_request_then_exits(server):
    url, model, proc = server["url"], server["model"], server["proc"]
    n = 300
    stream = Stream(url, _body(model, n))
    stream.wait_for(2)
    proc.send_signal(signal.SIGTERM)
    sent_at = sum(1 for x in stream.lines if x.startswith("data: "))
    assert sent_at < n // 2  # the signal came while the request was running
    stream.thread.join(120)
    events = [x[6:] for x in stream.lines if x.startswith("data: ")]
    assert events[-1] == "[DONE]"
    import json

    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")) >= n - 5
    assert proc.wait(60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=5)
    assert "Shutting down" in server["log"].read_text()
