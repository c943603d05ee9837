#!/bin/bash
# Device run 6 of the fast path (docs/fastpath.md): the README table, one call on nvidia-h200, carry
# [".devsite", ".peersite", ".peerbench"] (.peerbench: a copy of ../shared/bench). Each case is time-boxed
# against END seconds and its JSON line lands in $OUT/all.jsonl as soon as it ends (a cut run keeps what finished).
#  1. GPU tests (fast path incl. compile, host embedding, offload + compile; tests/test_gpu.py: a tunelab train run
#     on the new defaults) while the random-init 7B is written.
#  2. by priority: 7B QLoRA 4x1024 tunelab-fast (the default: fused projections, compiled layers, host embedding)
#     and tunelab-plain in ONE invocation; Unsloth 4x1024 in its own process (.peersite first on its path only);
#     2x4096 pair; 1x1024 pair; 2x4096 +offload; 4x1024 +offload; 16-bit LoRA pair; packed alpaca-like pair.
END=${END:-380}
source "$(dirname "$0")/fast_cases.sh"
timeout 150 python3 -m pytest -q -rfE -m gpu tests/test_fast_lora.py tests/test_gpu.py -p no:cacheprovider > $OUT/tests.txt 2>&1
echo "tests rc=$? at ${SECONDS}s" | tee -a $L; grep -E "passed|failed|FAILED|ERROR" $OUT/tests.txt | tail -8 | tee -a $L
wait $BUILD; tail -2 /tmp/build.txt | tee -a $L
case_ q4x1024 130 --variants tunelab-fast,tunelab-plain --steps $PAIR_STEPS --shapes 4x1024
peer unsloth 100 unsloth-nf4 4x1024
case_ q2x4096 120 --variants tunelab-fast,tunelab-plain --shapes 2x4096
case_ q1x1024 80 --variants tunelab-fast,tunelab-plain --shapes 1x1024
case_ q2x4096off 60 --variants tunelab-fast+offload --shapes 2x4096
case_ q4x1024off 60 --variants tunelab-fast+offload --shapes 4x1024
case_ lora4x1024 110 --method lora --variants tunelab-fast,tunelab-plain --shapes 4x1024
case_ packed 110 --variants tunelab-fast:alpaca-packed,tunelab-plain:alpaca-packed --shapes 4x1024
python3 tools/fast_parity.py $OUT/all.jsonl | tee -a $L
echo "end at ${SECONDS}s" | tee -a $L
