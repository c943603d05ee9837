#!/bin/bash
# Device run 28 of the fast path (docs/fastpath.md, "Runs 24-27", written for the next lease): the kept gate/up
# outputs (TUNELAB_KEEP_GATE_UP=3, bench +keepgu3) with their device copies now allocated on the stream that uses
# them (offload.HostStash._fetch: runs 25-26 reserved +1.4-5.6 GiB with them on the side stream's pool). The host
# link probe again (both directions at once with both host buffers pinned: run 25's second buffer was not), the
# split's GPU tests (the kept outputs eager bit for bit and compiled), then the last layers' outputs kept on the GPU
# only (TUNELAB_KEEP_GATE_UP_ON_GPU=K, +keepgpu<K>: no copies, pure work removal within the memory left under
# Unsloth's peak: K=3 at 4 x 1024, 6.57 GiB by `tunelab estimate`, which gives the default 5.70 for its measured
# 5.53; K=2 at 2 x 4096 7.74, the default 6.59 for 6.54) against the default, alternated,
# and N=3 once more at 2 x 4096 (its reserved memory with the copies' new allocation).
# One call on nvidia-h200, carry [".devsite"]:
#   END=560 timeout -k 10 580 bash tools/fast_run28.sh $OUT
OUT=${1:-${OUT:?}}; export OUT
END=${END:-560}
source "$(dirname "$0")/fast_cases.sh"
link_probe
gpu_tests gpu_tests 110 tests/test_fast_split.py
wait $BUILD; tail -2 /tmp/build.txt | tee -a $L
for r in 1 2; do
  one d4_default 50 tunelab-fast 4x1024
  one d4_keepgpu3 50 tunelab-fast+keepgpu3 4x1024
done
one d2x4096_default 60 tunelab-fast 2x4096
one d2x4096_keepgpu2 60 tunelab-fast+keepgpu2 2x4096
one d2x4096_keep3 60 tunelab-fast+keepgu3 2x4096
one d2x4096_default 60 tunelab-fast 2x4096
one d2x4096_keepgpu2 60 tunelab-fast+keepgpu2 2x4096
echo "end at ${SECONDS}s" | tee -a $L
