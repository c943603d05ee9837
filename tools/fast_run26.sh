#!/bin/bash
# Device run 26 of the fast path (docs/fastpath.md, "Runs 24-26"): run 25 (lease S) measured the kept gate/up
# outputs (+keepgu3) +2.9% at 2 x 4096 and 12,518 real tok/s packed, but 4 x 1024 spread from 8,210 to 12,287 tok/s
# case to case in that lease. Here 4 x 1024 and the packed case, the default and +keepgu3 alternated (ABBA), then the
# 50-step parity pair with +keepgu3 against the plain path, then the packed pair again as time allows.
# One call on nvidia-h200, carry [".devsite"]:
#   END=570 timeout -k 10 585 bash tools/fast_run26.sh $OUT
OUT=${1:-${OUT:?}}; export OUT
END=${END:-570}
source "$(dirname "$0")/fast_cases.sh"
wait $BUILD; tail -2 /tmp/build.txt | tee -a $L
one d4_default 50 tunelab-fast 4x1024
one d4_keep3 50 tunelab-fast+keepgu3 4x1024
one packed_default 55 tunelab-fast:alpaca-packed 4x1024
one packed_keep3 55 tunelab-fast+keepgu3:alpaca-packed 4x1024
one d4_keep3 50 tunelab-fast+keepgu3 4x1024
one d4_default 50 tunelab-fast 4x1024
PAIR_STEPS=50 one p50keep3 80 tunelab-fast+keepgu3 4x1024
PAIR_STEPS=50 one p50plain 95 tunelab-plain 4x1024
one packed_keep3 55 tunelab-fast+keepgu3:alpaca-packed 4x1024
one packed_default 55 tunelab-fast:alpaca-packed 4x1024
echo "end at ${SECONDS}s" | tee -a $L
