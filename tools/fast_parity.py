"""Loss parity of the fast path against the plain path, from one `tunelab bench --out` JSON file.

    python -m tunelab.bench --path fast,plain --steps 50 --out run.json && python tools/fast_parity.py run.json

Both cases train on the same seeded data from the same seeded adapter initialisation; the check (issue 9) is the
fast path's loss within 1% of the plain path's at every step and the gradient norm within 2%. Prints the worst
step of each and exits non-zero when either bound is broken.
"""
from __future__ import annotations

import json
import sys


def compare(fast: dict, plain: dict) -> dict:
    pairs = list(zip(fast["losses"], plain["losses"]))
    norms = list(zip(fast["grad_norms"], plain["grad_norms"]))
    loss_rel = [abs(a - b) / abs(b) for a, b in pairs]
    norm_rel = [abs(a - b) / abs(b) for a, b in norms if a is not None and b is not None]
    return {"steps": len(pairs), "max_loss_rel": max(loss_rel), "worst_loss_step": 1 + loss_rel.index(max(loss_rel)),
            "max_grad_norm_rel": max(norm_rel), "worst_norm_step": 1 + norm_rel.index(max(norm_rel)),
            "loss_ok": max(loss_rel) <= 0.01, "grad_norm_ok": max(norm_rel) <= 0.02,
            "first_last_loss": [pairs[0], pairs[-1]]}


def load(path: str) -> list[dict]:
    """The cases of a `--out` JSON file, or of the JSON lines the bench prints (one case a line)."""
    text = open(path).read()
    if text.lstrip().startswith('{"device"') or text.lstrip().startswith("{\n"):
        return json.loads(text)["results"]
    return [json.loads(line) for line in text.splitlines() if line.startswith('{"variant"')]


def main(path: str) -> int:
    """Every tunelab-fast* case (+compile, +offload, ...) against the tunelab-plain case of its shape and profile."""
    results = [r for r in load(path) if "losses" in r]
    ok = True
    for fast in results:
        name = fast["variant"]
        if not name.startswith("tunelab-fast"):
            continue
        profile = name.partition(":")[2]
        plain = next((r for r in results if r["variant"].split("+")[0].split(":")[0] == "tunelab-plain"
                      and r["variant"].partition(":")[2] == profile and r["batch"] == fast["batch"]
                      and r["seq"] == fast["seq"] and r.get("method") == fast.get("method")
                      and len(r["losses"]) == len(fast["losses"])), None)
        if plain is None:
            continue
        out = compare(fast, plain)
        ok &= out["loss_ok"] and out["grad_norm_ok"]
        print(json.dumps({"fast": name, "plain": plain["variant"], **out}))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
