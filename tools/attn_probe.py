"""Which SDPA backend trains attention fastest on this GPU (a device probe: prints one JSON line per case).

    python3 tools/attn_probe.py [--shapes 4x1024,2x4096,1x1024] [--heads 28 --kv-heads 4 --head-dim 128]

The fast path's decoder layers call SDPA as transformers does with no padding mask: causal, bf16, and grouped-query
attention through `enable_gqa=True` (transformers' use_gqa_in_sdpa) rather than repeated key/value heads. For each
shape and each backend (flash, efficient, cudnn) this times the forward, and the forward + backward, with CUDA events
(median of 20 after 5 warm-up calls), with enable_gqa and with the key/value heads repeated (repeat_kv), and checks
the output and input gradients against the math backend in fp32 on the same inputs (max abs difference). A backend
that refuses the inputs is reported with its reason instead of a time. Also printed: which backend SDPA picks by
default (`torch._fused_sdp_choice`).
"""
from __future__ import annotations

import argparse
import json
import statistics


def main() -> None:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4x1024,2x4096,1x1024")
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    dev = torch.device("cuda")
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION}
    names = {int(v): k for k, v in backends.items()}
    names[int(SDPBackend.MATH)] = "math"

    def timed(fn):
        for _ in range(5):
            fn()
        times = []
        for _ in range(args.iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times)

    for shape in args.shapes.split(","):
        bsz, seq = (int(v) for v in shape.split("x"))
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(bsz, args.heads, seq, args.head_dim, device=dev, generator=g, dtype=torch.bfloat16)
        k = torch.randn(bsz, args.kv_heads, seq, args.head_dim, device=dev, generator=g, dtype=torch.bfloat16)
        v = torch.randn(bsz, args.kv_heads, seq, args.head_dim, device=dev, generator=g, dtype=torch.bfloat16)
        go = torch.randn(bsz, args.heads, seq, args.head_dim, device=dev, generator=g, dtype=torch.bfloat16)
        rep = args.heads // args.kv_heads
        try:
            choice = names.get(int(torch._fused_sdp_choice(q, k, v, is_causal=True, enable_gqa=True)), "?")
        except Exception as exc:  # a private helper: its absence is reported, not fatal
            choice = f"unknown ({type(exc).__name__})"
        # reference: math backend in fp32 on (at most) the first row
        qr, kr, vr = (t[:1].float().requires_grad_(True) for t in (q, k, v))
        gr = go[:1].float()
        with sdpa_kernel(SDPBackend.MATH):
            ref = F.scaled_dot_product_attention(qr, kr, vr, is_causal=True, enable_gqa=True)
            ref.backward(gr)
        for gqa in (True, False):
            for name, be in backends.items():
                row = {"shape": shape, "backend": name, "enable_gqa": gqa, "default_choice": choice}
                qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))

                def fwd():
                    kx, vx = (kk, vv) if gqa else (kk.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1))
                    return F.scaled_dot_product_attention(qq, kx, vx, is_causal=True, enable_gqa=gqa)

                def fwd_bwd():
                    out = fwd()
                    torch.autograd.grad(out, (qq, kk, vv), go)

                try:
                    with sdpa_kernel(be):
                        out = fwd()
                        dq, dk, dv = torch.autograd.grad(out, (qq, kk, vv), go)
                        row["fwd_ms"] = round(timed(lambda: fwd()), 4)
                        row["fwd_bwd_ms"] = round(timed(fwd_bwd), 4)
                    row["max_err_out"] = float((out[:1].float() - ref).abs().max())
                    row["max_err_dq"] = float((dq[:1].float() - qr.grad).abs().max())
                    row["max_err_dk"] = float((dk[:1].float() - kr.grad).abs().max())
                    row["max_err_dv"] = float((dv[:1].float() - vr.grad).abs().max())
                except RuntimeError as exc:
                    row["error"] = str(exc).splitlines()[0][:300]
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
