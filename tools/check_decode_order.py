"""Is the bf16 gap between plain generate and the engine real or an order/warm-up effect? Alternates them.

    PYTHONPATH=src python tools/check_decode_order.py /tmp/bench7b/base
"""
import sys
import time

import torch
from transformers import AutoModelForCausalLM

from tunelab.infer import Engine, GenerationSettings

sys.path.insert(0, "tools")
from bench_infer import _Ids  # noqa: E402

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, device_map={"": 0}).eval()
print("generation_config:", model.generation_config.to_diff_dict())
engine = Engine(model, _Ids(), None, settings=GenerationSettings(do_sample=False, max_new_tokens=128), max_batch_size=1)
prompt = torch.randint(0, 150000, (1, 128), generator=torch.Generator().manual_seed(1))


def plain(n):
    return model.generate(input_ids=prompt.cuda(), attention_mask=torch.ones_like(prompt).cuda(), do_sample=False,
                          max_new_tokens=n, min_new_tokens=n, pad_token_id=151643, repetition_penalty=1.0)


def eng(n):
    return engine.generate_ids(prompt.tolist(), max_new_tokens=n, min_new_tokens=n, stop_token_ids=())


plain(8), eng(8)
for round_ in range(3):
    for name, fn in (("plain", plain), ("engine", eng)) if round_ % 2 == 0 else (("engine", eng), ("plain", plain)):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn(128)
        torch.cuda.synchronize()
        print(f"round {round_} {name}: {128 / (time.perf_counter() - t):.1f} tokens/s", flush=True)
