#!/bin/bash
# Device run 8 of the fast path (docs/fastpath.md): run 7's questions plus the compiled memory levers, one call on
# nvidia-h200, carry [".devsite", ".peersite", ".peerbench"] (.peerbench: a copy of ../shared/bench).
# Same case helpers as fast_run6/7 (tools/fast_cases.sh): each case time-boxed, JSON lines kept in $OUT/all.jsonl.
#  0. while the 7B is written: the GPU tests of the host embedding not run yet (loader keeps it on the host; the
#     move-back half of the same-step test).
#  1. 4x1024: the default (profiled at step 6) and +hostembed in one invocation: static_gib, steady peak,
#     host_embedding_returns answer why run 6's peak did not drop.
#  2. 4x1024 compiled +offload+hostembed and +offload (the memory levers under compile, never measured at 7B).
#  3. 2x4096 compiled +offload+hostembed; 1x1024 compiled (never measured).
#  Steps 1-3 leave RESERVE seconds for 4. Unsloth 4x1024, 2x4096, 1x1024 in one process (one load, ~100 s).
#  5. with what is left: 16-bit LoRA 4x1024 compiled; packed alpaca-like compiled.
END=${END:-510}
RESERVE=${RESERVE:-195}
source "$(dirname "$0")/fast_cases.sh"
timeout 100 python3 -m pytest -q -rfE -m gpu tests/test_fast_lora.py -p no:cacheprovider \
  -k "host_embedding or embedding_on_the_host" > $OUT/tests.txt 2>&1
echo "tests rc=$? at ${SECONDS}s" | tee -a $L; grep -E "passed|failed|FAILED|ERROR" $OUT/tests.txt | tail -6 | tee -a $L
wait $BUILD; tail -2 /tmp/build.txt | tee -a $L
FULL=$END; END=$((FULL - RESERVE))
mkdir -p $OUT/prof
export TUNELAB_BENCH_PROFILE=$OUT/prof
case_ q4x1024 110 --variants tunelab-fast,tunelab-fast+hostembed --shapes 4x1024
unset TUNELAB_BENCH_PROFILE
case_ q4x1024off 110 --variants tunelab-fast+offload+hostembed,tunelab-fast+offload --shapes 4x1024
case_ q2x4096offhe 55 --variants tunelab-fast+offload+hostembed --shapes 2x4096
case_ q1x1024 50 --variants tunelab-fast --shapes 1x1024
END=$FULL
peer unsloth 230 unsloth-nf4 4x1024 2x4096 1x1024
case_ lora4x1024 70 --method lora --variants tunelab-fast --shapes 4x1024
case_ packed 60 --variants tunelab-fast:alpaca-packed --shapes 4x1024
echo "end at ${SECONDS}s" | tee -a $L
