#!/bin/bash
# Device run 3 of the fast path (docs/fastpath.md), one ~8-minute call on nvidia-h200, carry [".devsite"]:
# the 50-step parity (fast vs plain, same invocation: also the headline 4x1024 pair) and the plain halves that run 2
# cut (2x4096, 16-bit LoRA, packed alpaca-like). A 7B case takes ~60 s (13 steps) to ~90 s (50 steps) with its load.
export PYTHONPATH=$PWD/.devsite:$PWD/src:$PYTHONPATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
B="python3 -m tunelab.bench --arch qwen2.5-7b"
L=$OUT/log.txt
(timeout 60 python3 -m pytest -q -x -m gpu tests/test_fast_lora.py -k "not compile" -p no:cacheprovider 2>&1 | tail -2) | tee -a $L
timeout 150 python3 -c "from tunelab.bench import build_random_model; build_random_model('qwen2.5-7b', '/tmp/tunelab-bench-qwen2.5-7b')" 2>&1 | tail -1
timeout 230 $B --path fast,plain --steps 50 --shapes 4x1024 --out $OUT/parity.json 2>&1 | tee -a $OUT/all.jsonl | grep -v '^{\|Writing' | tail -4 | tee -a $L
[ -f $OUT/parity.json ] && python3 tools/fast_parity.py $OUT/parity.json | tee -a $L
timeout 75 $B --path plain --shapes 2x4096 --out $OUT/plain_2x4096.json 2>&1 | tee -a $OUT/all.jsonl | grep -v '^{' | tail -3 | tee -a $L
timeout 75 $B --method lora --path plain --shapes 4x1024 --out $OUT/plain_lora.json 2>&1 | tee -a $OUT/all.jsonl | grep -v '^{' | tail -3 | tee -a $L
timeout 75 $B --path plain --profiles alpaca-packed --shapes 4x1024 --out $OUT/plain_packed.json 2>&1 | tee -a $OUT/all.jsonl | grep -v '^{' | tail -3 | tee -a $L
