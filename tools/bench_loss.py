"""Micro-benchmark of the output head + cross-entropy on the GPU (Qwen2.5-7B shapes): plain vs fused variants.

    python tools/bench_loss.py      # prints fwd+bwd time and peak extra memory per variant
"""
import time

import torch

from tunelab.model.kernels import fused_linear_cross_entropy

N, H, V = 4 * 1024, 3584, 152064
torch.manual_seed(0)
w = (torch.randn(V, H, device="cuda") * 0.02).bfloat16()
labels = torch.randint(0, V, (4, 1024), device="cuda")


def plain(h):
    logits = torch.nn.functional.linear(h, w)
    from transformers.loss.loss_utils import ForCausalLMLoss
    return ForCausalLMLoss(logits, labels, V)


def fused(h):
    return fused_linear_cross_entropy(h, w, labels)


def liger(h):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    return liger_fused_linear_cross_entropy(h[:, :-1].reshape(-1, H), w, labels[:, 1:].reshape(-1))


def run(fn, reps=10):
    h = torch.randn(4, 1024, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(h)
        loss.backward()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(reps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(h)
        loss.backward()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1000, (torch.cuda.max_memory_allocated() - base) / 2**30, loss.item()


for name, fn in [("plain", plain), ("fused", fused), ("liger", liger)]:
    try:
        ms, gib, loss = run(fn)
        print(f"{name:<8} {ms:8.2f} ms  {gib:6.2f} GiB extra  loss {loss:.5f}")
    except Exception as exc:  # report and go on
        print(name, "failed:", exc)
