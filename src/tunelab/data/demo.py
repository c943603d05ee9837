"""The offline demo dataset of the quickstart: alpaca format, a few Chinese and English questions, plus a toy task.

The toy task is counting down ("Count down from 7 to 1." -> "7, 6, 5, 4, 3, 2, 1"), chosen because a 2-layer,
64-wide random-init model learns it visibly in 120 QLoRA steps on a CPU, stop included: every next number depends
only on the one before, and the answer always ends with "2, 1" and the end-of-turn token. What it learns only partly
is where to start (copying the number from the prompt). Measured with examples/quickstart.yaml (tests/test_quickstart.py):
on the 24 held-out prompts of demo_eval.json every greedy answer is a count down that stops after "1", and 7 of 24
are exactly right ("Count down from 5 to 1." -> "5, 4, 3, 2, 1"). An earlier count-up task ("Count from 1 to 7.")
was not learnable in that budget: the model counted past the asked number and never stopped (0 of 24 right).
Deterministic for a seed.
"""
from __future__ import annotations

import json
import os
import random

TOY_LANGUAGES = ("en",)

GENERAL = [
    ("Say hello in French.", "", "Bonjour!"),
    ("Translate to English.", "你好，世界", "Hello, world."),
    ("What is the capital of France?", "", "The capital of France is Paris."),
    ("Give a synonym of 'happy'.", "", "Joyful."),
    ("What is 2 + 3?", "", "2 + 3 = 5."),
    ("Name a primary color.", "", "Red is a primary color."),
    ("Reverse the word.", "abc", "cba"),
    ("用一句话介绍你自己。", "", "我是一个乐于助人的助手。"),
    ("把这句话翻译成中文。", "Good morning.", "早上好。"),
    ("中国的首都是哪里？", "", "中国的首都是北京。"),
    ("写出三种水果。", "", "苹果、香蕉、橙子。"),
    ("3 加 4 等于多少？", "", "3 加 4 等于 7。"),
    ("说出一种颜色。", "", "蓝色。"),
    ("一年有几个季节？", "", "一年有四个季节：春、夏、秋、冬。"),
]


def count_down(n: int) -> str:
    return ", ".join(str(i) for i in range(n, 0, -1))


def toy_prompt(n: int, lang: str) -> str:
    return f"从{n}倒数到1。" if lang == "zh" else f"Count down from {n} to 1."


def demo_records(n_toy: int = 240, seed: int = 0, general: bool = True, languages: tuple[str, ...] = TOY_LANGUAGES) -> list[dict]:
    """The general samples (once each) and n_toy count-down samples, n in 3..9, languages taking turns; shuffled."""
    rng = random.Random(seed)
    records = [{"instruction": i, "input": x, "output": o} for i, x, o in GENERAL] if general else []
    for k in range(n_toy):
        n = rng.randint(3, 9)
        records.append({"instruction": toy_prompt(n, languages[k % len(languages)]), "input": "", "output": count_down(n)})
    rng.shuffle(records)
    return records


def write_demo_dataset(dataset_dir: str, seed: int = 0) -> dict[str, str]:
    """Write demo_train.json and demo_eval.json and register them (name -> path)."""
    from tunelab.utils.io import atomic_write_json

    os.makedirs(dataset_dir, exist_ok=True)
    train = demo_records(seed=seed)
    evals = demo_records(n_toy=24, seed=seed + 1, general=False)  # held-out toy prompts: what learning shows on
    paths = {"demo": os.path.join(dataset_dir, "demo_train.json"), "demo_eval": os.path.join(dataset_dir, "demo_eval.json")}
    atomic_write_json(paths["demo"], train)
    atomic_write_json(paths["demo_eval"], evals)
    info_path = os.path.join(dataset_dir, "dataset_info.json")
    info = {}
    if os.path.isfile(info_path):
        with open(info_path, encoding="utf-8") as fh:
            info = json.load(fh)
    info["demo"] = {"file_name": "demo_train.json", "formatting": "alpaca"}
    info["demo_eval"] = {"file_name": "demo_eval.json", "formatting": "alpaca"}
    atomic_write_json(info_path, info)
    return paths
