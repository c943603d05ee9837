#!/bin/bash
# Device run 24 of the fast path (docs/fastpath.md, "Runs 21, 22 and 23"), for the next lease: (1) the packed case
# with its batches padded to the rows' capacity (+packfull, TUNELAB_PACK_FULL=1: one static shape, so each compiled
# layer keeps one static graph instead of run 21-23's five with dynamic sizes) alternated with the default, three
# times (run 23 showed the packed case host-sensitive: the GPU at 1,965 MHz and ~565 W, below its power cap);
# (2) Unsloth's three shapes in the same lease, then this code's full-length shapes and the 50-step parity pair,
# the figures the README's table needs from one lease.
# One call on nvidia-h200, carry [".devsite", ".peersite", ".peerbench"] (.peerbench: a copy of ../shared/bench;
# .peersite: ../shared/device/make-peer-site.sh):
#   PART=1 END=560 timeout -k 10 580 bash tools/fast_run24.sh $OUT   (the packed A/B, Unsloth, 4 x 1024: ~500 s)
#   PART=2 END=560 timeout -k 10 580 bash tools/fast_run24.sh $OUT   (2 x 4096, 16-bit, 1 x 1024, the 50-step pair)
OUT=${1:-${OUT:?}}; export OUT
END=${END:-560}
source "$(dirname "$0")/fast_cases.sh"
wait $BUILD; tail -2 /tmp/build.txt | tee -a $L
if [ "${PART:-1}" = 1 ]; then
for r in 1 2 3; do
  one packed_default 60 tunelab-fast:alpaca-packed 4x1024
  one packed_full 60 tunelab-fast+packfull:alpaca-packed 4x1024
done
peer unsloth 150 unsloth-nf4 4x1024 2x4096 1x1024
one d4x1024 55 tunelab-fast 4x1024
else
one d2x4096 60 tunelab-fast 2x4096
one lora4x1024 55 tunelab-fast 4x1024 --method lora
one d1x1024 55 tunelab-fast 1x1024
PAIR_STEPS=50 one p50fast 80 tunelab-fast 4x1024
PAIR_STEPS=50 one p50plain 95 tunelab-plain 4x1024
fi
echo "end at ${SECONDS}s" | tee -a $L
