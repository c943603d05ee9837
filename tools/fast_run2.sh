#!/bin/bash
# Device run 2 of the fast path (docs/fastpath.md): GPU tests, 50-step parity + headline 4x1024, the peer stack and
# the old loss chunk, the other shapes, 16-bit LoRA, packed alpaca-like rows. Each step time-boxed.
export PYTHONPATH=$PWD/.devsite:$PWD/src:$PYTHONPATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
B="python3 -m tunelab.bench --arch qwen2.5-7b"
L=$OUT/log.txt
(timeout 60 python3 -m pytest -q -x -m gpu tests/test_fast_lora.py -p no:cacheprovider 2>&1 | tail -3) | tee -a $L
timeout 150 python3 -c "from tunelab.bench import build_random_model; build_random_model('qwen2.5-7b', '/tmp/tunelab-bench-qwen2.5-7b')" 2>&1 | tail -1
timeout 110 $B --path fast,plain --steps 50 --shapes 4x1024 --out $OUT/parity.json 2>&1 | tee -a $OUT/all.jsonl | grep -v '^{\|Writing' | tail -4 | tee -a $L
python3 tools/fast_parity.py $OUT/parity.json | tee -a $L
timeout 60 $B --variants plain-autocast,tunelab-plain+ce1024 --shapes 4x1024 --out $OUT/peer.json 2>&1 | tee -a $OUT/all.jsonl | grep -v '^{' | tail -4 | tee -a $L
timeout 140 $B --path fast,plain --shapes 1x1024,2x4096 --out $OUT/shapes.json 2>&1 | tee -a $OUT/all.jsonl | grep -v '^{' | tail -6 | tee -a $L
timeout 65 $B --method lora --path fast,plain --shapes 4x1024 --out $OUT/lora.json 2>&1 | tee -a $OUT/all.jsonl | grep -v '^{' | tail -4 | tee -a $L
timeout 65 $B --path fast,plain --profiles alpaca-packed --shapes 4x1024 --out $OUT/packed.json 2>&1 | tee -a $OUT/all.jsonl | grep -v '^{' | tail -4 | tee -a $L
