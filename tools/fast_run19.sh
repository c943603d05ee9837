#!/bin/bash
# Device run 19 of the fast path (docs/fastpath.md): the NF4 kernel's strided store per block with a constant divisor
# (run 18's probe: the per-element store's 64-bit division made gate + up into the stacked buffer 172.0 us against
# 117.0 contiguous), checked on the GPU and A/B'd in the whole step; and where the QLoRA 4 x 1024 step's jitter
# comes from (run 18: steps of one case 0.315-0.434 s where 16-bit LoRA's stay within 0.30-0.33): the GPU's clocks
# and power sampled beside every case (smi.csv), each step's host CPU time and garbage-collector time (the bench's
# step_cpu_s / step_gc), one case with the collector frozen after step 1.
# One call on nvidia-h200, carry [".devsite"]:
#   END=545 timeout -k 10 570 bash tools/fast_run19.sh $OUT
# Order: the GPU tests (boxed 100 s beside the 7B's build) -> tools/nf4_store_probe.py -> 4 x 1024: default /
# +noblockrows / default / +noblockrows / +gcfreeze (a trainer knob for this A/B, removed after it) / +groupqkv (the q/k/v stack takes the per-block store too) ->
# 2 x 4096 default -> packed alpaca-like default; 20 steps a case; each skipped when fewer than 35 s are left.
OUT=${1:-${OUT:?}}; export OUT
END=${END:-545}
export PAIR_STEPS=20
source "$(dirname "$0")/fast_cases.sh"
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu,clocks_throttle_reasons.active \
  --format=csv,noheader -lms 500 > $OUT/smi.csv 2>&1 &
SMI=$!
stamp() { echo "[$(date +%T)] $*" >> $OUT/smi_marks.txt; }
echo "== gpu tests (at ${SECONDS}s)" | tee -a $L
timeout -k 5 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_nf4_triton.py tests/test_fast_lora.py \
  tests/test_fast_group.py tests/test_fast_split.py > $OUT/gpu_tests.txt 2>&1; echo "rc=$? at ${SECONDS}s" | tee -a $L
tail -3 $OUT/gpu_tests.txt | tee -a $L
grep -E "^(FAILED|ERROR)" $OUT/gpu_tests.txt | head -20 | tee -a $L
echo "== store probe (at ${SECONDS}s)" | tee -a $L
timeout -k 5 45 python3 tools/nf4_store_probe.py > $OUT/probes.txt 2>&1; echo "store rc=$? at ${SECONDS}s" | tee -a $L
grep '^{' $OUT/probes.txt | cut -c1-300 | tee -a $L
wait $BUILD; tail -2 /tmp/build.txt | tee -a $L
for c in "d4x1024 tunelab-fast" "noblk4x1024 tunelab-fast+noblockrows" "d4x1024b tunelab-fast" \
         "noblk4x1024b tunelab-fast+noblockrows" "gc4x1024 tunelab-fast+gcfreeze" "qkv4x1024 tunelab-fast+groupqkv"; do
  set -- $c; stamp "start $1"; one $1 60 $2 4x1024; stamp "end $1"
done
stamp "start d2x4096"; one d2x4096 75 tunelab-fast 2x4096; stamp "end d2x4096"
stamp "start packed"; one packed 70 tunelab-fast:alpaca-packed 4x1024; stamp "end packed"
kill $SMI 2>/dev/null
echo "end at ${SECONDS}s" | tee -a $L
