"""`tunelab env`: the versions and hardware facts users paste into bug reports."""
from __future__ import annotations

import importlib.metadata
import platform
import sys

PACKAGES = ("tunelab", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "safetensors",
            "huggingface_hub", "tokenizers", "liger-kernel", "flash-attn", "triton")


def collect() -> list[tuple[str, str]]:
    rows = [("Platform", platform.platform()), ("Python", sys.version.split()[0])]
    for name in PACKAGES:
        try:
            rows.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            if name in ("tunelab", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets"):
                rows.append((name, "not installed"))
    try:
        import torch

        rows.append(("CUDA (torch build)", str(torch.version.cuda)))
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                rows.append((f"GPU {i}", f"{p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}"))
            rows.append(("bf16 supported", str(torch.cuda.is_bf16_supported())))
        else:
            rows.append(("GPU", "none (CPU only)"))
    except ImportError:
        pass
    return rows


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print("usage: tunelab env\n\nPrints Python, torch, CUDA, GPUs and library versions.")
        return 0
    rows = collect()
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"- {key:<{width}} : {value}")
    return 0
