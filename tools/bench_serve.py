"""Decode and serving speed of `tunelab api`'s engine path on a random-init Qwen2.5-7B-architecture model: one JSON
line per case (docs/serve.md holds the table made from them, and the raw lines).

    PYTHONPATH=src python tools/bench_serve.py --workdir /tmp/bench7b --out serve.jsonl          # H200: all cases
    PYTHONPATH=src python tools/bench_serve.py --small --device cpu --streams 4 --new 16         # CPU smoke test

Cases (the issue's speed targets):
- single16 / single4: one stream, a 128-token prompt (random ids), exactly 256 new tokens (stop tokens off), greedy,
  base + a LoRA adapter (rank 16, every linear layer), bf16 and 4-bit NF4 (double quantization, bf16 compute).
  'plain generate' (the engine's hf backend: transformers' generate, dynamic cache), 'tunelab fast, eager layers'
  (the static backend with TUNELAB_COMPILE_DECODE=0: slot decoder, static KV cache, one CUDA graph replay per
  token of the eager layers) and 'tunelab fast' (the default: the same graphs around the compiled decoder layer)
  on the same model object in the same run. One warm-up call of each (plain: 16 tokens; the fast paths build their
  decoder there: capture and compilation, timed apart as decoder_build_s), then plain once and each fast path
  twice; tokens/s = 256 / wall time of the call (prefill and sampling included), the fast figure the better of its
  two calls. Also: the first position where each path's tokens differ from plain generate's (None: all equal),
  and for the fast paths one graph replay alone (replay_ms: median of 50, CUDA events; batch 1, longest bucket)
  and the GPU kernels in it (kernels_per_step: torch.profiler over one replay).
- serve16: 32 concurrent streaming requests through the real HTTP server (FastAPI + uvicorn in this process, the
  scheduler's continuous batching), sent by a client in a separate process (httpx, server-sent events, no shared
  GIL), each a distinct 128-token prompt with 256 new tokens (min_tokens = max_tokens = 256). Aggregate tokens/s =
  all streamed tokens / wall time from the first request sent to the last [DONE]; time to first token per stream
  (p50, p99). Rounds: every request on adapter a ('one adapter'), requests alternating a / b ('two adapters'),
  then 'one adapter' again. Each stream's token count is checked (none lost); after the two-adapter round four of
  its streams (two per adapter) are re-run alone and their texts compared with the batched ones.
  The three rounds run once per server setting of `--serve-settings` (one decoder, built once, shared): the
  prefill token budget (the scheduler's max_prefill_tokens: 8192 = waiting prompts prefilled together in one
  forward, the default; 0 = one prompt per forward, the behaviour before batched prefill) and the interpreter's
  GIL switch interval in ms (sys.setswitchinterval: how long the decode thread may wait for the GIL that the
  event loop's thread holds; Python's default is 5 ms). Default: 8192/5, 0/5, 8192/0.5. Each row also carries
  the round's prefill forwards and the most prompts in one of them (prefills, peak_prefill).

    PYTHONPATH=src python tools/bench_serve.py --workdir /tmp/b7 --out serve.jsonl --phases serve16   # serving only

Needs torch, transformers, peft, bitsandbytes, fastapi, uvicorn, httpx and tunelab (src/) on PYTHONPATH.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_infer import SEVEN_B, SMALL, _free, _sync, build_adapter, build_base  # noqa: E402

PAD = 151643


def log(msg: str) -> None:
    print(f"[bench_serve] {msg}", file=sys.stderr, flush=True)


def emit(row: dict, out: str | None) -> None:
    log(json.dumps(row))
    if out:
        with open(out, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")


def load_engine(base: str, adapter: str, bits: int | None):
    from tunelab.config import load_config
    from tunelab.infer import Engine

    cfg = {"model_name_or_path": base, "adapter_name_or_path": adapter, "template": "qwen", "do_sample": False,
           "decode_backend": "hf", "infer_dtype": "bfloat16"}
    if bits:
        cfg.update(quantization_bit=bits, quantization_type="nf4", double_quantization=True)
    t = time.time()
    engine = Engine.from_config(load_config(cfg), max_batch_size=1)
    log(f"loaded {'NF4' if bits else 'bf16'} + adapter in {time.time() - t:.0f} s")
    return engine


FAST = {"tunelab fast, eager layers": "0", "tunelab fast": "1"}  # TUNELAB_COMPILE_DECODE for each fast variant


def single_stream(engine, label: str, prompt_len: int, new: int, out: str | None) -> None:
    import torch

    from tunelab.infer.engine import HFDecodeBackend, StaticDecodeBackend

    prompt = torch.randint(0, 150000, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    paths = {"plain generate": HFDecodeBackend(), **{name: StaticDecodeBackend() for name in FAST}}
    times: dict[str, list[float]] = {k: [] for k in paths}
    tokens: dict[str, list[int]] = {}
    # rep 0 warms each up (the fast paths build their decoder: graph capture, compilation); then plain once, each
    # fast path twice (plain is the slow one to time)
    for rep, names in enumerate((list(paths), list(paths), list(FAST))):
        for name in names:
            backend = paths[name]
            engine.backend = backend
            os.environ["TUNELAB_COMPILE_DECODE"] = FAST.get(name, "1")
            n = 16 if rep == 0 and name == "plain generate" else new
            _sync()
            t = time.perf_counter()
            ids = engine.generate_ids([prompt], max_new_tokens=n, min_new_tokens=n, stop_token_ids=())[0]
            _sync()
            if rep:
                times[name].append(time.perf_counter() - t)
                tokens[name] = ids
            elif name in FAST:
                log(f"{label} / {name}: decoder built (capture + compile) in {backend.decoder.warmup_seconds:.1f} s")
            assert len(ids) == n, f"{name} produced {len(ids)} tokens"
    os.environ.pop("TUNELAB_COMPILE_DECODE", None)

    def first_diff(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)

    for name in paths:
        best = min(times[name])
        row = {"case": "single", "weights": label, "path": name, "prompt": prompt_len, "new": new, "tokens_per_s": round(new / best, 1),
               "seconds": [round(x, 3) for x in times[name]], "first_difference_vs_plain": first_diff(tokens["plain generate"], tokens[name])}
        if name in FAST:
            dec = paths[name].decoder
            row.update(cuda_graphs=len(dec.graphs), graph_error=dec.graph_error, compiled=dec.compiled is not None,
                       compile_error=dec.compile_error, decoder_build_s=round(dec.warmup_seconds, 1),
                       lora_groups=dec.router.groups if dec.router else None, **step_profile(dec))
            if name != "tunelab fast, eager layers":
                row["first_difference_vs_eager_layers"] = first_diff(tokens["tunelab fast, eager layers"], tokens[name])
        emit(row, out)
    engine.backend = HFDecodeBackend()
    for name in FAST:
        paths[name].decoder = None
    _free()


def step_profile(dec) -> dict:
    """Time of one graph replay (batch 1, the longest length bucket; median of 50, CUDA events) and the number
    of GPU kernels in it (torch.profiler over one replay): what one decode step costs without any Python."""
    import torch

    key = (1, max(w for b, w in dec.graphs if b == 1)) if dec.graphs else None
    if key is None:
        return {}
    graph, _ = dec.graphs[key]
    times = []
    for _ in range(50):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    result = {"replay_ms": round(statistics.median(times), 3), "replay_bucket": list(key)}
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            graph.replay()
            torch.cuda.synchronize()
        result["kernels_per_step"] = sum(1 for e in prof.events() if str(e.device_type).endswith("CUDA"))
    except Exception as exc:  # the profiler is a diagnostic only
        result["kernels_per_step"] = f"{type(exc).__name__}: {exc}"[:120]
    return result


# ------------------------------------------------------------------------------------------------ serving
def start_server(engine, adapter_b: str, streams: int, max_len: int):
    import uvicorn

    from tunelab.infer.decoder import SlotDecoder
    from tunelab.serve.app import create_app
    from tunelab.serve.scheduler import Scheduler
    from tunelab.serve.serving import Service

    engine.add_adapter("b", adapter_b)
    t = time.time()
    decoder = SlotDecoder(engine.model, max_slots=streams, max_len=max_len, adapters=["default", "b"], pad_token_id=PAD)
    decoder.warmup([PAD, PAD])
    startup = {"decoder_build_s": round(time.time() - t, 1), "cuda_graphs": len(decoder.graphs), "graph_error": decoder.graph_error,
               "compiled": decoder.compiled is not None, "compile_error": decoder.compile_error, "lora_groups": decoder.router.groups}
    log(f"decoder ready: {startup}")
    scheduler = Scheduler(decoder, engine.template.stop_token_ids, max_queue=streams)
    service = Service(engine, scheduler, models={"base": None, "a": "default", "b": "b"}, context=max_len)
    scheduler.start()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    import httpx

    for _ in range(200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    return server, thread, scheduler, decoder, f"http://127.0.0.1:{port}", startup


def run_client(url: str, models: list[str], streams: int, prompt_len: int, new: int, seed: int, solo: int = 0) -> dict:
    """The client in its own process (so its SSE parsing shares no GIL with the server)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--client", url, "--models", ",".join(models), "--streams", str(streams),
           "--prompt", str(prompt_len), "--new", str(new), "--seed", str(seed), "--solo", str(solo)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"client failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


