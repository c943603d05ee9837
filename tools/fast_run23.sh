#!/bin/bash
# Device run 23 of the fast path (docs/fastpath.md, "Runs 21 and 22"): the varlen attention is now on by default
# with packing. Its GPU tests (the kernel against the masked path, fp32's fallback to the mask, the packed
# `tunelab train`), then the packed case by default (varlen) alternated with +novarlen (the masked SDPA path),
# twice; then 1 x 1024, lease J's code (commit 9a61329, carried as .oldsrc) alternated with this code, twice (run
# 21-22: 3,824-4,165 tok/s against lease J's 4,753-5,320, host-bound: is that the code or the lease?); then the
# default 4 x 1024 once.
# Before the call, here:  rm -rf .oldsrc && mkdir .oldsrc && git archive 9a61329 src | tar -x -C .oldsrc
# One call on nvidia-h200, carry [".devsite", ".oldsrc"]:
#   END=560 timeout -k 10 580 bash tools/fast_run23.sh $OUT
OUT=${1:-${OUT:?}}; export OUT
END=${END:-560}
source "$(dirname "$0")/fast_cases.sh"
OLD=$PWD/.devsite:$PWD/.oldsrc/src
gpu_tests gpu_tests 100 tests/test_fast_varlen.py "tests/test_gpu.py::test_packed_qlora_train_with_varlen_attention_on_gpu"
wait $BUILD; tail -2 /tmp/build.txt | tee -a $L
for r in 1 2; do
  one packed_default 65 tunelab-fast:alpaca-packed 4x1024
  one packed_novarlen 65 tunelab-fast+novarlen:alpaca-packed 4x1024
done
for r in 1 2; do
  PYTHONPATH=$OLD one d1_old 55 tunelab-fast 1x1024
  one d1_new 55 tunelab-fast 1x1024
done
one d4x1024 60 tunelab-fast 4x1024
echo "end at ${SECONDS}s" | tee -a $L
