"""The multi-GPU figures of issue 13, measured with `tunelab train` itself (its launcher, its Trainer path), on a
machine of two or more GPUs (nvidia-h200-x2). Not run in this session: no several-GPU machine was lent.

    export PYTHONPATH=$PWD/.devsite:$PWD/src:$PYTHONPATH
    python3 tools/multigpu_measure.py --only ddp --out $OUT              # 7B QLoRA: 1 GPU vs DDP x2
    python3 tools/multigpu_measure.py --only fsdp --out $OUT             # 7B QLoRA FSDP2 x2 vs 1 GPU (peak memory)
    python3 tools/multigpu_measure.py --only 32b --out $OUT              # 32B bf16 LoRA, FSDP2 x2
    python3 tools/multigpu_measure.py --only accelerate --out $OUT       # accelerate launch, LLaMA-Factory's FSDP2 file

Cases (each one `tunelab train cfg.yaml` in its own process group; results.jsonl gets one JSON line per case):
  single     7B-architecture QLoRA (NF4, double quant, bf16), LoRA r=8 all linear, batch 4 x 1024, CUDA_VISIBLE_DEVICES=0
  ddp        the same job on CUDA_VISIBLE_DEVICES=0,1: tunelab re-launches itself under torchrun, 4 x 1024 per GPU
  fsdp       the same with fsdp: full_shard (FSDP2, FULL_STATE_DICT saves), 4 x 1024 per GPU; then the saved adapter is
             loaded on one GPU with plain PeftModel.from_pretrained and run once; and single-plain, the one-GPU job
             with use_fast_kernels: false (FSDP turns the fast path off), for a like-for-like memory ratio
  32b        Qwen2.5-32B architecture, bf16 weights (no quantization), LoRA r=8, fsdp: full_shard over 2 GPUs,
             --batch-32b x 1024 per GPU
  accelerate the 7B QLoRA job under `accelerate launch --config_file <LLaMA-Factory's fsdp2_config.yaml> -m tunelab train`
  deepspeed  the 7B QLoRA job with LLaMA-Factory's ds_z3_config.json (only if deepspeed is importable; the device
             image has none, and DeepSpeed ships no wheel to carry)

Method: random-init models of the published architectures saved as safetensors (speed and memory depend on the
shapes only); alpaca records whose reply is longer than cutoff_len, so every sample is exactly 1024 tokens
(prompt masked); use_fast_kernels left to auto (on for one GPU and DDP, off under FSDP, where tunelab turns it
off); gradient checkpointing; adamw_torch_fused; logging every step. Speed: from trainer_log.jsonl, whose
tokens_per_second is the cumulative count over the elapsed time since the first step began (global: all ranks'
tokens); with exactly 1024 tokens per sample the elapsed time at step k is tokens(k) / tokens_per_second(k), so the
rate over steps WARM+1..N excludes the first WARM steps. Peak memory: rank 0's torch.cuda.max_memory_allocated
(peak_memory_allocated_gib in all_results.json). Targets (issue 13): ddp >= 1.85 x single tokens/s; fsdp peak <=
0.60 x single peak.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time

QWEN25_32B = dict(model_type="qwen2", hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                  num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6)
WORDS = ("the quick brown fox jumps over lazy dog river mountain light water stone green small house city night "
         "music paper garden window silver ocean cloud forest winter summer bright quiet morning story answer "
         "number simple market bridge yellow travel friend letter garden family teacher learning").split()
LF_FSDP2 = """compute_environment: LOCAL_MACHINE
debug: false
distributed_type: FSDP
downcast_bf16: 'no'
fsdp_config:
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_cpu_ram_efficient_loading: true
  fsdp_offload_params: false
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_version: 2
machine_rank: 0
main_training_function: main
mixed_precision: bf16
num_machines: 1
num_processes: 2
rdzv_backend: static
same_network: true
tpu_env: []
tpu_use_cluster: false
tpu_use_sudo: false
use_cpu: false
"""
LF_DS_Z3 = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_allow_untested_optimizer": True, "bf16": {"enabled": "auto"},
            "zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True, "sub_group_size": 1e9,
                                  "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                  "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
                                  "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True}}


def build_models(root: str, which: list[str]) -> dict[str, str]:
    """Random-init 7B / 32B architecture folders with the offline Qwen2.5 tokenizer (reused when present)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.bench import build_random_model
    from tunelab.model.tokenizer import build_qwen_tokenizer

    out = {}
    if "7b" in which:
        out["7b"] = build_random_model("qwen2.5-7b", os.path.join(root, "qwen2.5-7b"))
    if "32b" in which:
        path = os.path.join(root, "qwen2.5-32b")
        if not os.path.isfile(os.path.join(path, "config.json")):
            fields = dict(QWEN25_32B)
            config = AutoConfig.for_model(fields.pop("model_type"), **fields, torch_dtype="bfloat16")
            torch.manual_seed(0)
            with torch.device("cuda"):  # 64 GB of bf16 fits one H200; initialised on the GPU in seconds
                model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
            model.save_pretrained(path, max_shard_size="5GB")
            del model
            torch.cuda.empty_cache()
        out["32b"] = path
    for path in out.values():
        if not os.path.isfile(os.path.join(path, "tokenizer.json")):
            build_qwen_tokenizer(path)
    return out