async def _client_main(args) -> dict:
    import random

    import httpx

    rng = random.Random(args.seed)
    models = args.models.split(",")
    prompts = [[rng.randrange(0, 150000) for _ in range(args.prompt)] for _ in range(args.streams)]

    async def one(client, i: int) -> dict:
        body = {"model": models[i % len(models)], "prompt": prompts[i], "max_tokens": args.new, "min_tokens": args.new,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        sent = time.perf_counter()
        first, text, usage = None, [], None
        async with client.stream("POST", args.client + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}: {await resp.aread()}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for c in chunk.get("choices", []):
                    if c.get("text"):
                        first = first or time.perf_counter()
                        text.append(c["text"])
        return {"ttft": (first or time.perf_counter()) - sent, "text": "".join(text), "tokens": (usage or {}).get("completion_tokens", 0), "done": time.perf_counter()}

    limits = httpx.Limits(max_connections=args.streams + 4, max_keepalive_connections=args.streams + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(client, i) for i in range(args.streams)))
        wall = max(r["done"] for r in results) - start
        solo_equal, solo_prefix = [], []
        for i in range(args.solo):  # the same requests one at a time afterwards
            alone = await one(client, i)
            solo_equal.append(alone["text"] == results[i]["text"])
            a, b = alone["text"], results[i]["text"]
            solo_prefix.append(next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))))
    ttft = sorted(r["ttft"] for r in results)
    total = sum(r["tokens"] for r in results)
    return {"streams": args.streams, "models": models, "tokens": total, "all_complete": all(r["tokens"] == args.new for r in results),
            "wall_s": round(wall, 2), "aggregate_tokens_per_s": round(total / wall, 1),
            "ttft_p50_s": round(statistics.median(ttft), 3), "ttft_p99_s": round(ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))], 3),
            "solo_equal": f"{sum(solo_equal)}/{len(solo_equal)}" if solo_equal else None,
            "solo_common_prefix_chars": solo_prefix or None, "text_chars": [len(r["text"]) for r in results[: args.solo]] or None}


