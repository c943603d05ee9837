#!/bin/bash
# Device run 25 of the fast path (docs/fastpath.md, "Run 24 and 25"): gate/up's output kept from the first pass
# for some layers (TUNELAB_KEEP_GATE_UP=N, bench +keepgu<N>: split.keep_layers; the last layer's on the GPU, the
# others in pinned host memory on their own stream), so their backward skips the pair's GEMM (272 of the layer's
# ~1,700 MFLOP a token). First the host link's copy rate (one 310 MB tensor, 4 x 1024's gate/up output, pinned,
# each way: what bounds N), the GPU tests of the kept outputs and the split, then 4 x 1024 by default, with N=3 and
# N=2, alternated twice; 2 x 4096 default and N=3; the packed case with N=3.
# One call on nvidia-h200, carry [".devsite"]:
#   END=560 timeout -k 10 580 bash tools/fast_run25.sh $OUT
OUT=${1:-${OUT:?}}; export OUT
END=${END:-560}
source "$(dirname "$0")/fast_cases.sh"
link_probe  # (as run in lease S its second host buffer was not pinned: the 'both ways' figure is void; fixed since)
gpu_tests gpu_tests 110 tests/test_fast_split.py
wait $BUILD; tail -2 /tmp/build.txt | tee -a $L
for r in 1 2; do
  one d4_default 55 tunelab-fast 4x1024
  one d4_keep3 55 tunelab-fast+keepgu3 4x1024
  one d4_keep2 55 tunelab-fast+keepgu2 4x1024
done
one d2x4096_default 65 tunelab-fast 2x4096
one d2x4096_keep3 65 tunelab-fast+keepgu3 2x4096
one packed_keep3 60 tunelab-fast+keepgu3:alpaca-packed 4x1024
echo "end at ${SECONDS}s" | tee -a $L
