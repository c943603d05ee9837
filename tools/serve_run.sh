#!/usr/bin/env bash
# The serving speed run on the GPU machine (docs/serve.md): one stream bf16 and NF4 (plain generate timed first,
# fast default, levers), then the 32-stream HTTP rounds, each phase in its own process under a time box so a
# hang keeps what was written. Needs .devsite and .servesite carried.   Usage: tools/serve_run.sh [OUTDIR]
set -u
out=${1:-${OUT:-/tmp/serve_out}}
mkdir -p "$out"
export PYTHONPATH=$PWD/.servesite:$PWD/.devsite:$PWD/src:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
W=/tmp/b7
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/env.txt" 2>&1
python -c "import torch, transformers, peft, fastapi, uvicorn, pydantic; print(torch.__version__, transformers.__version__, peft.__version__, fastapi.__version__, uvicorn.__version__, pydantic.__version__)" >> "$out/env.txt" 2>&1
# first: the decode levers' greedy equality with plain generate on CUDA (they became defaults after the last run)
# (GPU_TESTS / GPU_K: other test files / a -k selection, for a run that checks one new lever)
timeout -k 5 ${BOX0:-150} python -m pytest -q -rfE -m gpu -p no:cacheprovider ${GPU_TESTS:-tests/test_infer_engine.py tests/test_decode_attn.py} ${GPU_K:+-k "$GPU_K"} > "$out/gpu_tests.txt" 2>&1
echo "rc=$? gpu tests (decode == plain generate with the levers on)" >> "$out/phases.txt"
# the decode attention kernel alone against the SDPA path (tools/bench_decode_attn.py), when BOXA is set
if [ -n "${BOXA:-}" ]; then
  timeout -k 5 "$BOXA" python tools/bench_decode_attn.py --out "$out/dattn.jsonl" > "$out/dattn.txt" 2>&1
  echo "rc=$? box=$BOXA bench_decode_attn" >> "$out/phases.txt"
fi
run() { local box=$1; shift; timeout -k 5 "$box" python tools/bench_serve.py --workdir $W --out "$out/serve.jsonl" "$@"; echo "rc=$? box=$box $*" >> "$out/phases.txt"; }
run ${BOX1:-195} --phases single16 --fast ${FAST16:-fast,before_fold} 2>> "$out/log.txt"
run ${BOX2:-120} --phases serve16 ${SERVE_ENV:+--serve-env $SERVE_ENV} --serve-settings ${SETTINGS:-8192/5,0/5,8192/0.5} 2>> "$out/log.txt"
run ${BOX3:-110} --phases single4 --fast ${FAST4:-nolevers,fast} --no-plain-after 2>> "$out/log.txt"
grep -v '^\[bench_serve\] {' "$out/log.txt" | grep -iE "error|traceback|warn|failed" | head -40 > "$out/problems.txt"
