#!/bin/bash
# Device run 25 of the fast path (docs/fastpath.md, "Run 24 and 25"): gate/up's output kept from the first pass
# for some layers (TUNELAB_KEEP_GATE_UP=N, bench +keepgu<N>: split.keep_layers; the last layer's on the GPU, the
# others in pinned host memory on their own stream), so their backward skips the pair's GEMM (272 of the layer's
# ~1,700 MFLOP a token). First the host link's copy rate (one 310 MB tensor, 4 x 1024's gate/up output, pinned,
# each way: what bounds N), the GPU tests of the kept outputs and the split, then 4 x 1024 by default, with N=3 and
# N=2, alternated twice; 2 x 4096 default and N=3; the packed case with N=3.
# One call on nvidia-h200, carry [".devsite"]:
#   END=560 timeout -k 10 580 bash tools/fast_run25.sh $OUT
OUT=${1:-${OUT:?}}; export OUT
END=${END:-560}
source "$(dirname "$0")/fast_cases.sh"
timeout 60 python3 - <<'PY' 2>&1 | tee -a $L
import torch, time
n = 4096 * 37888  # bf16 elements of one gate/up output at 4 x 1024 (7B)
d = torch.empty(n, dtype=torch.bfloat16, device="cuda"); h = torch.empty(n, dtype=torch.bfloat16, pin_memory=True)
for name, dst, src in (("d2h", h, d), ("h2d", d, h)):
    for _ in range(2): dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(5): dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 5
    print(f"pcie {name}: {2 * n / dt / 1e9:.1f} GB/s, {dt * 1e3:.2f} ms for {2 * n / 1e6:.0f} MB")
s1, s2 = torch.cuda.Stream(), torch.cuda.Stream(); d2 = torch.empty_like(d); h2 = torch.empty_like(h)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(5):
    with torch.cuda.stream(s1): h.copy_(d, non_blocking=True)
    with torch.cuda.stream(s2): d2.copy_(h2, non_blocking=True)
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 5
print(f"pcie both ways at once: {2 * n / dt / 1e9:.1f} GB/s each")
PY
gpu_tests gpu_tests 110 tests/test_fast_split.py
wait $BUILD; tail -2 /tmp/build.txt | tee -a $L
for r in 1 2; do
  one d4_default 55 tunelab-fast 4x1024
  one d4_keep3 55 tunelab-fast+keepgu3 4x1024
  one d4_keep2 55 tunelab-fast+keepgu2 4x1024
done
one d2x4096_default 65 tunelab-fast 2x4096
one d2x4096_keep3 65 tunelab-fast+keepgu3 2x4096
one packed_keep3 60 tunelab-fast+keepgu3:alpaca-packed 4x1024
echo "end at ${SECONDS}s" | tee -a $L
