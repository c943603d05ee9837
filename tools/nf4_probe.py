"""GPU micro-benchmark: tunelab's one-launch 4-bit dequantize (tunelab.model.fast.nf4_triton) against
bitsandbytes' three launches (what lora.dense_weight did: dequantize_blockwise of the nested absmax, the offset
add, dequantize_4bit), at each Qwen2.5-7B projection shape, NF4 + double quantization, bf16.

    python tools/nf4_probe.py [--out probe.json] [--calls 100] [--batches 5]

Per shape and path:
* gpu_us: GPU time of one call. The calls are queued behind a GPU sleep so the CPU is ahead and no launch gap
  is timed; CUDA events between consecutive calls; warm-up first; median over calls x batches. The packed
  weights rotate over enough copies that the inputs do not sit in the 60 MB L2.
* host_us: CPU time to issue one call (200 calls back to back after a sync, perf_counter, divided; median of
  the batches). On the launch-bound 7B step this is the cost that counts.
* bit-identical: each configuration's output on fresh random weights against bitsandbytes.functional's, as
  integer bits; lora.dense_weight with TUNELAB_NF4_TRITON=1 (the check and the call included) likewise.
Kernel configurations (bytes per program, warps, bf16 conversion) are timed too; the table of the default
configuration is printed last, with the per-step total (7 projections x 28 layers x 3 uses).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

SHAPES = {"q": (3584, 3584), "k": (512, 3584), "v": (512, 3584), "o": (3584, 3584),
          "gate": (18944, 3584), "up": (18944, 3584), "down": (3584, 18944)}  # weight [out, in]
CONFIGS = [dict(hw_bf16=True, bytes_per_program=b, num_warps=w) for b in (1024, 2048, 4096, 8192) for w in (4, 8)]
CONFIGS.append(dict(hw_bf16=False, bytes_per_program=2048, num_warps=4))
CONFIGS += [dict(hw_bf16=True, bytes_per_program=b, num_warps=w, element_tile=True) for b, w in ((2048, 4), (4096, 8))]
USES_PER_STEP = 28 * 3  # layers x (forward, recompute, backward), per projection
DEVICE = "cuda"  # a CPU smoke run of this script's logic overrides it (with fake timers)


def quantized_copies(shape, count, seed):
    import bitsandbytes.functional as F

    g = torch.Generator(device=DEVICE).manual_seed(seed)
    out = []
    for _ in range(count):
        w = (torch.randn(shape, generator=g, device=DEVICE) * 0.02).bfloat16()
        out.append(F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4",
                                   quant_storage=torch.bfloat16))
    return out


def gpu_us(fn, items, calls, batches):
    for i in range(20):
        fn(*items[i % len(items)])
    torch.cuda.synchronize()
    times = []
    for _ in range(batches):
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(calls + 1)]
        torch.cuda._sleep(20_000_000)  # ~10 ms: the CPU queues every call before the GPU reaches them
        ev[0].record()
        for i in range(calls):
            fn(*items[i % len(items)])
            ev[i + 1].record()
        torch.cuda.synchronize()
        times += [ev[i].elapsed_time(ev[i + 1]) * 1000 for i in range(calls)]
    return statistics.median(times)


def host_us(fn, items, batches, calls=200):
    res = []
    for _ in range(batches):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(calls):
            fn(*items[i % len(items)])
        res.append((time.perf_counter() - t0) / calls * 1e6)
    torch.cuda.synchronize()
    return statistics.median(res)


def bits_equal(a, b):
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


def subnormal_check():
    """bitsandbytes' CUDA library flushes subnormal products (--use_fast_math): which ftz setting matches it."""
    import bitsandbytes.functional as F

    from tunelab.model.fast import nf4_triton as K

    res = {}
    for nested in (False, True):
        g = torch.Generator(device=DEVICE).manual_seed(5)
        w = (torch.randn(512, 3584, generator=g, device=DEVICE) * 0.02).bfloat16()
        p, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4",
                                quant_storage=torch.bfloat16)
        target = qs.state2 if nested else qs
        target.absmax[::2] = torch.tensor([1e-39, 1e-37, 3e-38, 2e-36], device=DEVICE).repeat(
            target.absmax[::2].numel() // 4 + 1)[: target.absmax[::2].numel()]
        if nested:
            qs.offset = torch.zeros_like(qs.offset)
        ref = F.dequantize_4bit(p, qs)
        for ftz in (True, False):
            res[f"{'nested' if nested else 'plain'}_ftz_{ftz}"] = bits_equal(K.dequantize_4bit(p, qs, ftz=ftz), ref)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="")
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--batches", type=int, default=5)
    args = ap.parse_args(argv)

    import bitsandbytes.functional as F

    from tunelab.model.fast import lora, nf4_triton as K

    ops = torch.ops.bitsandbytes

    def bnb_three(p, qs):  # lora.dense_weight's bitsandbytes path, line for line (without the kernel check)
        s2 = qs.state2
        absmax = ops.dequantize_blockwise.default(qs.absmax, s2.absmax, s2.code, s2.blocksize, torch.float32)
        absmax += qs.offset
        return ops.dequantize_4bit.default(p.view(-1, 1), absmax, qs.blocksize, qs.quant_type, qs.shape, qs.dtype)

    def tunelab_dense(p, qs):  # what dense_weight costs with the kernel on (the check included)
        return lora.dense_weight(p, qs, torch.bfloat16)

    def bnb_public(p, qs):
        return F.dequantize_4bit(p, qs)

    os.environ["TUNELAB_NF4_TRITON"] = "1"  # dense_weight -> the kernel (default config)
    l2 = 60 * 2**20
    rows, by_shape = [], {}
    for name, shape in SHAPES.items():
        if shape in by_shape:
            rows.append({**by_shape[shape], "proj": name})
            continue
        n = shape[0] * shape[1]
        copies = max(2, min(64, -(-3 * l2 // (n // 2))))
        items = quantized_copies(shape, copies, seed=n % 1000)
        fresh = quantized_copies(shape, 1, seed=n % 1000 + 1)[0]
        ref = F.dequantize_4bit(*fresh)
        row = {"proj": name, "shape": list(shape), "copies": copies,
               "bnb_three_gpu_us": gpu_us(bnb_three, items, args.calls, args.batches),
               "bnb_public_gpu_us": gpu_us(bnb_public, items, args.calls, args.batches),
               "bnb_three_host_us": host_us(bnb_three, items, args.batches),
               "bnb_three_identical_to_public": bits_equal(bnb_three(*fresh), ref),
               "dense_weight_gpu_us": gpu_us(tunelab_dense, items, args.calls, args.batches),
               "dense_weight_host_us": host_us(tunelab_dense, items, args.batches),
               "dense_weight_identical": bits_equal(tunelab_dense(*fresh), ref), "configs": []}
        for cfg in CONFIGS:
            fn = lambda p, qs, cfg=cfg: K.dequantize_4bit(p, qs, **cfg)  # noqa: E731
            out = torch.full(shape, float("nan"), dtype=torch.bfloat16, device=DEVICE)
            K.dequantize_4bit(*fresh, out=out, **cfg)
            row["configs"].append({**cfg, "gpu_us": gpu_us(fn, items, args.calls, args.batches),
                                   "host_us": host_us(fn, items, args.batches),
                                   "identical": bits_equal(out, ref)})
        moved = n // 2 + n // 64 + n * 2  # packed + uint8 absmax + bf16 out (second-level state is tiny)
        for c in row["configs"]:
            c["tb_per_s"] = moved / (c["gpu_us"] * 1e-6) / 1e12
        by_shape[shape] = row
        rows.append(row)
        del items, fresh, ref
        torch.cuda.empty_cache()

    # the configuration that is fastest summed over one layer's seven projections
    totals = [sum(r["configs"][i]["gpu_us"] for r in rows) for i in range(len(CONFIGS))]
    best = min(range(len(CONFIGS)), key=totals.__getitem__)
    default = next(i for i, c in enumerate(CONFIGS) if c["hw_bf16"] and c["bytes_per_program"] == K.BYTES_PER_PROGRAM
                   and c["num_warps"] == K.NUM_WARPS and c.get("element_tile", False) == K.ELEMENT_TILE)
    summary = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "triton": __import__("triton").__version__, "bitsandbytes": __import__("bitsandbytes").__version__,
               "all_identical": all(c["identical"] for r in rows for c in r["configs"]) and all(
                   r["dense_weight_identical"] and r["bnb_three_identical_to_public"] for r in rows),
               "best_config": CONFIGS[best], "layer_gpu_us_by_config": dict(zip(map(str, CONFIGS), totals)),
               "rows": rows}
    for key, i in (("default", default), ("best", best)):
        layer_bnb = sum(r["bnb_three_gpu_us"] for r in rows)
        layer_k = sum(r["configs"][i]["gpu_us"] for r in rows)
        host_bnb = sum(r["bnb_three_host_us"] for r in rows)
        host_k = sum(r["configs"][i]["host_us"] for r in rows)
        summary[key] = {"config": CONFIGS[i], "layer_gpu_us_bnb": layer_bnb, "layer_gpu_us_triton": layer_k,
                        "step_gpu_ms_saved": (layer_bnb - layer_k) * USES_PER_STEP / 1000,
                        "layer_host_us_bnb": host_bnb, "layer_host_us_triton": host_k,
                        "step_host_ms_saved": (host_bnb - host_k) * USES_PER_STEP / 1000}
    summary["subnormal_identical"] = subnormal_check()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)

    print("config totals over one layer's 7 projections (GPU us):")
    for cfg, t in zip(CONFIGS, totals):
        print(f"  {cfg}  {t:8.1f}")
    for key in ("default", "best"):
        i = default if key == "default" else best
        print(f"\n{key} config {CONFIGS[i]}")
        print(f"{'proj':5} {'shape':>12} {'bnb3 gpu':>9} {'bnb pub':>8} {'triton':>8} {'x':>5} {'TB/s':>5} "
              f"{'bnb3 host':>9} {'tri host':>8} {'same':>5}")
        for r in rows:
            c = r["configs"][i]
            print(f"{r['proj']:5} {r['shape'][0]:>5}x{r['shape'][1]:<6} {r['bnb_three_gpu_us']:9.1f} "
                  f"{r['bnb_public_gpu_us']:8.1f} {c['gpu_us']:8.1f} {r['bnb_three_gpu_us'] / c['gpu_us']:5.2f} "
                  f"{c['tb_per_s']:5.2f} {r['bnb_three_host_us']:9.1f} {c['host_us']:8.1f} {str(c['identical']):>5}")
        s = summary[key]
        print(f"per step (x{USES_PER_STEP} per projection): GPU {s['step_gpu_ms_saved']:.2f} ms saved, "
              f"host {s['step_host_ms_saved']:.2f} ms saved")
    print("lora.dense_weight with the kernel on (us, gpu/host/identical):",
          [(r["proj"], round(r["dense_weight_gpu_us"], 1), round(r["dense_weight_host_us"], 1),
            r["dense_weight_identical"]) for r in rows])
    print("subnormal blocks, kernel == bitsandbytes:", summary["subnormal_identical"])
    print("ALL IDENTICAL" if summary["all_identical"] else "NOT IDENTICAL: see configs")
    return 0 if summary["all_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