def write_data(root: str, n: int = 512) -> str:
    """alpaca records with ~1500-word replies: every sample is cut to exactly cutoff_len (1024) tokens."""
    data_dir = os.path.join(root, "data")
    os.makedirs(data_dir, exist_ok=True)
    rng = random.Random(0)
    records = [{"instruction": f"Write a long story, part {i}.", "input": "",
                "output": " ".join(rng.choice(WORDS) for _ in range(1500))} for i in range(n)]
    with open(os.path.join(data_dir, "long.json"), "w", encoding="utf-8") as fh:
        json.dump(records, fh)
    with open(os.path.join(data_dir, "dataset_info.json"), "w", encoding="utf-8") as fh:
        json.dump({"long": {"file_name": "long.json", "formatting": "alpaca"}}, fh)
    return data_dir


def job(model: str, data_dir: str, out_dir: str, batch: int, steps: int, **extra) -> dict:
    cfg = dict(model_name_or_path=model, template="qwen", dataset="long", dataset_dir=data_dir, cutoff_len=1024,
               output_dir=out_dir, overwrite_output_dir=True, per_device_train_batch_size=batch, max_steps=steps,
               logging_steps=1, save_strategy="no", learning_rate=1e-4, lr_scheduler_type="constant", bf16=True,
               lora_rank=8, lora_alpha=16, lora_dropout=0.0, lora_target="all", optim="adamw_torch_fused",
               report_to="none", seed=42)
    cfg.update(extra)
    return cfg


def rates(out_dir: str, tokens_per_step: int, warm: int) -> dict:
    """Tokens/s over steps warm+1..last from trainer_log.jsonl (see the module docstring), rank 0's peak memory."""
    with open(os.path.join(out_dir, "trainer_log.jsonl"), encoding="utf-8") as fh:
        log = [json.loads(line) for line in fh if '"loss"' in line]
    with open(os.path.join(out_dir, "all_results.json"), encoding="utf-8") as fh:
        results = json.load(fh)
    last = max(r["current_steps"] for r in log)
    if results.get("num_input_tokens_seen"):  # the real count (all ranks), in case a sample came out shorter
        tokens_per_step = results["num_input_tokens_seen"] / last
    elapsed = {r["current_steps"]: r["current_steps"] * tokens_per_step / r["tokens_per_second"] for r in log}
    rate = (last - warm) * tokens_per_step / (elapsed[last] - elapsed[warm])
    peak = results.get("peak_memory_allocated_gib") or max(r.get("gpu_memory_gib", 0) for r in log)
    return {"tokens_per_second": round(rate, 1), "steps_timed": f"{warm + 1}..{last}", "tokens_per_step": tokens_per_step,
            "step_seconds": round(tokens_per_step / rate, 3), "peak_allocated_gib_rank0": peak,
            "peak_reserved_gib_rank0": results.get("peak_memory_reserved_gib"),
            "losses": [round(r["loss"], 4) for r in log]}


