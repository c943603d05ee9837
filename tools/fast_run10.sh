#!/bin/bash
# Device run 10 of the fast path (docs/fastpath.md; written at the end of run 9's session, not run yet): run 9's
# program again, with its hang guarded. One call on nvidia-h200, carry [".devsite", ".peersite", ".peerbench"];
# about 420 s of device time with the machine's start (END=395).
#  0. while the 7B is written: `tunelab train` of the tiny 4-bit model through the defaults (offload + host
#     embedding + compiled forwards), alone, with pytest's faulthandler dumping every thread's stack if it
#     passes 80 s (run 9: it did not finish in ~320 s, cause unknown). The other GPU tests of run 9's list passed
#     there (10) and are not repeated.
#  1. 4x1024: the default (profiled at step 6).
#  2. Unsloth 4x1024, 2x4096, 1x1024 in one process (one load, ~110 s).
#  3. the default at 2x4096, 1x1024, 16-bit LoRA 4x1024, packed alpaca-like; then 4x1024 +lorafirst and 2x4096
#     without the memory levers (the A/B pair), if time is left.
END=${END:-395}
source "$(dirname "$0")/fast_cases.sh"
timeout -k 10 ${TRAIN_TEST_S:-100} python3 -m pytest -q -rfE -m gpu tests/test_gpu.py -k qlora_train -p no:cacheprovider \
  -o faulthandler_timeout=80 > $OUT/train_test.txt 2>&1
echo "train test rc=$? at ${SECONDS}s" | tee -a $L; tail -3 $OUT/train_test.txt | tee -a $L
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
