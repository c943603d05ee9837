"""The augmented gate/up GEMMs at 7B 4 x 1024 on the GPU (run 18): does the inner width of the LoRA-augmented
weight (3,584 + 16 = 3,600, not a multiple of 64) cost cuBLAS speed, and would padding it to 3,648 pay?

Cases, bf16, 4,096 tokens, gate and up stacked (37,888 rows):
  fwd K   x[4096, K] @ W[37888, K]^T for K = 3584 (base only), 3600 (base + the r=8 LoRA columns of both), 3648
  bwd K   grad y[4096, 37888] @ W[37888, K] -> grad x [4096, K] for the same K
  store   the NF4 dequantize of gate and up into the left 3,584 columns of a [37888, K] buffer (K = 3584 contiguous,
          3600, 3648: row strides of 7,168, 7,200 and 7,296 bytes)
Each timed on the GPU alone (timed(): queued behind a GPU sleep), median of 60 calls. One JSON line per case with TFLOP/s (or TB/s for the stores)."""
from __future__ import annotations

import json
import statistics

import torch


def timed(fn, calls=20, repeats=3):
    """Median GPU time of one call, us: the calls queued behind a ~10 ms GPU sleep, so the host's launch time (one
    Triton launch is ~50 us of Python) is not timed, one CUDA event between each two calls."""
    fn()
    times = []
    for _ in range(repeats):
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(calls + 1)]
        torch.cuda.synchronize()
        torch.cuda._sleep(20_000_000)
        ev[0].record()
        for i in range(calls):
            fn()
            ev[i + 1].record()
        torch.cuda.synchronize()
        times += [ev[i].elapsed_time(ev[i + 1]) * 1000 for i in range(calls)]
    return statistics.median(times)


def main() -> None:
    import bitsandbytes.functional as bnbf

    from tunelab.model.fast import nf4_triton

    torch.manual_seed(0)
    t, rows = 4096, 37888
    g = torch.randn(t, rows, device="cuda", dtype=torch.bfloat16)
    for k in (3584, 3600, 3648):
        x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) * 0.02
        flops = 2 * t * rows * k
        us = timed(lambda: x @ w.t())
        print(json.dumps({"case": f"fwd_K{k}", "us": round(us, 1), "tflops": round(flops / us / 1e6, 1)}), flush=True)
        us = timed(lambda: g @ w)
        print(json.dumps({"case": f"bwd_K{k}", "us": round(us, 1), "tflops": round(flops / us / 1e6, 1)}), flush=True)
    wq = [bnbf.quantize_4bit((torch.randn(18944, 3584, device="cuda") * 0.02).bfloat16(), quant_type="nf4",
                             compress_statistics=True, quant_storage=torch.uint8) for _ in range(2)]
    nbytes = rows * 3584 * 2 + rows * 3584 // 2
    for k in (3584, 3600, 3648):
        buf = torch.empty(rows, k, device="cuda", dtype=torch.bfloat16)

        def store():
            for i, (p, qs) in enumerate(wq):
                part = buf[i * 18944:(i + 1) * 18944]
                nf4_triton.dequantize_4bit(p, qs, part if k == 3584 else part[:, :3584])

        us = timed(store)
        print(json.dumps({"case": f"store_stride{k}", "us": round(us, 1), "tbps": round(nbytes / us / 1e6, 2)}),
              flush=True)


if __name__ == "__main__":
    main()
