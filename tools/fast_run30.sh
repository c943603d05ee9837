#!/bin/bash
# Device run 30 of the fast path (docs/fastpath.md, "Runs 28-30"): the layer graphs (TUNELAB_LAYER_GRAPHS=1, bench
# +graphs) after run 29, with one capture stream for all captures (run 29's stream per capture held a 19.1 GiB pool
# and +1.7 GiB allocated), the GPU test's bound at bf16 rounding; 1 x 1024 +graphs, the default, Unsloth in the
# same lease, +graphs again, then the 50-step pair at 1 x 1024 (+graphs against the fast path off).
# One call on nvidia-h200, carry [".devsite", ".peersite", ".peerbench"]:
#   END=530 timeout -k 10 550 bash tools/fast_run30.sh $OUT
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
echo "end at ${SECONDS}s" | tee -a $L