def run_case(name: str, cfg: dict, gpus: str, nproc: int, args, launcher: list[str] | None = None) -> dict:
    import yaml

    case_dir = os.path.join(args.root, name)
    os.makedirs(case_dir, exist_ok=True)
    cfg_path = os.path.join(case_dir, "cfg.yaml")
    with open(cfg_path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg, fh)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpus, PYTHONUNBUFFERED="1", TUNELAB_CACHE=os.path.join(args.root, "cache"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for var, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
        env[var] = value  # NVLink multicast stays off on the lent machines (KINDS.md)
    cmd = (launcher or [sys.executable, "-m", "tunelab.cli", "train"]) + [cfg_path]
    t0 = time.time()
    with open(os.path.join(args.out, f"{name}.log"), "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout)
    rec = {"case": name, "gpus": gpus, "processes": nproc, "rc": proc.returncode, "wall_s": round(time.time() - t0, 1),
           "batch_per_gpu": cfg["per_device_train_batch_size"], "seq": cfg["cutoff_len"],
           "command": " ".join(cmd[:-1] + ["cfg.yaml"])}
    if proc.returncode == 0:
        rec.update(rates(cfg["output_dir"], cfg["per_device_train_batch_size"] * cfg["cutoff_len"] * nproc, args.warm))
    print(json.dumps(rec), flush=True)
    with open(os.path.join(args.out, "results.jsonl"), "a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec) + "\n")
    return rec


def adapter_loads_on_one_gpu(model: str, adapter: str, args) -> dict:
    """The FSDP run's final adapter through plain transformers + PEFT on GPU 0 (one forward pass)."""
    code = (
        "import torch,sys; from transformers import AutoModelForCausalLM, BitsAndBytesConfig; from peft import PeftModel\n"
        "q=BitsAndBytesConfig(load_in_4bit=True,bnb_4bit_quant_type='nf4',bnb_4bit_use_double_quant=True,"
        "bnb_4bit_compute_dtype=torch.bfloat16,bnb_4bit_quant_storage=torch.bfloat16)\n"
        "m=AutoModelForCausalLM.from_pretrained(sys.argv[1],quantization_config=q,dtype=torch.bfloat16,device_map={'':0})\n"
        "m=PeftModel.from_pretrained(m,sys.argv[2]); x=torch.randint(1000,9000,(1,64),device='cuda')\n"
        "print('loss', float(m(input_ids=x,labels=x).loss))"
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="0")
    proc = subprocess.run([sys.executable, "-c", code, model, adapter], env=env, capture_output=True, text=True, timeout=600)
    rec = {"case": "fsdp-adapter-on-one-gpu", "rc": proc.returncode, "tail": (proc.stdout + proc.stderr)[-400:]}
    print(json.dumps(rec), flush=True)
    with open(os.path.join(args.out, "results.jsonl"), "a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec) + "\n")
    return rec


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="ddp,fsdp", help="comma list of ddp (= single + ddp), fsdp, 32b, accelerate, deepspeed")
    p.add_argument("--root", default="/tmp/tunelab-multigpu", help="models, data and run folders")
    p.add_argument("--out", default=os.environ.get("OUT", "multigpu-out"), help="logs and results.jsonl")
    p.add_argument("--steps", type=int, default=13)
    p.add_argument("--warm", type=int, default=3, help="steps left out of the timing")
    p.add_argument("--batch-32b", type=int, default=4)
    p.add_argument("--timeout", type=int, default=560)
    args = p.parse_args()
    only = set(args.only.split(","))
    os.makedirs(args.out, exist_ok=True)
    models = build_models(args.root, (["7b"] if only - {"32b"} else []) + (["32b"] if "32b" in only else []))
    data = write_data(args.root)
    qlora = dict(quantization_bit=4, quantization_type="nf4", double_quantization=True)
    def run(name: str) -> str:
        return os.path.join(args.root, name, "out")

    recs = {}
    if "ddp" in only:
        recs["single"] = run_case("single", job(models["7b"], data, run("single"), 4, args.steps, **qlora), "0", 1, args)
        recs["ddp"] = run_case("ddp", job(models["7b"], data, run("ddp"), 4, args.steps, **qlora), "0,1", 2, args)
    if "fsdp" in only:
        recs["fsdp"] = run_case("fsdp", job(models["7b"], data, run("fsdp"), 4, args.steps, fsdp="full_shard", **qlora), "0,1", 2, args)
        if recs["fsdp"]["rc"] == 0:
            adapter_loads_on_one_gpu(models["7b"], run("fsdp"), args)
        if "single" not in recs:  # the one-GPU reference of the ratio, when ddp is not in this call
            recs["single"] = run_case("single", job(models["7b"], data, run("single"), 4, args.steps, **qlora), "0", 1, args)
        # FSDP turns the fast LoRA path off: the same path on one GPU, for a like-for-like memory ratio too
        recs["single-plain"] = run_case("single-plain", job(models["7b"], data, run("single-plain"), 4, args.steps,
                                                            use_fast_kernels=False, **qlora), "0", 1, args)
    if "32b" in only:
        steps = min(args.steps, 8)
        recs["32b"] = run_case("32b", job(models["32b"], data, run("32b"), args.batch_32b, steps, fsdp="full_shard"), "0,1", 2, args)
    if "accelerate" in only:
        acc = os.path.join(args.root, "fsdp2_config.yaml")
        with open(acc, "w", encoding="utf-8") as fh:
            fh.write(LF_FSDP2)
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", acc, "-m", "tunelab", "train"]
        recs["accelerate"] = run_case("accelerate", job(models["7b"], data, run("accelerate"), 4, 6, **qlora), "0,1", 2, args, launcher)
    if "deepspeed" in only:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            print(json.dumps({"case": "deepspeed", "skipped": "deepspeed is not installed"}))
        else:
            ds = os.path.join(args.root, "ds_z3_config.json")
            with open(ds, "w", encoding="utf-8") as fh:
                json.dump(LF_DS_Z3, fh)
            recs["deepspeed"] = run_case("deepspeed", job(models["7b"], data, run("deepspeed"), 4, args.steps, deepspeed=ds, **qlora), "0,1", 2, args)
    summary = {}
    ok = {k: r for k, r in recs.items() if r.get("rc") == 0}
    if "single" in ok and "ddp" in ok:
        summary["ddp_scaling"] = round(ok["ddp"]["tokens_per_second"] / ok["single"]["tokens_per_second"], 3)
    if "single" in ok and "fsdp" in ok:
        summary["fsdp_peak_ratio"] = round(ok["fsdp"]["peak_allocated_gib_rank0"] / ok["single"]["peak_allocated_gib_rank0"], 3)
    if "single-plain" in ok and "fsdp" in ok:
        summary["fsdp_peak_ratio_same_path"] = round(ok["fsdp"]["peak_allocated_gib_rank0"] / ok["single-plain"]["peak_allocated_gib_rank0"], 3)
    if "32b" in ok:
        summary["32b_tokens_per_second"] = ok["32b"]["tokens_per_second"]
    print(json.dumps({"summary": summary}), flush=True)
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump({"summary": summary, "cases": recs}, fh, indent=1)
    if os.environ.get("TUNELAB_MULTIGPU_KEEP") != "1":
        for name in recs:
            shutil.rmtree(os.path.join(args.root, name), ignore_errors=True)
    return 0 if all(r.get("rc") == 0 for r in recs.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
