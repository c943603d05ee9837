"""Host cost of one call of tunelab's opaque ops, as a compiled graph's wrapper makes it (through torch.ops), against
the same body called inline and against the same op defined with torch.library.custom_op (its form before).

    python tools/op_overhead.py        # CPU, tiny tensors: the time is the dispatch, not the arithmetic

Printed per call, median of 5 runs of 20,000 calls. Run on this project's 2-core CPU box (docs/fastpath.md).
"""
from __future__ import annotations

import statistics
import time

import torch


def per_call_us(fn, n: int = 20000) -> float:
    for _ in range(200):
        fn()
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(runs)


def main() -> None:
    from tunelab.model.fast import lora

    torch.set_num_threads(1)

    @torch.library.custom_op("tunelab_probe::two_products", mutates_args=())
    def as_custom_op(a1: torch.Tensor, b1: torch.Tensor, bias: torch.Tensor | None, a2: torch.Tensor,
                     b2: torch.Tensor, alpha: float) -> torch.Tensor:
        return lora._two_products_eager(a1, b1, bias, a2, b2, alpha)

    a1, b1, a2, b2 = torch.randn(4, 8), torch.randn(8, 4), torch.randn(4, 2), torch.randn(2, 4)
    library_op = torch.ops.tunelab.two_products.default
    custom = torch.ops.tunelab_probe.two_products.default
    for name, fn in (("inline body", lambda: lora._two_products_eager(a1, b1, None, a2, b2, 0.5)),
                     ("tunelab::two_products (Library op)", lambda: library_op(a1, b1, None, a2, b2, 0.5)),
                     ("the same as a custom_op", lambda: custom(a1, b1, None, a2, b2, 0.5))):
        print(f"{name:38s} {per_call_us(fn):6.1f} us a call")


if __name__ == "__main__":
    main()
