"""GPU micro-benchmark of one LoRA projection at Qwen2.5-7B shapes: PEFT over bitsandbytes vs tunelab's fused op.

    python tools/fast_probe.py [--tokens 4096] [--out probe.json]

For each projection (q, k, v, o, gate, up, down) and base (nf4 = 4-bit NF4 + double quant, bf16 = 16-bit), it
times forward + backward (grad x, grad A, grad B) of PEFT's LoRA layer under bf16 autocast and of the same layer
patched with tunelab.model.fast (triton.testing.do_bench, median), and checks the fused outputs and gradients
against PEFT's (relative error, fresh random inputs, nonzero B). Prints a table last.
"""
from __future__ import annotations

import argparse
import json

import torch

SHAPES = {"q": (3584, 3584), "k": (3584, 512), "v": (3584, 512), "o": (3584, 3584),
          "gate": (3584, 18944), "up": (3584, 18944), "down": (18944, 3584)}


class One(torch.nn.Module):
    def __init__(self, base):
        super().__init__()
        self.proj = base

    def forward(self, x):
        return self.proj(x)


def build(kind: str, fan_in: int, fan_out: int, bias: bool):
    import bitsandbytes as bnb
    from peft import LoraConfig, inject_adapter_in_model

    w = torch.randn(fan_out, fan_in, dtype=torch.bfloat16) * 0.02
    b = torch.randn(fan_out, dtype=torch.bfloat16) * 0.02 if bias else None
    if kind == "nf4":
        base = bnb.nn.Linear4bit(fan_in, fan_out, bias=bias, compute_dtype=torch.bfloat16, quant_type="nf4",
                                 compress_statistics=True, quant_storage=torch.bfloat16)
        base.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True, quant_storage=torch.bfloat16)
        if bias:
            base.bias = torch.nn.Parameter(b, requires_grad=False)
    else:
        base = torch.nn.Linear(fan_in, fan_out, bias=bias, dtype=torch.bfloat16)
        base.weight = torch.nn.Parameter(w, requires_grad=False)
        if bias:
            base.bias = torch.nn.Parameter(b, requires_grad=False)
    model = inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["proj"]), One(base))
    model = model.cuda()
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = (torch.randn_like(p, dtype=torch.float32) * 0.05).cuda()
            p.requires_grad_(True)
    return model


def step(model, x, gy):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = model(x)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(y, [x] + params, gy)
    return y, grads


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    import triton.testing

    from tunelab.model.fast import patch_lora_layers, unpatch_lora_layers

    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    for kind in ("nf4", "bf16"):
        for name, (fi, fo) in SHAPES.items():
            torch.manual_seed(len(rows))
            model = build(kind, fi, fo, bias=name in ("q", "k", "v"))
            x = torch.randn(args.tokens, fi, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            gy = torch.randn(args.tokens, fo, device="cuda", dtype=torch.bfloat16)
            y0, g0 = step(model, x, gy)
            t_plain = triton.testing.do_bench(lambda: step(model, x, gy), warmup=25, rep=200, return_mode="median")
            assert patch_lora_layers(model) == 1
            y1, g1 = step(model, x, gy)
            t_fast = triton.testing.do_bench(lambda: step(model, x, gy), warmup=25, rep=200, return_mode="median")
            unpatch_lora_layers(model)
            flops = 3 * 2 * args.tokens * fi * fo  # y, grad x (and the dequantized W read twice)
            row = {"base": kind, "proj": name, "in": fi, "out": fo, "plain_ms": round(t_plain, 3), "fast_ms": round(t_fast, 3),
                   "speedup": round(t_plain / t_fast, 3), "fast_tflops": round(flops * 2 / 3 / t_fast / 1e9, 1),
                   "err_y": rel(y1, y0), "err_gx": rel(g1[0], g0[0]), "err_ga": rel(g1[1], g0[1]), "err_gb": rel(g1[2], g0[2])}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model, x, gy
            torch.cuda.empty_cache()
    print(f"\n{'base':<6}{'proj':<6}{'plain ms':>10}{'fast ms':>9}{'x':>7}{'err y':>9}{'err gx':>9}{'err gA':>9}{'err gB':>9}")
    for r in rows:
        print(f"{r['base']:<6}{r['proj']:<6}{r['plain_ms']:>10.3f}{r['fast_ms']:>9.3f}{r['speedup']:>7.2f}"
              f"{r['err_y']:>9.1e}{r['err_gx']:>9.1e}{r['err_ga']:>9.1e}{r['err_gb']:>9.1e}")
    for kind in ("nf4", "bf16"):
        sel = [r for r in rows if r["base"] == kind]
        print(f"{kind}: one layer's 7 projections, plain {sum(r['plain_ms'] for r in sel):.2f} ms, fast {sum(r['fast_ms'] for r in sel):.2f} ms")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
