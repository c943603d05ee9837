#!/bin/bash
# Device run 36 of the fast path (docs/fastpath.md, "Run 36"): gate/up's output kept for the backward, re-measured
# since the stash's prefetch fix (runs 25-26 ran with the defect: below each kept layer the next h2 came back only
# when asked for) and the copies back allocated on the stream that uses them; the last K layers kept on the GPU
# (+keepgpu, never measured). 4 x 1024 alternated default / +keepgu3 / +keepgu3+keepgpu2, twice; 2 x 4096 default
# against +keepgu3; Unsloth 4 x 1024 in the same lease. nvidia-smi samples clocks, power and throttle reasons every
# 0.5 s (smi.csv; the log stamps each case's wall-clock start) to tell a GPU at its power cap from one waiting.
# One call, carry [".devsite", ".peersite", ".peerbench"]:
#   END=530 timeout -k 10 550 bash tools/fast_run36.sh $OUT
OUT=${1:-${OUT:?}}; export OUT
END=${END:-530}
source "$(dirname "$0")/fast_cases.sh"
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_throttle_reasons.active,utilization.gpu --format=csv,noheader -lms 500 > $OUT/smi.csv 2>&1 &
SMI=$!
at() { echo "wall $(date +%T) before $1" | tee -a $L; }
link_probe
wait $BUILD; tail -2 /tmp/build.txt | tee -a $L
for r in 1 2; do
  at d4_default$r; one d4_default$r 50 tunelab-fast 4x1024
  at d4_keepgu3_$r; one d4_keepgu3_$r 50 tunelab-fast+keepgu3 4x1024
  at d4_keepgu3gpu2_$r; one d4_keepgu3gpu2_$r 50 tunelab-fast+keepgu3+keepgpu2 4x1024
done
at d8_default; one d8_default 65 tunelab-fast 2x4096
at d8_keepgu3; one d8_keepgu3 65 tunelab-fast+keepgu3 2x4096
at unsloth; peer u4 90 unsloth-nf4 4x1024
kill $SMI
echo "end at ${SECONDS}s" | tee -a $L
