#!/bin/bash
# The split recompute's host cost (docs/fastpath.md, runs 12-13: 1 x 1024 lost 27% with it at 7B, host-bound), on
# the small Qwen2.5-0.5B architecture, whose steps are host-bound at every size (the host work a layer does not
# depend on the model's width): split forced on at 1 x 1024 (TUNELAB_SPLIT_MIN_TOKENS=0) against it off, each
# with step 6 profiled (the bench's tables by CUDA and by CPU time). One call on nvidia-h200, carry [".devsite"]:
#   timeout -k 5 130 bash tools/host_probe.sh $OUT
OUT=${1:-${OUT:?}}
export PYTHONPATH=$PWD/.devsite:$PWD/src:$PYTHONPATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
M=/tmp/tunelab-bench-qwen2.5-0.5b
python3 -c "from tunelab.bench import build_random_model; build_random_model('qwen2.5-0.5b', '$M')" 2>&1 | tail -1
echo "built at ${SECONDS}s"
mkdir -p $OUT/prof
for v in tunelab-fast+split tunelab-fast+nosplit; do
  TUNELAB_SPLIT_MIN_TOKENS=0 TUNELAB_BENCH_PROFILE=$OUT/prof timeout -k 5 50 python3 -m tunelab.bench --arch qwen2.5-0.5b \
    --single $v --model-dir $M --shapes 1x1024 --steps 13 > $OUT/$v.out 2>&1
  echo "$v rc=$? at ${SECONDS}s"; grep '^{"variant"' $OUT/$v.out | cut -c1-420
done
