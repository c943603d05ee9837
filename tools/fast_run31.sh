#!/bin/bash
# Device run 31 of the fast path (docs/fastpath.md, "Runs 28-31"): run 30's program again (its raw lines were lost
# with the session's files: the figures are in the docs from its log), then what the layer graphs do at 4 x 1024
# where the split recompute is the default (+nosplit+graphs: every call graphed, the pool's size at 4,096 tokens).
# One call on nvidia-h200, carry [".devsite", ".peersite", ".peerbench"]:
#   END=530 timeout -k 10 550 bash tools/fast_run31.sh $OUT
OUT=${1:-${OUT:?}}; export OUT
END=${END:-530}
source "$(dirname "$0")/fast_cases.sh"
gpu_tests gpu_tests 100 tests/test_fast_graphs.py
wait $BUILD; tail -2 /tmp/build.txt | tee -a $L
one d1_graphs 60 tunelab-fast+graphs 1x1024
one d1_default 60 tunelab-fast 1x1024
peer unsloth1 100 unsloth-nf4 1x1024
one d1_graphs 60 tunelab-fast+graphs 1x1024
PAIR_STEPS=50 one p50graphs 75 tunelab-fast+graphs 1x1024
PAIR_STEPS=50 one p50plain 90 tunelab-plain 1x1024
one d4_nosplit_graphs 70 tunelab-fast+nosplit+graphs 4x1024
one d4_default 60 tunelab-fast 4x1024
echo "end at ${SECONDS}s" | tee -a $L
