#!/bin/bash
# Device run 22 of the fast path (docs/fastpath.md, "Run 21"): run 21 measured this code's packed case at 10,349 and
# 10,323 real tok/s alternated with lease J's code at 11,772 / 11,894, then this code at 11,755 (profiled) and
# 12,187 (+varlen). The one in-process difference left on the default packed path is the bench's own nvidia-smi
# sampler (GpuSampler, new since lease J): here the packed case with it off (TUNELAB_BENCH_GPU_SAMPLE=0) and on,
# alternated with the varlen attention, twice, after lease J's code once for the lease's level; then 1 x 1024
# profiled (run 21: 4,165 tok/s against lease J's 4,753-5,320, the GPU at full clock and half power: not bound by
# the GPU's compute) and once without the sampler. First the varlen `tunelab train` GPU test (its check fixed).
# Before the call, here:  rm -rf .oldsrc && mkdir .oldsrc && git archive 9a61329 src | tar -x -C .oldsrc
# One call on nvidia-h200, carry [".devsite", ".oldsrc"]:
#   END=560 timeout -k 10 580 bash tools/fast_run22.sh $OUT
OUT=${1:-${OUT:?}}; export OUT
END=${END:-560}
source "$(dirname "$0")/fast_cases.sh"
NEW=$PYTHONPATH
gpu_tests gpu_tests 90 "tests/test_gpu.py::test_packed_qlora_train_with_varlen_attention_on_gpu"
wait $BUILD; tail -2 /tmp/build.txt | tee -a $L
PYTHONPATH=$PWD/.devsite:$PWD/.oldsrc/src one packed_old 70 tunelab-fast:alpaca-packed 4x1024
for r in 1 2; do
  TUNELAB_BENCH_GPU_SAMPLE=0 one packed_nosmi 70 tunelab-fast:alpaca-packed 4x1024
  one packed_smi 70 tunelab-fast:alpaca-packed 4x1024
  one packed_varlen 70 tunelab-fast+varlen:alpaca-packed 4x1024
done
mkdir -p $OUT/prof
TUNELAB_BENCH_PROFILE=$OUT/prof one d1prof 70 tunelab-fast 1x1024
TUNELAB_BENCH_GPU_SAMPLE=0 one d1nosmi 60 tunelab-fast 1x1024
echo "end at ${SECONDS}s" | tee -a $L
