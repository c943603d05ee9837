#!/bin/bash
# Shared by the fast-path device scripts (tools/fast_run6.sh, fast_run7.sh, ...): sourced, not run.
# Sets the environment, the case helpers (case_: one tunelab bench invocation; one: one variant at one shape through
# the bench's --single form, its progress kept in $OUT/progress.txt; gpu_tests: named GPU tests; peer: ../shared/bench/peer_bench.py
# through .peerbench, Unsloth's site first on its own path only), each time-boxed against END seconds with its
# JSON lines appended to $OUT/all.jsonl as soon as it ends; then starts writing the random-init 7B in the
# background ($BUILD: wait for it before the first case). Set END before sourcing to change the budget.
export PYTHONPATH=$PWD/.devsite:$PWD/src:$PYTHONPATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
B="python3 -m tunelab.bench --arch qwen2.5-7b"
M=/tmp/tunelab-bench-qwen2.5-7b
L=$OUT/log.txt
END=${END:-300}
PAIR_STEPS=${PAIR_STEPS:-13}
box() { local want=$1 left=$((END - SECONDS)); echo $((want < left ? want : left)); }
summary() { python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l); r.pop('losses',0); r.pop('grad_norms',0); t=r.pop('step_times',[]); r['first_steps']=t[:3]
    print(json.dumps(r)[:700])"; }
