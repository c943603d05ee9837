#!/bin/bash
# Device run 10 of the fast path (docs/fastpath.md). One call on nvidia-h200, carry [".devsite", ".peersite",
# ".peerbench"]; about 420 s of device time with the machine's start (END=395).
# Run 10 as first written (session 2026-12-02 #2) measured only Unsloth: the tiny train test passed (75 s) and
# then each tunelab case hit its box (55/55/45 s) before printing its JSON line, on a host slower than run 8's
# (docs/fastpath.md, "Run 10"). So, for the next call:
#  0. the tiny 4-bit `tunelab train` GPU test only if TRAIN_TEST_S > 0 (it passed in two leases: 66 s, 75 s).
#  1. 4x1024: the default (profiled at step 6), then 2x4096, each boxed 80-85 s (run 10: >55 s per process).
#  2. Unsloth 4x1024, 2x4096, 1x1024 in one process (one load; 132 s in run 10).
#  3. the default at 1x1024, 16-bit LoRA 4x1024, packed alpaca-like; then 4x1024 +lorafirst and 2x4096 without
#     the memory levers (the A/B pair), if time is left (at END=395 none of step 3 fits: ~350 s more).
END=${END:-395}
source "$(dirname "$0")/fast_cases.sh"
if [ "${TRAIN_TEST_S:-0}" -gt 0 ]; then
  timeout -k 10 $TRAIN_TEST_S python3 -m pytest -q -rfE -m gpu tests/test_gpu.py -k qlora_train -p no:cacheprovider \
    -o faulthandler_timeout=80 > $OUT/train_test.txt 2>&1
  echo "train test rc=$? at ${SECONDS}s" | tee -a $L; tail -3 $OUT/train_test.txt | tee -a $L
fi
wait $BUILD; tail -2 /tmp/build.txt | tee -a $L
mkdir -p $OUT/prof
export TUNELAB_BENCH_PROFILE=$OUT/prof
case_ q4x1024 85 --variants tunelab-fast --shapes 4x1024
unset TUNELAB_BENCH_PROFILE
case_ q2x4096 80 --variants tunelab-fast --shapes 2x4096
peer unsloth 150 unsloth-nf4 4x1024 2x4096 1x1024
case_ q1x1024 70 --variants tunelab-fast --shapes 1x1024
case_ lora4x1024 75 --method lora --variants tunelab-fast --shapes 4x1024
case_ packed 75 --variants tunelab-fast:alpaca-packed --shapes 4x1024
case_ q4x1024lf 75 --variants tunelab-fast+lorafirst --shapes 4x1024
case_ q2x4096old 75 --variants tunelab-fast+nooffload+nohostembed --shapes 2x4096
echo "end at ${SECONDS}s" | tee -a $L
