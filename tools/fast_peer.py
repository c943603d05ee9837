"""Runs ../shared/bench/peer_bench.py (copied into .peerbench/) with its JSON lines also appended to a file.

    PEER_OUT=/path/lines.jsonl python3 tools/fast_peer.py run MODEL_DIR VARIANT SHAPE [SHAPE ...]

Why: in run 8 (docs/fastpath.md) Unsloth's process loaded, patched its layers and exited with status 0 after
~110 s, but not one of peer_bench's JSON lines reached its stdout (the load line included), so the figures were
lost. Unsloth 2026.10.9 redirects stdout to os.devnull around parts of its loading (unsloth/models/loader.py),
which fits, but was not confirmed. So the lines go to a file opened before Unsloth is imported (and still to
stdout). Only peer_bench's own print is redirected; nothing of Unsloth's code is used or changed."""
import builtins
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(here), ".peerbench"))
sink = open(os.environ["PEER_OUT"], "a", buffering=1)  # noqa: SIM115 (open for the process's life)
real_stdout = sys.__stdout__


def _print(*args, **kwargs):
    kwargs.pop("file", None)
    kwargs.pop("flush", None)
    builtins.print(*args, file=sink, flush=True, **kwargs)
    builtins.print(*args, file=real_stdout, flush=True, **kwargs)


import peer_bench  # noqa: E402  (after the sink: its module-level imports are torch's only)

peer_bench.print = _print  # module global: shadows the builtin inside peer_bench's functions
if __name__ == "__main__":
    if sys.argv[1] != "run":
        raise SystemExit("usage: fast_peer.py run MODEL_DIR VARIANT SHAPE [SHAPE ...]")
    peer_bench.run(sys.argv[2], sys.argv[3], sys.argv[4:])
