#!/bin/bash
# Device run 1 of the fast path (docs/fastpath.md): GPU tests, the projection micro-benchmark, the 7B bench + profile.
export PYTHONPATH=$PWD/.devsite:$PWD/src:$PYTHONPATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p $OUT/prof
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv | tee $OUT/log.txt
python3 -c "import torch, transformers, peft, bitsandbytes, triton; print(torch.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__, triton.__version__)" | tee -a $OUT/log.txt
(timeout 150 python3 -m pytest -q -x -m gpu tests/test_fast_lora.py tests/test_kernels.py tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -15) | tee -a $OUT/log.txt
timeout 120 python3 tools/fast_probe.py --out $OUT/probe.json 2>&1 | grep -v Warning | tail -20 | tee -a $OUT/log.txt
TUNELAB_BENCH_PROFILE=$OUT/prof timeout 330 python3 -m tunelab.bench --arch qwen2.5-7b --method qlora \
  --variants plain-autocast,tunelab-plain,tunelab-fast,tunelab-fast+ce256 --shapes 4x1024 --out $OUT/bench1.json 2>&1 | tee $OUT/bench1.log | grep -v '^{' | tail -12
grep -h "Self CPU time total\|Self CUDA time total" $OUT/prof/*.txt
