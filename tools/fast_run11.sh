#!/bin/bash
# Device run 11 of the fast path (docs/fastpath.md): the same-lease table run 10 did not produce. One call on
# nvidia-h200, carry [".devsite", ".peersite", ".peerbench"] (.peerbench: a copy of ../shared/bench):
#   export PYTHONPATH=$PWD/.devsite:$PWD/src:$PYTHONPATH; timeout -k 10 420 bash tools/fast_run11.sh $OUT
# Run 10's tunelab cases all hit their 45-55 s boxes before their JSON line: each went through the bench's parent
# process (its own torch import and CUDA init, then the `--single` child, whose output it holds until the child has
# exited), and nothing of a timed-out case survived. Here each case is `one` (tools/fast_cases.sh): the `--single`
# form run directly, its output polled into $OUT/progress.txt with the script's seconds, stopped 5 s after its
# result line, boxed 70-85 s. No profile, no GPU tests. Order (END=400 s inside the call):
#  build the 7B (~60 s) -> default 4x1024 -> default 2x4096 -> Unsloth 4x1024, 2x4096, 1x1024 in one process
#  (one load; 132 s in run 10) -> default 1x1024 -> 16-bit LoRA 4x1024 -> packed alpaca-like -> plain path
#  4x1024, each skipped when fewer than 35 s are left.
# Ran as run 11 (session 2026-12-02 #3): every case up to the packed one printed its result (31-47 s a case,
# 371 s in all, 456 s of device budget); the plain path was skipped for time. Figures: docs/fastpath.md, "Run 11".
OUT=${1:-${OUT:?}}; export OUT
END=${END:-400}
source "$(dirname "$0")/fast_cases.sh"
wait $BUILD; tail -2 /tmp/build.txt | tee -a $L
one q4x1024 85 tunelab-fast 4x1024
one q2x4096 85 tunelab-fast 2x4096
peer unsloth 150 unsloth-nf4 4x1024 2x4096 1x1024
one q1x1024 70 tunelab-fast 1x1024
one lora4x1024 75 tunelab-fast 4x1024 --method lora
one packed 75 tunelab-fast:alpaca-packed 4x1024
one plain4x1024 75 tunelab-plain 4x1024
echo "end at ${SECONDS}s" | tee -a $L
