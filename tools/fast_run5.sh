#!/bin/bash
# Device run 5 of the fast path (docs/fastpath.md): runs 3 and 4 merged, one <= 9-minute call on nvidia-h200,
# carry [".devsite"]. Every case is time-boxed against the 530 s the call may take, and its JSON line goes to
# $OUT/all.jsonl as soon as it ends, so a cut run still returns what finished.
#  1. GPU tests of the fast path (fused op, whole step, offload, compile, loader) and tests/test_gpu.py, while the
#     random-init 7B is written (the two overlap: tests are small, the build is disk-bound).
#  2. 7B QLoRA 4x1024, 50 steps, tunelab-fast and tunelab-plain in ONE invocation: the headline pair and the
#     50-step parity (tools/fast_parity.py).
#  3. the same, compiled decoder layers without Liger (inductor fuses the norms/RoPE/SwiGLU itself), 50 steps:
#     speed once compiled, compile time (first step), parity against the plain half of 2. Predicted: step
#     ~0.47 -> ~0.33 s (the GPU-busy time of run 1's profile), first step + ~60-120 s.
#  4. +offload (13 steps): predicted peak 7.11 -> ~6.35 GiB, speed within a few %.
#  5. +cudagraph (compile mode reduce-overhead, 13 steps) if time is left: predicted step -> ~0.30 s.
export PYTHONPATH=$PWD/.devsite:$PWD/src:$PYTHONPATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
B="python3 -m tunelab.bench --arch qwen2.5-7b"
L=$OUT/log.txt
END=${END:-530}
box() { local want=$1 left=$((END - SECONDS)); echo $((want < left ? want : left)); }  # a case's time box
case_() {  # case_ NAME WANT ARGS...: one bench invocation, its JSON lines appended to all.jsonl
  local name=$1 t; t=$(box "$2"); shift 2
  if [ "$t" -lt 40 ]; then echo "skip $name (no time left)" | tee -a $L; return; fi
  echo "== $name (box ${t}s, at ${SECONDS}s)" | tee -a $L
  timeout "$t" $B "$@" > $OUT/$name.out 2>$OUT/$name.err
  echo "rc=$? at ${SECONDS}s" | tee -a $L
  grep '^{"variant"' $OUT/$name.out >> $OUT/all.jsonl
  grep -v '^{' $OUT/$name.out | tail -6 | tee -a $L
  grep '^{"variant"' $OUT/$name.out | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l); r.pop('losses',0); r.pop('grad_norms',0); t=r.pop('step_times',[]); r['first_steps']=t[:4]
    print(json.dumps(r)[:900])" | tee -a $L
  rm -f $OUT/$name.out; { echo "== $name"; tail -c 1500 $OUT/$name.err; } >> $OUT/errs.txt; rm -f $OUT/$name.err
}
nvidia-smi --query-gpu=name,memory.used,clocks.sm,temperature.gpu --format=csv,noheader | tee -a $L
python3 -c "import torch, transformers, peft, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'triton', triton.__version__)" | tee -a $L
(timeout 170 python3 -c "from tunelab.bench import build_random_model; build_random_model('qwen2.5-7b', '/tmp/tunelab-bench-qwen2.5-7b')" > /tmp/build.txt 2>&1; echo "build rc=$? at ${SECONDS}s" >> /tmp/build.txt) &
BUILD=$!
timeout 170 python3 -m pytest -q -rfE -m gpu tests/test_fast_lora.py tests/test_gpu.py -p no:cacheprovider > $OUT/tests.txt 2>&1
echo "tests rc=$? at ${SECONDS}s" | tee -a $L; tail -8 $OUT/tests.txt | tee -a $L
wait $BUILD; tail -2 /tmp/build.txt | tee -a $L
case_ pair 175 --variants tunelab-fast,tunelab-plain --steps 50
mkdir -p $OUT/prof
export TUNELAB_BENCH_PROFILE=$OUT/prof; case_ compile 190 --variants tunelab-fast+noliger+compile --steps 50; unset TUNELAB_BENCH_PROFILE
case_ offload 75 --variants tunelab-fast+offload
case_ cudagraph 150 --variants tunelab-fast+noliger+cudagraph
python3 tools/fast_parity.py $OUT/all.jsonl | tee -a $L
echo "end at ${SECONDS}s" | tee -a $L
