#!/bin/bash
# Device run 12 of the fast path (docs/fastpath.md): the split recompute (model/fast/split.py: the backward without
# the o and down products recomputed) and the fused first pass, against the previous default in one lease.
# One call on nvidia-h200, carry [".devsite"]:
#   timeout -k 10 450 bash tools/fast_run12.sh $OUT
# Order (END=420 s inside the call): the 7B is written in the background while the GPU tests of the split and the
# offload run (box 110 s); then each case the bench's --single form (`one`, tools/fast_cases.sh), 13 steps:
# new default 4x1024 -> previous default (+nosplit+nofusedfirst) 4x1024 -> fused first pass only (+nosplit)
# 4x1024 -> new default 2x4096 -> 1x1024 -> the plain path 4x1024; each skipped when fewer than 35 s are left.
OUT=${1:-${OUT:?}}; export OUT
END=${END:-420}
source "$(dirname "$0")/fast_cases.sh"
echo "== gpu tests (at ${SECONDS}s)" | tee -a $L
timeout -k 5 110 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fast_split.py tests/test_fast_lora.py \
  -k "split or offload or loader" > $OUT/gpu_tests.txt 2>&1; echo "rc=$? at ${SECONDS}s" | tee -a $L
tail -5 $OUT/gpu_tests.txt | tee -a $L
wait $BUILD; tail -2 /tmp/build.txt | tee -a $L
one split4x1024 85 tunelab-fast 4x1024
one prev4x1024 75 tunelab-fast+nosplit+nofusedfirst 4x1024
one ff4x1024 75 tunelab-fast+nosplit 4x1024
one split2x4096 85 tunelab-fast 2x4096
one split1x1024 70 tunelab-fast 1x1024
one plain4x1024 75 tunelab-plain 4x1024
echo "end at ${SECONDS}s" | tee -a $L
