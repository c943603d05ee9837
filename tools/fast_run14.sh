#!/bin/bash
# Device run 14 of the fast path (docs/fastpath.md; written for the next lease, not run yet): what runs 12-13 left
# open. One call on nvidia-h200, carry [".devsite", ".peersite", ".peerbench"] (.peerbench: ../shared/bench):
#   timeout -k 10 570 bash tools/fast_run14.sh $OUT
# Order (END=560 s inside the call), each tunelab case the bench's --single form (`one`, tools/fast_cases.sh):
#  0. while the 7B is written: the GPU tests of the fused ops, the split and the NF4 kernel (the ops' new form has
#     not run on a GPU yet), boxed 120 s;
# (reordered at the start of session #5: the default at 4 x 1024 with step 6 profiled comes first and is also the
#  default's measurement, the median of 10 steps barely moves for one profiled step; then the A/Bs in this order)
#  1. the Library-defined opaque ops (the default since runs 12-13) against their custom_op form
#     (TUNELAB_CUSTOM_OP=1): 4 x 1024 and 1 x 1024, one lease (predicted: a few ms of host time a step);
#     and the fused first pass again (TUNELAB_FUSED_FIRST_PASS=1: run 12 measured it 11% slower with the
#     custom_op form, whose host dispatch it multiplies);
#     and gate/up as one function (+groupgu, TUNELAB_GROUP_GATE_UP=1, never run on a GPU) at 4 x 1024 and 1 x 1024;
#  2. Unsloth's 16-bit LoRA 4 x 1024 in the same lease (the 16-bit target's comparison; PEERS.md's is older);
#  3. profiles (step 6; the bench's tables by CUDA and by CPU time, in $OUT/prof): the default at 4 x 1024 (the
#     split step, never profiled), and 1 x 1024 with the split forced on (TUNELAB_SPLIT_MIN_TOKENS=0) and off:
#     why the split costs ~3 ms a layer of host time at 1 x 1024 (runs 12-13);
#  each skipped when fewer than 35 s are left.
OUT=${1:-${OUT:?}}; export OUT
END=${END:-560}
source "$(dirname "$0")/fast_cases.sh"
echo "== gpu tests (at ${SECONDS}s)" | tee -a $L
timeout -k 5 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fast_lora.py tests/test_fast_split.py \
  tests/test_fast_group.py tests/test_nf4_triton.py > $OUT/gpu_tests.txt 2>&1; echo "rc=$? at ${SECONDS}s" | tee -a $L
tail -3 $OUT/gpu_tests.txt | tee -a $L
wait $BUILD; tail -2 /tmp/build.txt | tee -a $L
mkdir -p $OUT/prof
TUNELAB_BENCH_PROFILE=$OUT/prof one prof4x1024 80 tunelab-fast 4x1024
TUNELAB_CUSTOM_OP=1 one co4x1024 75 tunelab-fast 4x1024
one gu4x1024 70 tunelab-fast+groupgu 4x1024
TUNELAB_BENCH_PROFILE=$OUT/prof one prof1nosplit 65 tunelab-fast+nosplit 1x1024
TUNELAB_CUSTOM_OP=1 one co1x1024 65 tunelab-fast 1x1024
one gu1x1024 65 tunelab-fast+groupgu 1x1024
one ff4x1024 70 tunelab-fast+fusedfirst 4x1024
TUNELAB_BENCH_PROFILE=$OUT/prof TUNELAB_SPLIT_MIN_TOKENS=0 one prof1split 70 tunelab-fast+split 1x1024
peer unsloth16 110 unsloth-bf16 4x1024
echo "end at ${SECONDS}s" | tee -a $L
