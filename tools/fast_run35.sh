#!/bin/bash
# Device run 35 of the fast path (docs/fastpath.md, "Runs 28-35"): the new defaults for padded batches: the split
# recompute's calls graphed below 4,096 tokens (TUNELAB_SPLIT_GRAPHS, TUNELAB_SPLIT_GRAPH_MAX_TOKENS), lengths
# bucketed to a multiple of 64 giving at most 8 lengths up to the cutoff where the graphs are on (1,024: 128), the
# capture stream's cached blocks handed back after a capturing step (graphs.trim). The GPU tests; the padded
# alpaca-like set over 80 steps, the default against the previous one (+nosplitgraphs+pad8); 4 x 1024 full rows
# (4,096 tokens: not graphed) as the regression check.
# One call on nvidia-h200, carry [".devsite", ".peersite", ".peerbench"]:
#   END=470 timeout -k 10 490 bash tools/fast_run35.sh $OUT
OUT=${1:-${OUT:?}}; export OUT
END=${END:-470}
source "$(dirname "$0")/fast_cases.sh"
gpu_tests t_graphs 80 tests/test_fast_graphs.py
wait $BUILD; tail -2 /tmp/build.txt | tee -a $L
PAIR_STEPS=80 one a4_default 150 tunelab-fast:alpaca 4x1024
PAIR_STEPS=80 one a4_before 145 tunelab-fast+nosplitgraphs+pad8:alpaca 4x1024
one d4_default 45 tunelab-fast 4x1024
echo "end at ${SECONDS}s" | tee -a $L
