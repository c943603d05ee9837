"""Decode and serving speed of `tunelab api`'s engine path on a random-init Qwen2.5-7B-architecture model: one JSON
line per case (docs/serve.md holds the table made from them, and the raw lines).

    PYTHONPATH=src python tools/bench_serve.py --workdir /tmp/bench7b --out serve.jsonl          # H200: all cases
    PYTHONPATH=src python tools/bench_serve.py --small --device cpu --streams 4 --new 16         # CPU smoke test

Cases (the issue's speed targets):
- single16 / single4: one stream, a 128-token prompt (random ids), exactly 256 new tokens (stop tokens off), greedy,
  base + a LoRA adapter (rank 16, every linear layer), bf16 and 4-bit NF4 (double quantization, bf16 compute).
  'plain generate' (the engine's hf backend: transformers' generate, dynamic cache) is timed FIRST, before anything
  compiles in the process, after one full-length warm-up call (the first full-length call is slow whatever the
  path, docs/chat_export.md; its rate is reported as first_call_tokens_per_s), and
  once more at the end, after the compilations (path 'plain generate, after the compilations'). Then each fast variant of `--fast`
  (FAST below: 'tunelab fast' is the default static backend: slot decoder, static KV cache, CUDA graphs of the
  compiled decoder layer; the others add levers by environment variable) on the same model object: one call that
  builds its decoder (capture + compilation, decoder_build_s), then two timed calls; tokens/s = 256 / wall time
  of the call (prefill and sampling included), the better of the two; first_token_ms: a call for one token (the
  prefill and one pick, the better of two) and ms_per_step: the rest of the call per decode step (against
  replay_ms: the host's time per step). Also: the first position where a path's
  tokens differ from plain generate's (None: all equal) and from the default fast path's, and one graph replay
  alone (replay_ms: median of 50, CUDA events; batch 1, longest bucket), the GPU kernels in it, their summed GPU
  time and the top kernels by GPU time (torch.profiler over one replay).
- serve16: 32 concurrent streaming requests through the real HTTP server (FastAPI + uvicorn in this process, the
  scheduler's continuous batching), sent by a client in a separate process (httpx, server-sent events, no shared
  GIL), each a distinct 128-token prompt with 256 new tokens (min_tokens = max_tokens = 256). Aggregate tokens/s =
  all streamed tokens / wall time from the first request sent to the last [DONE]; time to first token per stream
  (p50, p99). Rounds: every request on adapter a ('one adapter'), requests alternating a / b ('two adapters'),
  then 'one adapter' again. Each stream's token count is checked (none lost); after the two-adapter round four of
  its streams (two per adapter) are re-run alone and their texts compared with the batched ones.
  The three rounds run for the first server setting of `--serve-settings`, the first round alone for each other
  setting (one decoder, built once, shared): the
  prefill token budget (the scheduler's max_prefill_tokens: 8192 = waiting prompts prefilled together in one
  forward, the default; 0 = one prompt per forward, the behaviour before batched prefill) and the interpreter's
  GIL switch interval in ms (sys.setswitchinterval: how long the decode thread may wait for the GIL that the
  event loop's thread holds; Python's default is 5 ms). Default: 8192/5, 0/5, 8192/0.5. Each row also carries
  the round's prefill forwards and the most prompts in one of them (prefills, peak_prefill), and the scheduler
  thread's seconds in prefill forwards / decode-step calls / token picks (loop_s). After the rounds: the batch-32
  step's graph replay alone with its kernel profile ('serve step alone'). `--serve-env` sets levers for the
  server's decoder.

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


# the fast variants: environment each decoder is built under (read when a decoder and its router are made)
FAST = {
    "eager": ("tunelab fast, eager layers", {"TUNELAB_COMPILE_DECODE": "0"}),
    "fast": ("tunelab fast", {}),  # the defaults: on CUDA every lever below is on (the fused GEMMs, reductions, packed GQA, fold, Triton attention, 8 steps per sync, compiled prefill)
    "nolevers": ("tunelab fast, no levers", {"TUNELAB_FUSE_PROJ": "0", "TUNELAB_LORA_REDUCE": "0", "TUNELAB_PACK_GQA": "0"}),
    "fuse_gqa": ("tunelab fast + fused GEMMs + packed-GQA attention", {"TUNELAB_FUSE_PROJ": "1", "TUNELAB_LORA_REDUCE": "0", "TUNELAB_PACK_GQA": "1"}),
    "all": ("tunelab fast + fused GEMMs + LoRA reductions + packed-GQA attention",
            {"TUNELAB_FUSE_PROJ": "1", "TUNELAB_LORA_REDUCE": "1", "TUNELAB_PACK_GQA": "1"}),
    # measured on 2026-12-02 (docs/serve.md), defaults on CUDA since: 8 steps per sync and the compiled prefill
    "one_step": ("tunelab fast, one step per sync, eager prefill", {"TUNELAB_DECODE_AHEAD": "0", "TUNELAB_COMPILE_PREFILL": "0"}),
    "cprefill": ("tunelab fast + compiled prefill", {"TUNELAB_COMPILE_PREFILL": "1", "TUNELAB_DECODE_AHEAD": "0"}),
    "ahead": ("tunelab fast + 8 steps per sync", {"TUNELAB_DECODE_AHEAD": "8", "TUNELAB_COMPILE_PREFILL": "0"}),
    "ahead_cprefill": ("tunelab fast + 8 steps per sync + compiled prefill", {"TUNELAB_DECODE_AHEAD": "8", "TUNELAB_COMPILE_PREFILL": "1"}),
    # the split-K Triton decode attention (model/fast/decode_attn.py) in place of SDPA's: on by default on CUDA since run 5 of 2026-12-02
    "dattn": ("tunelab fast + Triton decode attention, no fold", {"TUNELAB_DECODE_ATTN": "1", "TUNELAB_LORA_FOLD": "0"}),
    # LoRA A rows appended to the base weights (the A products out of the base GEMMs): measured 2026-12-02 (run 5 of
    # the day), on by default on CUDA since, with the Triton decode attention. A fold is made by the model's first
    # router: list a folding variant first (later ones then run on the folded buffers, their GEMMs ~1% wider)
    "fold": ("tunelab fast + LoRA A folded into the base GEMMs", {"TUNELAB_LORA_FOLD": "1", "TUNELAB_DECODE_ATTN": "0"}),
    "fold_dattn": ("tunelab fast + LoRA A folded + Triton decode attention", {"TUNELAB_LORA_FOLD": "1", "TUNELAB_DECODE_ATTN": "1"}),
    "before_fold": ("tunelab fast, no fold, SDPA attention (the default before run 5)", {"TUNELAB_LORA_FOLD": "0", "TUNELAB_DECODE_ATTN": "0"}),
    "dattn_ahead_cprefill": ("tunelab fast + Triton decode attention + 8 steps per sync + compiled prefill",
                             {"TUNELAB_DECODE_ATTN": "1", "TUNELAB_DECODE_AHEAD": "8", "TUNELAB_COMPILE_PREFILL": "1"}),
}
ENV_KEYS = sorted({k for _, env in FAST.values() for k in env})


def _set_env(env: dict) -> None:
    for k in ENV_KEYS:
        os.environ.pop(k, None)
    os.environ.update(env)


def single_stream(engine, label: str, prompt_len: int, new: int, out: str | None, fast: list[str], plain_after: bool = True) -> None:
    """Plain generate first, before anything compiles in this process: one full-length warm-up call (timed too:
    `first_call_tokens_per_s`: the first full-length call is slow whatever the path, docs/chat_export.md) and one timed call (the figure). Then each fast variant: one call that builds its decoder
    (capture + compilation), two timed calls. Then (plain_after) plain generate once more, timed after the
    compilations (its own row), to see whether they slow it down."""
    import torch

    from tunelab.infer.engine import HFDecodeBackend, StaticDecodeBackend

    prompt = torch.randint(0, 150000, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    tokens: dict[str, list[int]] = {}

    def call(n: int) -> tuple[float, list[int]]:
        _sync()
        t = time.perf_counter()
        ids = engine.generate_ids([prompt], max_new_tokens=n, min_new_tokens=n, stop_token_ids=())[0]
        _sync()
        assert len(ids) == n, f"{engine.backend.name} produced {len(ids)} tokens"
        return time.perf_counter() - t, ids

    def first_diff(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)

    _set_env({})
    engine.backend = HFDecodeBackend()
    first, first_ids = call(new)
    plain_s, tokens["plain"] = call(new)
    plain_row = {"case": "single", "weights": label, "path": "plain generate", "prompt": prompt_len, "new": new,
                 "tokens_per_s": round(new / plain_s, 1), "seconds": [round(plain_s, 3)],
                 "first_call_tokens_per_s": round(new / first, 1), "first_difference_vs_plain": None,
                 # does plain generate repeat itself? (the warm-up call is a full-length call too)
                 "first_difference_vs_warmup_call": first_diff(first_ids, tokens["plain"])}
    emit(plain_row, out)  # now: a time box that ends the run later keeps it
    for key in fast:
        name, env = FAST[key]
        _set_env(env)
        backend = StaticDecodeBackend()
        engine.backend = backend
        try:
            call(new)  # builds the decoder
            log(f"{label} / {name}: decoder built (capture + compile) in {backend.decoder.warmup_seconds:.1f} s")
            times = []
            for _ in range(2):
                t, tokens[key] = call(new)
                times.append(t)
            first_token_s = min(call(1)[0] for _ in range(2))  # the prefill (+ one pick): what a call spends before its steps
            dec = backend.decoder
            row = {"case": "single", "weights": label, "path": name, "env": env, "prompt": prompt_len, "new": new,
                   "tokens_per_s": round(new / min(times), 1), "seconds": [round(x, 3) for x in times],
                   "first_difference_vs_plain": first_diff(tokens["plain"], tokens[key]),
                   "first_token_ms": round(1000 * first_token_s, 2),
                   "ms_per_step": round(1000 * (min(times) - first_token_s) / max(1, new - 1), 3),
                   "cuda_graphs": len(dec.graphs), "graph_error": dec.graph_error, "compiled": dec.compiled is not None,
                   "compile_error": dec.compile_error, "decoder_build_s": round(dec.warmup_seconds, 1),
                   "lora_groups": dec.router.groups if dec.router else None,
                   "fused_projections": getattr(dec.router, "fused", None) if dec.router else None,
                   "folded_lora": getattr(dec.router, "folded_layers", None) if dec.router else None,
                   "compile_prefill": getattr(dec, "compile_prefill", None), "decode_kernel": getattr(dec, "decode_kernel", None),
                   **step_profile(dec)}
            if key != "fast" and "fast" in tokens:
                row["first_difference_vs_fast"] = first_diff(tokens["fast"], tokens[key])
        except Exception:
            import traceback

            row = {"case": "single", "weights": label, "path": name, "env": env, "error": traceback.format_exc().splitlines()[-1]}
            log(traceback.format_exc())
        emit(row, out)
        backend.decoder = None
        engine.backend = HFDecodeBackend()
        _free()
    _set_env({})
    if plain_after:
        engine.backend = HFDecodeBackend()
        after, ids = call(new)
        emit({**plain_row, "path": "plain generate, after the compilations", "tokens_per_s": round(new / after, 1),
              "seconds": [round(after, 3)], "first_call_tokens_per_s": None, "first_difference_vs_warmup_call": None,
              "first_difference_vs_plain": first_diff(tokens["plain"], ids)}, out)
    engine.backend = HFDecodeBackend()
    _free()


def step_profile(dec, rows: int = 1, top: int = 10) -> dict:
    """Time of one graph replay (batch `rows`, the longest length bucket; median of 50, CUDA events), the GPU
    kernels in it (torch.profiler over one replay), their summed GPU time (the rest of the replay is gaps between
    kernels) and the `top` kernels by GPU time: what one decode step costs without any Python."""
    import torch

    widths = [w for b, w in dec.graphs if b == rows]
    if not widths:
        return {}
    key = (rows, max(widths))
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
        kernels = [e for e in prof.events() if str(e.device_type).endswith("CUDA")]
        result["kernels_per_step"] = len(kernels)

        def gpu_us(e):
            return float(getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0) or 0.0)

        result["kernel_ms_sum"] = round(sum(gpu_us(e) for e in kernels) / 1000, 3)
        by_name: dict[str, list[float]] = {}
        for e in kernels:
            entry = by_name.setdefault(e.name[:90], [0, 0.0])
            entry[0] += 1
            entry[1] += gpu_us(e)
        result["top_kernels"] = [[n, c, round(us, 1)] for n, (c, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]]
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
        rounds = (("one adapter", ["a"], 1), ("two adapters alternating", ["a", "b"], 2), ("one adapter", ["a"], 3))
        for k, (budget, ms) in enumerate(settings):
            scheduler.max_prefill_tokens = budget  # read by the scheduler's loop at each admission
            sys.setswitchinterval(ms / 1000)
            for name, models, seed in rounds if k == 0 else rounds[:1]:  # the other settings: one round each
                # the two-adapter round re-runs 4 streams alone afterwards (2 per adapter): routing checked per row
                scheduler.peak_prefill, before, t0 = 0, scheduler.stats(), dict(scheduler.timing)
                row = run_client(url, models, streams, prompt_len, new, seed, solo=4 if seed == 2 else 0)
                after = scheduler.stats()
                # the scheduler thread's time in the round (solo re-runs included): prefill forwards, the decode
                # steps' host calls (the GPU runs on), picking + sending tokens (waits for each step's GPU work)
                spent = {k: round(scheduler.timing[k] - t0[k], 3) for k in t0}
                steps = after["steps"] - before["steps"]
                emit({"case": "serve", "weights": label, "round": name, "max_prefill_tokens": budget, "switch_interval_ms": ms,
                      "peak_batch": after["peak_running"], "step_ms_avg": round(1000 * scheduler.step_seconds, 2),
                      "prefills": after["prefills"] - before["prefills"], "peak_prefill": after["peak_prefill"],
                      "steps": steps, "loop_s": spent, **row, **startup}, out)
        scheduler.stop()
        profile = step_profile(decoder, rows=streams)  # nothing live: the batch-32 step's replay alone
        emit({"case": "serve step alone", "weights": label, **profile}, out)
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
    ap.add_argument("--fast", default="nolevers,fast",
                    help=f"fast variants of the single-stream cases, comma-separated, from: {', '.join(FAST)}")
    ap.add_argument("--no-plain-after", action="store_true", help="skip the plain-generate call after the compilations")
    ap.add_argument("--serve-env", default="", help="KEY=VALUE,... set while the server's decoder is built (a lever)")
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
    fast = [k for k in args.fast.split(",") if k]
    unknown = [k for k in fast if k not in FAST]
    if unknown:
        ap.error(f"unknown fast variant {unknown[0]!r}; choose from {', '.join(FAST)}")
    serve_env = dict(kv.split("=", 1) for kv in args.serve_env.split(",") if kv)
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
            guarded("single16", single_stream, engine, "bf16 + LoRA", args.prompt, args.new, args.out, fast, not args.no_plain_after)
        if "serve16" in phases:
            _set_env(serve_env)
            guarded("serve16", serve_rounds, engine, adapter_b, args.streams, args.prompt, args.new, args.out,
                    "bf16 + LoRA" + "".join(f", {k}={v}" for k, v in serve_env.items()), parse_settings(args.serve_settings))
            _set_env({})
        if "merged16" in phases:  # last: merging into bf16 weights and back would round the base

            def merged():
                engine.model.set_adapter("default")
                engine.model.merge_adapter()
                single_stream(engine, "bf16, adapter merged (no LoRA work per step)", args.prompt, args.new, args.out, fast, False)

            guarded("merged16", merged)
        engine.unload()
        del engine
        _free()
    if "single4" in phases:
        engine = load_engine(base, adapter_a, 4)
        guarded("single4", single_stream, engine, "NF4 + LoRA", args.prompt, args.new, args.out, fast,
                not args.no_plain_after)
        engine.unload()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
