"""Decode attention alone, on the GPU: tunelab's split-K Triton kernel (model/fast/decode_attn.py) against the
decoder's SDPA path (infer/decoder.py `_packed_gqa_attention`: the query heads packed per key/value head, one
SDPA call, the transpose back) at Qwen2.5-7B's attention shape (28 query heads, 4 key/value heads, head_dim 128),
over strided cache views as the slot decoder passes them, with its boolean mask (each row attends to 0..pos).

Timing: each variant's call is captured 100 times in one CUDA graph (as the decoder's step graphs hold it) and
the graph is replayed 20 times between CUDA events: microseconds per call = elapsed / 2000, median of 5 rounds.
Correctness on the same inputs: the largest difference from the float32 reference, for both.

    python tools/bench_decode_attn.py [--out FILE.jsonl]      # one JSON line per (rows, width, dtype)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch


def _time(fn, rounds: int = 5, inner: int = 100, replays: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / (inner * replays))
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--shapes", default="1x256,1x512,1x2048,8x512,32x512,32x1024,64x512,4x4096")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode_attn needs a CUDA GPU", file=sys.stderr)
        return 2
    from tunelab.infer.decoder import _packed_gqa_attention
    from tunelab.model.fast.decode_attn import decode_attention, reference, splits_for

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 7, True
    out = open(args.out, "a") if args.out else None
    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.bfloat16,):
        for shape in args.shapes.split(","):
            rows, width = (int(x) for x in shape.split("x"))
            ck = torch.randn(rows + 1, 4, width + 256, 128, device="cuda", dtype=dtype, generator=g)
            cv = torch.randn(rows + 1, 4, width + 256, 128, device="cuda", dtype=dtype, generator=g)
            k, v = ck[:rows, :, :width], cv[:rows, :, :width]
            q = torch.randn(rows, 28, 1, 128, device="cuda", dtype=dtype, generator=g)
            pos = torch.randint(width // 2, width, (rows, 1), device="cuda", generator=g)
            mask = (torch.arange(width, device="cuda").view(1, width) <= pos).view(rows, 1, 1, width)
            scale = 128 ** -0.5
            want = reference(q.float(), k.float(), v.float(), mask, scale)
            ours = decode_attention(q, k, v, mask, scale)
            sdpa = _packed_gqa_attention(module, q, k, v, mask, scaling=scale)[0]
            row = {"rows": rows, "width": width, "dtype": str(dtype)[6:], "splits": list(splits_for(rows, 4, width)),
                   "triton_us": round(_time(lambda: decode_attention(q, k, v, mask, scale)), 2),
                   "sdpa_us": round(_time(lambda: _packed_gqa_attention(module, q, k, v, mask, scaling=scale)), 2),
                   "triton_max_err": float((ours.float() - want).abs().max()), "sdpa_max_err": float((sdpa.float() - want).abs().max())}
            row["speedup"] = round(row["sdpa_us"] / row["triton_us"], 2)
            line = json.dumps(row)
            print(line, flush=True)
            if out:
                out.write(line + "\n")
                out.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
