"""The NF4 kernel's stacked store on the GPU (runs 17-19): gate/up at 7B written into the left 3,584 columns of a
[37,888, 3,600] buffer per element (block_rows=False: a 64-bit division per stored vector, the form of runs 14-18)
and per block (block_rows=True: the blocks per row a compile-time constant, the default since run 19), against the
contiguous store of the same weights, and q/k/v and down through dense_stack; each timed on the GPU alone
(gemm_probe.timed: the calls queued behind a GPU sleep; run 17's figures timed the host's launches too).
Checks the per-block output equals the per-element one bit for bit. One JSON line per case."""
from __future__ import annotations

import json

import torch


def main() -> None:
    import bitsandbytes.functional as bnbf

    from gemm_probe import timed  # tools/: the GPU's time alone, the launches queued behind a sleep

    from tunelab.model.fast import nf4_triton

    torch.manual_seed(0)

    def quant(rows, cols):
        w = (torch.randn(rows, cols, device="cuda") * 0.02).bfloat16()
        return bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True, quant_storage=torch.uint8)

    (g, gs), (u, us) = quant(18944, 3584), quant(18944, 3584)
    buf = torch.empty(37888, 3600, dtype=torch.bfloat16, device="cuda")
    flat = torch.empty(37888, 3584, dtype=torch.bfloat16, device="cuda")

    def store(block_rows):
        nf4_triton.dequantize_4bit(g, gs, buf[:18944, :3584], block_rows=block_rows)
        nf4_triton.dequantize_4bit(u, us, buf[18944:, :3584], block_rows=block_rows)

    def contiguous():
        nf4_triton.dequantize_4bit(g, gs, flat[:18944])
        nf4_triton.dequantize_4bit(u, us, flat[18944:])

    store(False)
    old = buf[:, :3584].clone()
    store(True)
    same = bool(torch.equal(old, buf[:, :3584]))
    for name, fn in (("gate_up_strided_per_element", lambda: store(False)), ("gate_up_strided_per_block", lambda: store(True)),
                     ("gate_up_contiguous", contiguous)):
        print(json.dumps({"case": name, "us": round(timed(fn), 1), "per_block_equals_per_element": same}), flush=True)
    tail = torch.zeros(37888, 16, dtype=torch.bfloat16, device="cuda")
    print(json.dumps({"case": "gate_up_dense_stack_tail16", "us": round(timed(lambda: nf4_triton.dense_stack([(g, gs), (u, us)], tail)), 1)}))
    (q, qs), (k, ks), (v, vs) = quant(3584, 3584), quant(512, 3584), quant(512, 3584)
    tail = torch.zeros(4608, 24, dtype=torch.bfloat16, device="cuda")
    print(json.dumps({"case": "qkv_dense_stack_tail24", "us": round(timed(lambda: nf4_triton.dense_stack([(q, qs), (k, ks), (v, vs)], tail)), 1)}))
    print(json.dumps({"case": "qkv_three_dequantizes", "us": round(timed(lambda: [nf4_triton.dequantize_4bit(w, s) for w, s in ((q, qs), (k, ks), (v, vs))]), 1)}))
    (d, ds) = quant(3584, 18944)
    rows = torch.zeros(8, 18944, dtype=torch.bfloat16, device="cuda")
    print(json.dumps({"case": "down_dense_stack_below8", "us": round(timed(lambda: nf4_triton.dense_stack([(d, ds), (rows, None)])), 1)}))
    print(json.dumps({"case": "down_dequantize", "us": round(timed(lambda: nf4_triton.dequantize_4bit(d, ds)), 1)}))


if __name__ == "__main__":
    main()
