#!/bin/bash
# Device run 33 of the fast path (docs/fastpath.md, "Runs 28-33"): the padded alpaca-like batches under the new
# default (layer graphs on below the split threshold), whose 60 s boxes ran out in run 32 while compiling: longer
# boxes, 16 steps; the default (lengths rounded to 8, as LLaMA-Factory pads), +pad64 (rounded to 64: fewer
# distinct lengths, so the graphs' signatures repeat) and +nographs; the GPU graphs test under the new default;
# 4 x 1024 full-length default as the regression check (graphs do not apply there).
# One call on nvidia-h200, carry [".devsite", ".peersite", ".peerbench"]:
#   END=530 timeout -k 10 550 bash tools/fast_run33.sh $OUT
OUT=${1:-${OUT:?}}; export OUT
END=${END:-530}
source "$(dirname "$0")/fast_cases.sh"
gpu_tests t_graphs 70 tests/test_fast_graphs.py
wait $BUILD; tail -2 /tmp/build.txt | tee -a $L
PAIR_STEPS=16 one a4_pad64 150 tunelab-fast+pad64:alpaca 4x1024
PAIR_STEPS=16 one a4_default 140 tunelab-fast:alpaca 4x1024
PAIR_STEPS=16 one a4_nographs 110 tunelab-fast+nographs:alpaca 4x1024
one d4_default 55 tunelab-fast 4x1024
echo "end at ${SECONDS}s" | tee -a $L
