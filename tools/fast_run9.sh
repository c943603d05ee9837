#!/bin/bash
# Device run 9 of the fast path (docs/fastpath.md): the new defaults (checkpoint offload + host embedding, on since
# run 8) at every shape, Unsloth in the same lease, one A/B; one call on nvidia-h200, carry
# [".devsite", ".peersite", ".peerbench"]. Case helpers: tools/fast_cases.sh (each case time-boxed, JSON lines
# kept in $OUT/all.jsonl as they finish).
#  0. while the 7B is written: the GPU tests of this session's changes (loader defaults, the host table staying
#     on the host, the LoRA-first order, the once-per-layer kernel choice, a `tunelab train` run through the new
#     defaults: offload + host embedding + compiled forwards).
#  1. 4x1024: the default (profiled at step 6).
#  2. Unsloth 4x1024, 2x4096, 1x1024 in one process (one load, ~110 s).
#  3. the default at 2x4096, 1x1024, 16-bit LoRA 4x1024, packed alpaca-like; then, if time is left, 4x1024
#     +lorafirst and 2x4096 without the memory levers.
END=${END:-395}
source "$(dirname "$0")/fast_cases.sh"
# run 9 hung here: the tests' timeout sent SIGTERM while `tunelab train` (test_qlora_train_on_gpu) was in its
# training loop, whose graceful-stop handler takes the first SIGTERM; -k 10 kills it 10 s later
timeout -k 10 ${TESTS_S:-110} python3 -m pytest -q -rfE -m gpu tests/test_fast_lora.py tests/test_nf4_triton.py tests/test_gpu.py -p no:cacheprovider \
  -k "loader or host_embedding or offloaded_checkpoints or fused_nf4_and_dense or dense_weight or qlora_train" > $OUT/tests.txt 2>&1
echo "tests rc=$? at ${SECONDS}s" | tee -a $L; grep -E "passed|failed|FAILED|ERROR" $OUT/tests.txt | tail -8 | tee -a $L
wait $BUILD; tail -2 /tmp/build.txt | tee -a $L
mkdir -p $OUT/prof
export TUNELAB_BENCH_PROFILE=$OUT/prof
case_ q4x1024 55 --variants tunelab-fast --shapes 4x1024
unset TUNELAB_BENCH_PROFILE
peer unsloth 150 unsloth-nf4 4x1024 2x4096 1x1024
case_ q2x4096 55 --variants tunelab-fast --shapes 2x4096
case_ q1x1024 45 --variants tunelab-fast --shapes 1x1024
case_ lora4x1024 50 --method lora --variants tunelab-fast --shapes 4x1024
case_ packed 50 --variants tunelab-fast:alpaca-packed --shapes 4x1024
case_ q4x1024lf 50 --variants tunelab-fast+lorafirst --shapes 4x1024
case_ q2x4096old 50 --variants tunelab-fast+nooffload+nohostembed --shapes 2x4096
echo "end at ${SECONDS}s" | tee -a $L
