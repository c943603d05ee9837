#!/bin/bash
# Device run 21 of the fast path (docs/fastpath.md, "Runs 18, 19 and 20"): is the packed case's drop (lease J
# 11,972 real tok/s; runs 19-20 9,670 / 8,497) the code or the leases? The packed case of lease J's code (commit
# 9a61329, its src/ in .oldsrc) and of this code alternated in one lease, then this code's packed step profiled
# with a box long enough for the profiler's tables, then 1 x 1024 (run 20's ran past a 45 s box). First the GPU test
# of model/fast/varlen.py (FlashAttention's varlen kernel against the masked SDPA path), and after the pairs the
# packed case with it (+varlen: TUNELAB_VARLEN=1, opt-in until this A/B). Each case's JSON line carries the GPU's
# clock and power over its timed steps (the bench's `gpu` record), so no sampler runs beside it here.
# Before the call, here:  rm -rf .oldsrc && mkdir .oldsrc && git archive 9a61329 src | tar -x -C .oldsrc
# One call on nvidia-h200, carry [".devsite", ".oldsrc"]:
#   END=560 timeout -k 10 580 bash tools/fast_run21.sh $OUT
OUT=${1:-${OUT:?}}; export OUT
END=${END:-560}
source "$(dirname "$0")/fast_cases.sh"
NEW=$PYTHONPATH
OLD=$PWD/.devsite:$PWD/.oldsrc/src
timeout -k 5 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fast_varlen.py "tests/test_gpu.py::test_packed_qlora_train_with_varlen_attention_on_gpu" > $OUT/gpu_tests.txt 2>&1
echo "varlen gpu test rc=$? at ${SECONDS}s" | tee -a $L; tail -3 $OUT/gpu_tests.txt | tee -a $L
wait $BUILD; tail -2 /tmp/build.txt | tee -a $L
for c in new old new old; do
  if [ $c = old ]; then export PYTHONPATH=$OLD; else export PYTHONPATH=$NEW; fi
  one packed_$c 70 tunelab-fast:alpaca-packed 4x1024
done
export PYTHONPATH=$NEW
one packed_varlen 70 tunelab-fast+varlen:alpaca-packed 4x1024
mkdir -p $OUT/prof
TUNELAB_BENCH_PROFILE=$OUT/prof one packedprof 150 tunelab-fast:alpaca-packed 4x1024
one d1x1024 60 tunelab-fast 1x1024
echo "end at ${SECONDS}s" | tee -a $L
