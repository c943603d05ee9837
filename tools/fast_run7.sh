#!/bin/bash
# Device run 7 of the fast path (docs/fastpath.md): what run 6 left open, one call on nvidia-h200, carry
# [".devsite", ".peersite", ".peerbench"]. Same case helpers and time boxes as fast_run6.sh.
#  1. 7B QLoRA 4x1024 tunelab-fast (the default) and +hostembed (now with its return to the host) in one
#     invocation, with the bench's new per-step peaks, memory before step 1 and host_embedding_returns: does the
#     embedding leave the GPU (run 6's peak did not move), and is the compiled peak a step-1 transient?
#  2. 1x1024 compiled (never measured; eager was 80% launch overhead).
#  3. Unsloth 4x1024 (run 6 cut it at 100 s), with a longer box; then 1x1024 plain if time.
END=${END:-300}
source "$(dirname "$0")/fast_cases.sh"
wait $BUILD; tail -2 /tmp/build.txt | tee -a $L
case_ q4x1024 110 --variants tunelab-fast,tunelab-fast+hostembed --shapes 4x1024
case_ q1x1024 60 --variants tunelab-fast --shapes 1x1024
peer unsloth 170 unsloth-nf4 4x1024
case_ q1x1024plain 50 --variants tunelab-plain --shapes 1x1024
echo "end at ${SECONDS}s" | tee -a $L