case_() {  # case_ NAME WANT ARGS...: one bench invocation, its JSON lines appended to all.jsonl
  local name=$1 t; t=$(box "$2"); shift 2
  if [ "$t" -lt 35 ]; then echo "skip $name (no time left)" | tee -a $L; return; fi
  echo "== $name (box ${t}s, at ${SECONDS}s)" | tee -a $L
  timeout "$t" $B "$@" > $OUT/$name.out 2>$OUT/$name.err; echo "rc=$? at ${SECONDS}s" | tee -a $L
  keep "$name"
}
keep() {  # keep NAME: a finished case's JSON lines into all.jsonl (+ their summary in the log), its other output's
  # tail into errs.txt (from $OUT/NAME.err, or from NAME.out's non-result lines when stderr went there), and, when
  # it printed no result (a timeout), its last output into noresult.txt for the cause; then its files go
  local name=$1 out=$OUT/$1.out err=$OUT/$1.err
  grep '^{"variant"' $out >> $OUT/all.jsonl
  grep '^{"variant"' $out | summary | tee -a $L
  { echo "== $name"; if [ -f $err ]; then tail -c 1200 $err; else grep -v '^{"variant"' $out | tail -c 1200; fi; } >> $OUT/errs.txt
  if ! grep -q '^{"variant"' $out; then
    { echo "== $name: no result line; its last output"; tail -c 3000 $out; if [ -f $err ]; then tail -c 3000 $err; fi; } >> $OUT/noresult.txt
  fi
  rm -f $out $err
}
one() {  # one NAME WANT VARIANT SHAPE [ARGS...]: one measurement, the bench's `--single` form run directly
  # (no parent process: its JSON line reaches the file the moment it is printed, not when the child exits; run 10's
  # cases hit their boxes with the parent still waiting). The output is polled each second: new lines go to
  # $OUT/progress.txt stamped with the script's seconds (the Trainer's per-step log dicts show how far a case got,
  # also when its box ends first); 5 s after the result line the process is stopped if it has not exited.
  local name=$1 t v=$3 s=$4 pid n=0 m at0=$SECONDS done_at= rc; t=$(box "$2"); shift 4
  if [ "$t" -lt 35 ]; then echo "skip $name (no time left)" | tee -a $L; return; fi
  echo "== $name (box ${t}s, at ${SECONDS}s)" | tee -a $L; echo "== $name $v $s $* (start at ${SECONDS}s)" >> $OUT/progress.txt
  timeout -k 10 "$t" $B --single "$v" --model-dir $M --shapes "$s" --steps $PAIR_STEPS "$@" > $OUT/$name.out 2>&1 &
  pid=$!
  while kill -0 $pid 2>/dev/null; do
    sleep 1; m=$(wc -l < $OUT/$name.out)
    if [ "$m" -gt "$n" ]; then sed -n "$((n + 1)),${m}p" $OUT/$name.out | cut -c1-400 | sed "s/^/[$SECONDS] /" >> $OUT/progress.txt; n=$m; fi
    if [ -z "$done_at" ] && grep -q '^{"variant"' $OUT/$name.out; then done_at=$SECONDS; fi
    if [ -n "$done_at" ] && [ $((SECONDS - done_at)) -ge 5 ]; then echo "[$SECONDS] result at ${done_at}s, not exited 5 s later: stopped" >> $OUT/progress.txt; kill -TERM $pid; break; fi
  done
  wait $pid; rc=$?
  echo "rc=$rc at ${SECONDS}s (case wall $((SECONDS - at0)) s, result line at ${done_at:-none} s)" | tee -a $L
  keep "$name"
}
gpu_tests() {  # gpu_tests NAME WANT PYTEST-ARGS...: the `gpu`-marked tests named, their tail in the log, all in NAME.txt
  local name=$1 t; t=$(box "$2"); shift 2
  timeout -k 5 "$t" python3 -m pytest -q -m gpu -p no:cacheprovider "$@" > $OUT/$name.txt 2>&1
  echo "$name rc=$? at ${SECONDS}s" | tee -a $L; tail -3 $OUT/$name.txt | tee -a $L
}
peer() {  # peer NAME WANT VARIANT SHAPES...: Unsloth / the plain stack through ../shared/bench/peer_bench.py
  # (its JSON lines go to log.txt and, wrapped as {"peer": NAME, "r": ...}, to all.jsonl; not to the call's stdout)
  local name=$1 t; t=$(box "$2"); shift 2
  if [ "$t" -lt 35 ]; then echo "skip $name (no time left)" | tee -a $L; return; fi
  echo "== $name (box ${t}s, at ${SECONDS}s)" | tee -a $L
  PYTHONPATH=$PWD/.peersite:$PWD/.devsite HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 timeout "$t" python3 .peerbench/peer_bench.py run $M "$@" > $OUT/$name.out 2>$OUT/$name.err
  echo "rc=$? at ${SECONDS}s" | tee -a $L; grep '^{' $OUT/$name.out | tee -a $L | sed "s/^/{\"peer\": \"$name\", \"r\": /; s/$/}/" >> $OUT/all.jsonl
  { echo "== $name"; tail -c 1500 $OUT/$name.err; } >> $OUT/errs.txt; rm -f $OUT/$name.out $OUT/$name.err
}
link_probe() {  # the host link's copy rate: one 310 MB tensor (7B gate/up's output at 4 x 1024), pinned, each way
  # alone and both ways at once (runs 25 and 28; run 25's own copy had the second host buffer unpinned)
  timeout 60 python3 - <<'PY' 2>&1 | tee -a $L
import torch, time
n = 4096 * 37888  # bf16 elements of one gate/up output at 4 x 1024 (7B)
d = torch.empty(n, dtype=torch.bfloat16, device="cuda"); h = torch.empty(n, dtype=torch.bfloat16, pin_memory=True)
for name, dst, src in (("d2h", h, d), ("h2d", d, h)):
    for _ in range(2): dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(5): dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 5
    print(f"pcie {name}: {2 * n / dt / 1e9:.1f} GB/s, {dt * 1e3:.2f} ms for {2 * n / 1e6:.0f} MB")
s1, s2 = torch.cuda.Stream(), torch.cuda.Stream(); d2 = torch.empty_like(d); h2 = torch.empty(n, dtype=torch.bfloat16, pin_memory=True)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(5):
    with torch.cuda.stream(s1): h.copy_(d, non_blocking=True)
    with torch.cuda.stream(s2): d2.copy_(h2, non_blocking=True)
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 5
print(f"pcie both ways at once: {2 * n / dt / 1e9:.1f} GB/s each")
PY
}
nvidia-smi --query-gpu=name,memory.used,clocks.sm,temperature.gpu --format=csv,noheader | tee -a $L
python3 -c "import torch, transformers, peft, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'triton', triton.__version__)" | tee -a $L
(timeout 150 python3 - > /tmp/build.txt 2>&1 <<'EOF'
# the bench's random-init 7B, plus a word-level tokenizer for Unsloth's loader (as peer_bench.py make writes one)
from tunelab.bench import build_random_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
path = build_random_model("qwen2.5-7b", "/tmp/tunelab-bench-qwen2.5-7b")
vocab = {"<unk>": 0, "<|endoftext|>": 1, "<|im_start|>": 2, "<|im_end|>": 3, **{f"w{i}": 4 + i for i in range(1000)}}
tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>")); tk.pre_tokenizer = pre_tokenizers.Whitespace()
PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>").save_pretrained(path)
print("built")
EOF
echo "build rc=$? at ${SECONDS}s" >> /tmp/build.txt) &
BUILD=$!
