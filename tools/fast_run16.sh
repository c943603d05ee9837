#!/bin/bash
# Device run 16 of the fast path (docs/fastpath.md): the session's final defaults (run 15's, with 16-bit gate/up
# kept as two projections and gate/up's forward as one augmented GEMM) measured at every shape, with Unsloth and
# the 50-step parity in the same lease. One call on nvidia-h200, carry [".devsite", ".peersite", ".peerbench"]:
#   END=540 timeout -k 10 560 bash tools/fast_run16.sh $OUT
# Order: the GPU tests of what changed (the strided NF4 store, the augmented pair, the loader's applied list, the
# loss kernel; boxed 100 s beside the 7B's build) -> the default 4 x 1024 with step 6 profiled and its timeline
# (TUNELAB_BENCH_TRACE=1) -> Unsloth's three shapes -> the 50-step pair (the default, the fast path off) ->
# 1 x 1024, 2 x 4096, 16-bit 4 x 1024, packed -> +noaugment 4 x 1024 (the A/B of the augmented GEMM); each skipped
# when fewer than 35 s are left.
OUT=${1:-${OUT:?}}; export OUT
END=${END:-540}
source "$(dirname "$0")/fast_cases.sh"
echo "== gpu tests (at ${SECONDS}s)" | tee -a $L
timeout -k 5 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fast_group.py tests/test_nf4_triton.py \
  tests/test_fast_lora.py tests/test_ce_triton.py > $OUT/gpu_tests.txt 2>&1; echo "rc=$? at ${SECONDS}s" | tee -a $L
tail -3 $OUT/gpu_tests.txt | tee -a $L
if grep -q "FAILED tests/test_fast_group" $OUT/gpu_tests.txt; then export TUNELAB_PAIR_AUGMENT=0; echo "augmented pair: GPU test failed, off" | tee -a $L; fi
wait $BUILD; tail -2 /tmp/build.txt | tee -a $L
mkdir -p $OUT/prof
TUNELAB_BENCH_TRACE=1 TUNELAB_BENCH_PROFILE=$OUT/prof one d4x1024 80 tunelab-fast 4x1024
peer unsloth 150 unsloth-nf4 4x1024 2x4096 1x1024
PAIR_STEPS=50 one p50fast 80 tunelab-fast 4x1024
PAIR_STEPS=50 one p50plain 95 tunelab-plain 4x1024
one d1x1024 60 tunelab-fast 1x1024
one d2x4096 65 tunelab-fast 2x4096
one lora4x1024 60 tunelab-fast 4x1024 --method lora
one packed 70 tunelab-fast:alpaca-packed 4x1024
one noaug4x1024 60 tunelab-fast+noaugment 4x1024
echo "end at ${SECONDS}s" | tee -a $L
