#!/bin/bash
# Device run 17 of the fast path (docs/fastpath.md): the A/Bs of this session's levers in one lease. One call on
# nvidia-h200, carry [".devsite"]:
#   END=545 timeout -k 10 565 bash tools/fast_run17.sh $OUT
# Order: the GPU tests of what changed (the NF4 kernel's per-block strided store and dense_stack, the q/k/v group,
# the augmented backward, the kept weights; boxed 110 s beside the 7B's build) -> tools/attn_probe.py (SDPA's
# backends at the 7B shapes) and tools/nf4_store_probe.py (the stacked stores) -> the new default 4 x 1024 with step 6
# profiled -> the levers all off (run 16's default, but for the kernel's store) -> cuDNN attention first -> each
# lever off alone -> 1 x 1024 with and without the q/k/v group; each skipped when fewer than 35 s are left.
OUT=${1:-${OUT:?}}; export OUT
END=${END:-545}
source "$(dirname "$0")/fast_cases.sh"
echo "== gpu tests (at ${SECONDS}s)" | tee -a $L
timeout -k 5 110 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_nf4_triton.py tests/test_fast_group.py \
  tests/test_fast_lora.py tests/test_fast_split.py > $OUT/gpu_tests.txt 2>&1; echo "rc=$? at ${SECONDS}s" | tee -a $L
tail -4 $OUT/gpu_tests.txt | tee -a $L
grep -E "^(FAILED|ERROR)" $OUT/gpu_tests.txt | head -20 | tee -a $L
echo "== probes (at ${SECONDS}s)" | tee -a $L
timeout -k 5 70 python3 tools/attn_probe.py > $OUT/probes.txt 2>&1; echo "attn rc=$? at ${SECONDS}s" | tee -a $L
timeout -k 5 60 python3 tools/nf4_store_probe.py >> $OUT/probes.txt 2>&1; echo "nf4 rc=$? at ${SECONDS}s" | tee -a $L
grep '^{' $OUT/probes.txt | cut -c1-300 | tee -a $L
wait $BUILD; tail -2 /tmp/build.txt | tee -a $L
mkdir -p $OUT/prof
TUNELAB_BENCH_PROFILE=$OUT/prof one d4x1024 75 tunelab-fast 4x1024
one old4x1024 65 tunelab-fast+nogroupqkv+nokeepdense+nobelow 4x1024
one cudnn4x1024 65 tunelab-fast+sdpacudnn 4x1024
one noqkv4x1024 60 tunelab-fast+nogroupqkv 4x1024
one nokeep4x1024 60 tunelab-fast+nokeepdense 4x1024
one nobelow4x1024 60 tunelab-fast+nobelow 4x1024
one d1x1024 55 tunelab-fast 1x1024
one noqkv1x1024 55 tunelab-fast+nogroupqkv 1x1024
echo "end at ${SECONDS}s" | tee -a $L
cd $OUT && tar czf prof.tgz prof && rm -rf prof
