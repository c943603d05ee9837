#!/bin/bash
# Device run 18 of the fast path (docs/fastpath.md): run 17's defaults settled (the q/k/v group, the kept weights and
# the augmented down backward off), checked on the GPU, and cuDNN attention first A/B'd where attention weighs most.
# One call on nvidia-h200, carry [".devsite"]:
#   END=560 timeout -k 10 580 bash tools/fast_run18.sh $OUT
# Order: the GPU tests (boxed 120 s beside the 7B's build) -> tools/gemm_probe.py (the augmented GEMM's inner width
# and the strided store's row pitch), tools/nf4_store_probe.py again (run 17's timed the launches too) -> 2 x 4096 default / +sdpacudnn -> 4 x 1024 default / +sdpacudnn twice,
# (the second pair after 16-bit 4 x 1024 default / +sdpacudnn) (+augpad64 after the first pair: gate/up's augmented width 3,648); each skipped when fewer than
# 35 s are left.
OUT=${1:-${OUT:?}}; export OUT
END=${END:-560}
source "$(dirname "$0")/fast_cases.sh"
echo "== gpu tests (at ${SECONDS}s)" | tee -a $L
timeout -k 5 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_nf4_triton.py tests/test_fast_group.py \
  tests/test_fast_lora.py tests/test_fast_split.py > $OUT/gpu_tests.txt 2>&1; echo "rc=$? at ${SECONDS}s" | tee -a $L
tail -4 $OUT/gpu_tests.txt | tee -a $L
grep -E "^(FAILED|ERROR)" $OUT/gpu_tests.txt | head -20 | tee -a $L
echo "== probes (at ${SECONDS}s)" | tee -a $L
timeout -k 5 60 python3 tools/gemm_probe.py > $OUT/probes.txt 2>&1; echo "gemm rc=$? at ${SECONDS}s" | tee -a $L
timeout -k 5 45 python3 tools/nf4_store_probe.py >> $OUT/probes.txt 2>&1; echo "store rc=$? at ${SECONDS}s" | tee -a $L
grep '^{' $OUT/probes.txt | cut -c1-300 | tee -a $L
wait $BUILD; tail -2 /tmp/build.txt | tee -a $L
one d2x4096 75 tunelab-fast 2x4096
one cudnn2x4096 75 tunelab-fast+sdpacudnn 2x4096
one d4x1024 60 tunelab-fast 4x1024
one cudnn4x1024 60 tunelab-fast+sdpacudnn 4x1024
one augpad4x1024 60 tunelab-fast+augpad64 4x1024
one lora4x1024 60 tunelab-fast 4x1024 --method lora
one loracudnn4x1024 60 tunelab-fast+sdpacudnn 4x1024 --method lora
one d4x1024b 60 tunelab-fast 4x1024
one cudnn4x1024b 60 tunelab-fast+sdpacudnn 4x1024
echo "end at ${SECONDS}s" | tee -a $L
