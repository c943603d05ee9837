"""What `accelerate estimate-memory MODEL --library_name transformers` prints, offline (docs/estimate.md).

    python tools/estimate_accelerate.py Qwen/Qwen2.5-7B-Instruct Qwen/Qwen2.5-1.5B-Instruct

accelerate's command first asks the Hub about the model (so it fails offline); this runs the rest of it with
accelerate's own functions: the model built on the meta device by AutoModel.from_config in float32 from the
config tunelab has built in, then calculate_maximum_sizes, estimate_training_usage and its table.
"""
from __future__ import annotations

import sys


def accelerate_table(name: str) -> str:
    import torch
    from accelerate import init_empty_weights
    from accelerate.commands.estimate import create_ascii_table, estimate_training_usage
    from accelerate.utils import calculate_maximum_sizes, convert_bytes
    from transformers import AutoModel, Qwen2Config

    from tunelab.estimate import model_shape

    s = model_shape(name)
    config = Qwen2Config(hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
                         num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, vocab_size=s.vocab,
                         tie_word_embeddings=s.tied, max_position_embeddings=s.max_positions)
    with init_empty_weights():
        model = AutoModel.from_config(config, torch_dtype=torch.float32)  # as accelerate does: AutoModel, fp32
    total, largest = calculate_maximum_sizes(model)
    rows = []
    for dtype, div in (("float32", 1), ("float16", 2), ("int8", 4), ("int4", 8)):
        usage = max(estimate_training_usage(total, dtype).values())
        rows.append([dtype, convert_bytes(largest[0] / div), convert_bytes(total / div), convert_bytes(usage) if usage != -1 else "N/A"])
    return create_ascii_table(["dtype", "Largest Layer", "Total Size", "Training using Adam"], rows,
                              f"Memory Usage for loading `{name}`")


if __name__ == "__main__":
    for model in sys.argv[1:] or ["Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct"]:
        print(accelerate_table(model))
