"""`tunelab estimate`: GPU memory of a training run predicted from the model's config, before anything is loaded.

    from tunelab.estimate import estimate, model_shape, Setup
    est = estimate(model_shape("Qwen/Qwen2.5-7B-Instruct"), Setup(method="qlora", batch=4, seq=1024))

archs.py (model shapes: built-in configs, config.json, HF cache), terms.py (each memory term, formula in its
docstring), memory.py (the moments of a step and the peak), fit.py (GPUs, what fits, recommendations, batch
auto), report.py (table and JSON). Plain arithmetic: no torch, no weights.
"""
from tunelab.estimate.archs import ModelShape, model_shape
from tunelab.estimate.memory import Estimate, Setup, estimate

__all__ = ["Estimate", "ModelShape", "Setup", "estimate", "model_shape"]
