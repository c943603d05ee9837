"""The offline demo dataset of the quickstart: alpaca format, Chinese and English, plus a toy task.

The toy task ("Count from 1 to 7." -> "1, 2, 3, 4, 5, 6, 7") is something a tiny random-init model visibly
learns in a minute on a CPU: its loss falls from ~12 (uniform over 152k tokens) to well under 1, and after
training `tunelab chat` answers a counting prompt it was not shown verbatim. Deterministic for a seed.
"""
from __future__ import annotations

import json
import os
import random

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


def _count(n: int) -> str:
    return ", ".join(str(i) for i in range(1, n + 1))


def demo_records(n_toy: int = 240, seed: int = 0, general: bool = True) -> list[dict]:
    rng = random.Random(seed)
    records = [{"instruction": i, "input": x, "output": o} for i, x, o in GENERAL] if general else []
    for k in range(n_toy):
        n = rng.randint(3, 9)
        if k % 2:
            records.append({"instruction": f"从1数到{n}。", "input": "", "output": _count(n)})
        else:
            records.append({"instruction": f"Count from 1 to {n}.", "input": "", "output": _count(n)})
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
