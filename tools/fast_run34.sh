#!/bin/bash
# Device run 34 of the fast path (docs/fastpath.md, "Runs 28-34"): CUDA graphs over the split recompute's calls
# (TUNELAB_SPLIT_GRAPHS=1, bench +splitgraphs). Run 33 found the padded alpaca-like batches host-bound (0.45-0.65 s a
# step whatever their 1,000-3,800 tokens: 1,153 real tok/s, the plain stack's speed) in the split path and in the
# full recompute alike (dynamic shapes), the graphs used only where a padded length repeated. Here: the GPU tests
# (the new split capture against the uncaptured split), 4 x 1024 with and without, the padded set over 40 steps
# with lengths rounded to 128 (+pad128: 7 lengths, each captured at its second sighting) against the default, and
# 2 x 4096 last.
# One call on nvidia-h200, carry [".devsite", ".peersite", ".peerbench"]:
#   END=540 timeout -k 10 560 bash tools/fast_run34.sh $OUT
OUT=${1:-${OUT:?}}; export OUT
END=${END:-540}
source "$(dirname "$0")/fast_cases.sh"
gpu_tests t_graphs 80 tests/test_fast_graphs.py
wait $BUILD; tail -2 /tmp/build.txt | tee -a $L
one d4_sg 55 tunelab-fast+splitgraphs 4x1024
one d4_default 50 tunelab-fast 4x1024
PAIR_STEPS=40 one a4_sg128 160 tunelab-fast+splitgraphs+pad128:alpaca 4x1024
PAIR_STEPS=40 one a4_default 140 tunelab-fast:alpaca 4x1024
one d8_sg 55 tunelab-fast+splitgraphs 2x4096
echo "end at ${SECONDS}s" | tee -a $L
