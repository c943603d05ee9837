"""The accuracy table of docs/estimate.md from a tools/estimate_measure.py result, beside the other ways to guess.

    python tools/estimate_table.py measure.json
    python tools/estimate_table.py --peers          # the peers' published plain-stack figures against the estimate
    python tools/estimate_table.py --fastpath       # the fast path's measured peaks (docs/data/estimate_fastpath_h200.json)

Columns: measured peak allocated, tunelab estimate (and its error), the "paper arithmetic" of the tutorials
(every weight at the method's bytes + 16 B per LoRA parameter for weight, gradient and AdamW states; no
activations), LLaMA-Factory's static README table, and accelerate estimate-memory's figure (its "Total Size" for
the weights' dtype: it prints N/A for training a 4-bit model and models neither LoRA nor activations).
"""
from __future__ import annotations

import json
import sys

from tunelab.estimate import model_shape
from tunelab.estimate import terms as T

ARCHS = {"qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct", "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct"}
# LLaMA-Factory README, "Hardware Requirement" (GB): 7B column; other sizes from its xB column (LoRA 2x, QLoRA-4 x/2)
LLAMA_FACTORY = {("qwen2.5-7b", "lora"): 16, ("qwen2.5-7b", "qlora"): 6, ("qwen2.5-1.5b", "lora"): 3, ("qwen2.5-1.5b", "qlora"): 0.75}
# accelerate estimate-memory "Total Size" (tools/estimate_accelerate.py): float16 and int4 rows
ACCELERATE = {("qwen2.5-7b", "lora"): "13.17 GB", ("qwen2.5-7b", "qlora"): "3.29 GB (training: N/A)",
              ("qwen2.5-1.5b", "lora"): "2.88 GB", ("qwen2.5-1.5b", "qlora"): "736 MB (training: N/A)"}


def paper(arch: str, method: str) -> float:
    s = model_shape(ARCHS[arch])
    per = 0.5 if method == "qlora" else 2.0
    return (per * T.total_params(s) + 16 * T.lora_params(s, 8, T.LORA_TARGETS)) / T.GiB


PEERS = [  # /work/shared/bench/PEERS.md: peer_bench.py hf-nf4 / hf-bf16 (transformers 5.17 + PEFT + bitsandbytes), 7B
    ("qlora", 1, 512, 6.59), ("qlora", 1, 1024, 7.70), ("qlora", 4, 1024, 14.41), ("qlora", 2, 4096, 23.35), ("lora", 4, 1024, 23.42)]


def peers() -> None:
    """The peers' loop keeps the previous step's output (its bf16 logits, 2 N V bytes) through the next step."""
    from tunelab.estimate import Setup, estimate

    s = model_shape(ARCHS["qwen2.5-7b"])
    print("| 7B plain stack (peer_bench.py) | measured | estimate | + previous step's logits (2 N V) | error |")
    print("|---|---|---|---|---|")
    for method, b, t, measured in PEERS:
        est = estimate(s, Setup(method=method, bits=4 if method == "qlora" else None, batch=b, seq=t, plain=True,
                                optim="adamw_torch_fused")).peak_allocated / T.GiB
        held = est + 2 * b * t * s.vocab / T.GiB
        print(f"| {'QLoRA 4-bit' if method == 'qlora' else 'LoRA 16-bit'} {b} x {t} | {measured:.2f} | {est:.2f} | {held:.2f} | {100 * (held / measured - 1):+.1f}% |")


FASTPATH = "docs/data/estimate_fastpath_h200.json"


def fastpath_setup(r: dict):
    """The estimate's Setup for one record of docs/data/estimate_fastpath_h200.json (the bench's settings)."""
    from tunelab.estimate import Setup

    return Setup(method=r["method"], bits=4 if r["method"] == "qlora" else None, batch=r["batch"], seq=r["seq"],
                 optim="adamw_torch_fused", liger=r["liger"], compiled=r["compiled"], offload=r["offload"],
                 host_embedding=r["host_embedding"], mask=r["mask"])


def fastpath(path: str = FASTPATH) -> int:
    """The fast path's measured peaks (docs/fastpath.md) against the estimate of each variant."""
    from tunelab.estimate import estimate

    doc = json.load(open(path))
    s = model_shape(doc["model"])
    print("| 7B case (tunelab bench, H200) | run | batch x tokens | measured peak allocated | estimate | error | measured reserved | estimate | error |")
    print("|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for r in doc["records"]:
        est = estimate(s, fastpath_setup(r))
        p, q = est.peak_allocated / T.GiB, est.peak_reserved / T.GiB
        err = 100 * (p / r["peak_allocated_gib"] - 1)
        worst = max(worst, abs(err))
        print(f"| {r['case']} | {r['run']} | {r['batch']} x {r['seq']} | {r['peak_allocated_gib']:.2f} | **{p:.2f}** | {err:+.1f}% | "
              f"{r['reserved_gib']:.2f} | {q:.2f} | {100 * (q / r['reserved_gib'] - 1):+.1f}% |")
    print(f"\n{len(doc['records'])} cases: largest error {worst:.1f}% on peak allocated.")
    return 0


def main(path: str) -> int:
    doc = json.load(open(path))
    rows = [r for r in doc["records"] if "peak_allocated_gib" in r]
    print("| model | method | stack | batch x tokens | measured peak allocated | **tunelab estimate** | error | nvidia-smi measured / estimate | paper arithmetic | LLaMA-Factory | accelerate |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["arch"], r["method"], r["stack"], r["batch"] * r["seq"])):
        key = (r["arch"], r["method"])
        smi = r["smi_mib"] / 1024
        print(f"| {r['arch']} | {'QLoRA 4-bit' if r['method'] == 'qlora' else 'LoRA 16-bit'} | {r['stack']} | {r['batch']} x {r['seq']} | "
              f"{r['peak_allocated_gib']:.2f} | **{r['predicted_allocated_gib']:.2f}** | {r['error_pct']:+.1f}% | "
              f"{smi:.2f} / {r['predicted_smi_gib']:.2f} ({r['smi_error_pct']:+.1f}%) | {paper(*key):.2f} | {LLAMA_FACTORY[key]} GB | {ACCELERATE[key]} |")
    worst = max(abs(r["error_pct"]) for r in rows)
    worst_smi = max(abs(r["smi_error_pct"]) for r in rows)
    print(f"\n{len(rows)} cases: largest error {worst:.1f}% on peak allocated, {worst_smi:.1f}% on nvidia-smi.")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--peers"]:
        peers()
        raise SystemExit(0)
    if sys.argv[1:2] == ["--fastpath"]:
        raise SystemExit(fastpath(*sys.argv[2:3]))
    raise SystemExit(main(sys.argv[1]))
