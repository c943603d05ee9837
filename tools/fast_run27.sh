#!/bin/bash
# Device run 27 (docs/fastpath.md, "Runs 24-27"): the session's last ~3 minutes of device time on the one shape where
# run 25 measured the kept gate/up outputs ahead (2 x 4096: 12,689 against 12,337 tok/s, one pair): +keepgu3 and the
# default again, BAB order as time allows.
# One call on nvidia-h200, carry [".devsite"]:   END=185 timeout -k 5 195 bash tools/fast_run27.sh $OUT
OUT=${1:-${OUT:?}}; export OUT
END=${END:-185}
source "$(dirname "$0")/fast_cases.sh"
wait $BUILD; tail -2 /tmp/build.txt | tee -a $L
one d2x4096_keep3 60 tunelab-fast+keepgu3 2x4096
one d2x4096_default 60 tunelab-fast 2x4096
one d2x4096_keep3 60 tunelab-fast+keepgu3 2x4096
echo "end at ${SECONDS}s" | tee -a $L