def parse_settings(text: str) -> list[tuple[int, float]]:
    """'8192/5,0/5' -> [(8192, 5.0), (0, 5.0)]: (max_prefill_tokens, GIL switch interval in ms) per setting."""
    out = []
    for part in text.split(","):
        budget, _, ms = part.partition("/")
        out.append((int(budget), float(ms or 5)))
    return out


def serve_rounds(engine, adapter_b: str, streams: int, prompt_len: int, new: int, out: str | None, label: str,
                 settings: list[tuple[int, float]] = ((8192, 5.0),)) -> None:
    max_len = 1 << (prompt_len + new - 1).bit_length()
    server, thread, scheduler, decoder, url, startup = start_server(engine, adapter_b, streams, max_len)
    interval = sys.getswitchinterval()
    try:
        run_client(url, ["a", "b"], streams, prompt_len, 16, seed=99)  # warm-up round
        for budget, ms in settings:
            scheduler.max_prefill_tokens = budget  # read by the scheduler's loop at each admission
            sys.setswitchinterval(ms / 1000)
            for name, models, seed in (("one adapter", ["a"], 1), ("two adapters alternating", ["a", "b"], 2), ("one adapter", ["a"], 3)):
                # the two-adapter round re-runs 4 streams alone afterwards (2 per adapter): routing checked per row
                scheduler.peak_prefill, before = 0, scheduler.stats()
                row = run_client(url, models, streams, prompt_len, new, seed, solo=4 if seed == 2 else 0)
                after = scheduler.stats()
                emit({"case": "serve", "weights": label, "round": name, "max_prefill_tokens": budget, "switch_interval_ms": ms,
                      "peak_batch": after["peak_running"], "step_ms_avg": round(1000 * scheduler.step_seconds, 2),
                      "prefills": after["prefills"] - before["prefills"], "peak_prefill": after["peak_prefill"],
                      "steps": after["steps"] - before["steps"], **row, **startup}, out)
    finally:
        sys.setswitchinterval(interval)
        server.should_exit = True
        thread.join(30)
        scheduler.stop()


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/tunelab_bench_serve")
    ap.add_argument("--out", default=None)
    ap.add_argument("--small", action="store_true", help="a 2-layer model (smoke test)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--phases", default="single16,serve16,single4")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--serve-settings", default="8192/5,0/5,8192/0.5",
                    help="serving rounds per setting: max_prefill_tokens/GIL switch interval in ms, comma-separated")
    ap.add_argument("--client", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--models", default="a", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--solo", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.client:
        print(json.dumps(asyncio.run(_client_main(args))))
        return 0
    from tunelab.model.tokenizer import build_qwen_tokenizer

    dims = SMALL if args.small else SEVEN_B
    os.makedirs(args.workdir, exist_ok=True)
    base = build_base(args.workdir, dims, args.device)
    if not os.path.isfile(os.path.join(base, "tokenizer.json")):
        build_qwen_tokenizer(base)  # the server renders chat templates and decodes text
    adapter_a = build_adapter(args.workdir, dims, "adapter_a", seed=0)
    adapter_b = build_adapter(args.workdir, dims, "adapter_b", seed=1)
    phases = args.phases.split(",")
    failed = 0

    def guarded(name, fn, *a):  # one failing case must not cost the others
        nonlocal failed
        try:
            fn(*a)
        except Exception:
            import traceback

            failed += 1
            log(f"{name} failed:\n{traceback.format_exc()}")
            emit({"case": name, "error": traceback.format_exc().splitlines()[-1]}, args.out)

    if any(p in phases for p in ("single16", "serve16", "merged16")):
        engine = load_engine(base, adapter_a, None)
        if "single16" in phases:
            guarded("single16", single_stream, engine, "bf16 + LoRA", args.prompt, args.new, args.out)
        if "serve16" in phases:
            guarded("serve16", serve_rounds, engine, adapter_b, args.streams, args.prompt, args.new, args.out, "bf16 + LoRA",
                    parse_settings(args.serve_settings))
        if "merged16" in phases:  # last: merging into bf16 weights and back would round the base

            def merged():
                engine.model.set_adapter("default")
                engine.model.merge_adapter()
                single_stream(engine, "bf16, adapter merged (no LoRA work per step)", args.prompt, args.new, args.out)

            guarded("merged16", merged)
        engine.unload()
        del engine
        _free()
    if "single4" in phases:
        engine = load_engine(base, adapter_a, 4)
        guarded("single4", single_stream, engine, "NF4 + LoRA", args.prompt, args.new, args.out)
        engine.unload()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
