#!/bin/bash
# Device run 32 of the fast path (docs/fastpath.md, "Runs 28-32"): the layer graphs on by default below the split
# threshold (graphs.enabled). Run 31's lines were lost with its session's files, so this is its 1 x 1024 program
# again with the new default: the default (graphs on) and +nographs, Unsloth at 1 x 1024 in the same lease, the
# 50-step pair (the default against the fast path off), and the padded alpaca-like batches, whose lengths change
# from batch to batch (a new graph signature each; at most graphs.MAX_SIGNATURES captured per layer).
# One call on nvidia-h200, carry [".devsite", ".peersite", ".peerbench"]:
#   END=530 timeout -k 10 550 bash tools/fast_run32.sh $OUT
OUT=${1:-${OUT:?}}; export OUT
END=${END:-530}
source "$(dirname "$0")/fast_cases.sh"
wait $BUILD; tail -2 /tmp/build.txt | tee -a $L
one d1_default 60 tunelab-fast 1x1024
peer unsloth1 100 unsloth-nf4 1x1024
one d1_nographs 55 tunelab-fast+nographs 1x1024
PAIR_STEPS=50 one p50default 75 tunelab-fast 1x1024
PAIR_STEPS=50 one p50plain 90 tunelab-plain 1x1024
one a4_default 60 tunelab-fast:alpaca 4x1024
one a4_nographs 60 tunelab-fast+nographs:alpaca 4x1024
echo "end at ${SECONDS}s" | tee -a $L
