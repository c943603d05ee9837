#!/bin/bash
# Device run 13 of the fast path (docs/fastpath.md): the table with the split recompute as the default (from 4,096
# tokens a step), with the plain path and the 50-step parity in the same lease and Unsloth beside them. One call on
# nvidia-h200, carry [".devsite", ".peersite", ".peerbench"] (.peerbench: a copy of ../shared/bench):
#   timeout -k 10 570 bash tools/fast_run13.sh $OUT
# Order (END=540 s inside the call), each tunelab case the bench's --single form (`one`, tools/fast_cases.sh):
# default 4x1024 and the plain path 4x1024, 50 steps each (the parity pair: tools/fast_parity.py on all.jsonl)
# -> Unsloth's three shapes in one process -> default 1x1024 (under the threshold: the full recompute) -> 2x4096
# -> 16-bit LoRA 4x1024 -> packed alpaca-like 4x1024 -> +lorafirst 4x1024 (never timed before); each skipped
# when fewer than 35 s are left.
OUT=${1:-${OUT:?}}; export OUT
END=${END:-540}
source "$(dirname "$0")/fast_cases.sh"
wait $BUILD; tail -2 /tmp/build.txt | tee -a $L
PAIR_STEPS=50 one d4x1024 100 tunelab-fast 4x1024
PAIR_STEPS=50 one plain4x1024 100 tunelab-plain 4x1024
peer unsloth 150 unsloth-nf4 4x1024 2x4096 1x1024
one d1x1024 70 tunelab-fast 1x1024
one d2x4096 80 tunelab-fast 2x4096
one lora4x1024 75 tunelab-fast 4x1024 --method lora
one packed 75 tunelab-fast:alpaca-packed 4x1024
one lorafirst4x1024 70 tunelab-fast+lorafirst 4x1024
echo "end at ${SECONDS}s" | tee -a $L
