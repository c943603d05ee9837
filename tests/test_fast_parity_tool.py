"""tools/fast_parity.py, the issue-9 parity check over the bench's JSON lines: the bounds (loss 1%, gradient norm
2%, every step) and which cases it pairs (same shape, profile and method: a 16-bit case is never held against a
4-bit plain case)."""
from __future__ import annotations

import importlib.util
import json
import pathlib

TOOL = pathlib.Path(__file__).resolve().parents[1] / "tools" / "fast_parity.py"


def _tool():
    spec = importlib.util.spec_from_file_location("fast_parity", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _case(variant, method, losses, norms, batch=4, seq=1024):
    return {"variant": variant, "method": method, "batch": batch, "seq": seq, "losses": losses, "grad_norms": norms}


def test_pairs_by_method_and_checks_every_step(tmp_path, capsys):
    tool = _tool()
    lines = [_case("tunelab-plain", "qlora", [10.0, 9.0, 8.0], [1.0, 1.0, 1.0]),
             _case("tunelab-fast", "qlora", [10.05, 9.0, 8.0], [1.0, 1.015, 1.0]),  # 0.5% and 1.5%: within
             _case("tunelab-fast", "lora", [11.0, 11.0, 11.0], [2.0, 2.0, 2.0])]  # no 16-bit plain case: unpaired
    path = tmp_path / "run.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"peer": "unsloth", "r": {}}\n')
    assert tool.main(str(path)) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(out) == 1 and out[0]["fast"] == "tunelab-fast" and out[0]["steps"] == 3
    assert abs(out[0]["max_loss_rel"] - 0.005) < 1e-12 and out[0]["worst_loss_step"] == 1
    assert abs(out[0]["max_grad_norm_rel"] - 0.015) < 1e-12 and out[0]["worst_norm_step"] == 2
    lines[1]["grad_norms"][2] = 1.03  # 3% at step 3: over the 2% bound
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert tool.main(str(path)) == 1
    out = json.loads(capsys.readouterr().out.splitlines()[0])
    assert out["grad_norm_ok"] is False and out["worst_norm_step"] == 3 and out["loss_ok"] is True
