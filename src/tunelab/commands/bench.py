"""`tunelab bench`: GPU training speed and memory of tunelab beside the plain stack (see tunelab/bench.py)."""
from __future__ import annotations


def main(argv: list[str]) -> int:
    from tunelab.bench import main as bench_main

    return bench_main(argv)
