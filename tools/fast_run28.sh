#!/bin/bash
# Device run 28 of the fast path (docs/fastpath.md, "Runs 24-27", written for the next lease): the kept gate/up
# outputs (TUNELAB_KEEP_GATE_UP=3, bench +keepgu3) with their device copies now allocated on the stream that uses
# them (offload.HostStash._fetch: runs 25-26 reserved +1.4-5.6 GiB with them on the side stream's pool). The host
# link probe again (both directions at once with both host buffers pinned: run 25's second buffer was not), the
# split's GPU tests (the kept outputs eager bit for bit and compiled), then 2 x 4096 and 4 x 1024 alternated ABAB:
# does N=3 pay where the step has the most time per copied byte, and is its reserved memory back near the default's?
# One call on nvidia-h200, carry [".devsite"]:
#   END=560 timeout -k 10 580 bash tools/fast_run28.sh $OUT
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
s1, s2 = torch.cuda.Stream(), torch.cuda.Stream(); d2 = torch.empty_like(d); h2 = torch.empty(n, dtype=torch.bfloat16, pin_memory=True)
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
  one d2x4096_default 65 tunelab-fast 2x4096
  one d2x4096_keep3 65 tunelab-fast+keepgu3 2x4096
done
for r in 1 2; do
  one d4_default 50 tunelab-fast 4x1024
  one d4_keep3 50 tunelab-fast+keepgu3 4x1024
done
echo "end at ${SECONDS}s" | tee -a $L
