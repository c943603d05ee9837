#!/bin/bash
# Device run 29 of the fast path (docs/fastpath.md, "Runs 28-29"): CUDA graphs over the offloaded layers' compiled
# calls below the split's threshold (model/fast/graphs.py, TUNELAB_LAYER_GRAPHS=1, bench +graphs): their GPU test
# (real capture over inductor's layers, NF4, against the uncaptured offload), then 1 x 1024 (host-bound: run 22's
# profile had the kernels busy 95 of 414 ms) default and +graphs alternated twice, Unsloth's 1 x 1024 in the same
# lease, and a 2 x 4096 pair of the kept gate/up outputs (N=3) against the default (run 28: 12,988 against
# 12,716 / 12,767).
# One call on nvidia-h200, carry [".devsite", ".peersite", ".peerbench"]:
#   END=560 timeout -k 10 580 bash tools/fast_run29.sh $OUT
OUT=${1:-${OUT:?}}; export OUT
END=${END:-560}
source "$(dirname "$0")/fast_cases.sh"
gpu_tests gpu_tests 110 tests/test_fast_graphs.py
wait $BUILD; tail -2 /tmp/build.txt | tee -a $L
for r in 1 2; do
  one d1_default 50 tunelab-fast 1x1024
  one d1_graphs 55 tunelab-fast+graphs 1x1024
done
peer unsloth1 75 unsloth-nf4 1x1024
one d2x4096_keep3 60 tunelab-fast+keepgu3 2x4096
one d2x4096_default 60 tunelab-fast 2x4096
echo "end at ${SECONDS}s" | tee -a $L
