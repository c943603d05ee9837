#!/bin/bash
# Device run 4 of the fast path (docs/fastpath.md), one ~7-minute call on nvidia-h200, carry [".devsite"]: the two
# unmeasured levers. GPU tests of both, then 7B QLoRA 4x1024 with the checkpoint offload (predicted peak 7.11 ->
# ~6.35 GiB, speed within a few %) and with compiled decoder layers (predicted step ~0.47 -> ~0.33 s once compiled;
# the first step shows the compile time), and 1x1024 compiled (predicted 0.46 -> ~0.15 s).
export PYTHONPATH=$PWD/.devsite:$PWD/src:$PYTHONPATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
B="python3 -m tunelab.bench --arch qwen2.5-7b"
L=$OUT/log.txt
(timeout 150 python3 -m pytest -q -x -m gpu tests/test_fast_lora.py -k "offload or compile" -p no:cacheprovider 2>&1 | tail -3) | tee -a $L
timeout 150 python3 -c "from tunelab.bench import build_random_model; build_random_model('qwen2.5-7b', '/tmp/tunelab-bench-qwen2.5-7b')" 2>&1 | tail -1
timeout 75 $B --variants tunelab-fast+offload --shapes 4x1024 --out $OUT/offload.json 2>&1 | tee -a $OUT/all.jsonl | grep -v '^{' | tail -3 | tee -a $L
timeout 200 $B --variants tunelab-fast+compile --shapes 4x1024,1x1024 --out $OUT/compile.json 2>&1 | tee -a $OUT/all.jsonl | grep -v '^{' | tail -4 | tee -a $L
