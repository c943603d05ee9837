#!/bin/bash
# Device run 20 of the fast path (docs/fastpath.md): why run 19's packed alpaca-like case ran at 9,670 real tok/s
# (run 16: 11,972) with the GPU's clock higher than in the full-length cases (less busy): its step 6 profiled
# ($OUT/prof), then measured again unprofiled; and the table's other shapes on the new default (the per-block
# strided store): 1 x 1024 QLoRA, 16-bit LoRA 4 x 1024. GPU clocks and power sampled beside (smi.csv).
# One call on nvidia-h200, carry [".devsite"]:
#   END=330 timeout -k 10 350 bash tools/fast_run20.sh $OUT
OUT=${1:-${OUT:?}}; export OUT
END=${END:-330}
source "$(dirname "$0")/fast_cases.sh"
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu,clocks_throttle_reasons.active \
  --format=csv,noheader -lms 500 > $OUT/smi.csv 2>&1 &
SMI=$!
stamp() { echo "[$(date +%T)] $*" >> $OUT/smi_marks.txt; }
wait $BUILD; tail -2 /tmp/build.txt | tee -a $L
mkdir -p $OUT/prof
stamp "start packedprof"; TUNELAB_BENCH_PROFILE=$OUT/prof one packedprof 70 tunelab-fast:alpaca-packed 4x1024; stamp "end packedprof"
stamp "start d1x1024"; one d1x1024 45 tunelab-fast 1x1024; stamp "end d1x1024"
stamp "start lora4x1024"; one lora4x1024 50 tunelab-fast 4x1024 --method lora; stamp "end lora4x1024"
stamp "start packed"; one packed 60 tunelab-fast:alpaca-packed 4x1024; stamp "end packed"
kill $SMI 2>/dev/null
echo "end at ${SECONDS}s" | tee -a $L
