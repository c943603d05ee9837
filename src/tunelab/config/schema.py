"""Every configuration key tunelab accepts, with its type, default and help text, in one place.

Keys are LLaMA-Factory's flat names, so a tutorial's YAML runs unchanged. Internally they are grouped into
typed sections (model, quantization, adapter, data, train, generation, export, eval). A closed choice is a
`Literal[...]`: the parser, the validation messages and `tunelab <cmd> --help` all read the same definition.

A section is a dataclass; `field(..., metadata={"help": ...})` carries the help text. `None` means
"not set / let tunelab decide", and the decision is recorded in the resolved config, never written back here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union


def opt(default, help: str, **extra):  # noqa: A002 - "help" reads best at the call sites
    """A dataclass field with help text (and an optional list of deprecated aliases)."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class ModelArgs:
    model_name_or_path: Optional[str] = opt(None, "Local folder, Hugging Face hub id or ModelScope id of the base model.")
    adapter_name_or_path: Optional[str] = opt(
        None, "LoRA adapter(s) to load (comma list): a folder with adapter_config.json, a run folder or a checkpoint."
    )
    cache_dir: Optional[str] = opt(None, "Where downloaded models and datasets are cached.")
    model_revision: str = opt("main", "Branch, tag or commit of the hub model.")
    hf_hub_token: Optional[str] = opt(None, "Token for gated or private hub models.")
    use_modelscope_hub: bool = opt(False, "Download from ModelScope instead of the Hugging Face hub (also USE_MODELSCOPE_HUB=1).")
    trust_remote_code: bool = opt(False, "Allow model/tokenizer code from the model repository to run.")
    template: str = opt(
        "auto", "Chat template: auto (the tokenizer's own), qwen, qwen3, qwen3_nothink, chatml, llama3, llama2, default, fewshot (plain text, for evaluation)."
    )
    enable_thinking: bool = opt(True, "Qwen3: thinking mode (LLaMA-Factory's default true: a reply's think block is trained; false puts the empty <think></think> block in the prompt).")
    default_system: Optional[str] = opt(None, "System prompt used when a sample has none (overrides the template's default).")
    flash_attn: Literal["auto", "disabled", "sdpa", "fa2", "eager"] = opt(
        "auto", "Attention implementation: auto (SDPA where available), sdpa, fa2 (flash-attn package), eager, disabled (= eager)."
    )
    use_fast_tokenizer: bool = opt(True, "Use the fast (Rust) tokenizer.")
    enable_liger_kernel: Optional[bool] = opt(
        None, "Liger Kernel's RMSNorm/RoPE/SwiGLU: null = on for CUDA GPUs when liger-kernel is installed, true = required, false = off."
    )
    use_fast_kernels: Optional[bool] = opt(
        None, "tunelab's fast LoRA/QLoRA training path (fused LoRA projections): null = on where it applies (CUDA, Qwen2/Qwen3/Llama LoRA), false = the plain path, true = required."
    )
    use_unsloth: bool = opt(False, "Accepted for LLaMA-Factory compatibility; tunelab uses its own kernel selection, so this only prints a note.")
    low_cpu_mem_usage: bool = opt(True, "Load weights without a full extra copy in RAM.")
    infer_dtype: Literal["auto", "float16", "bfloat16", "float32"] = opt("auto", "Weights dtype for chat/eval/export inference.")
    rope_scaling: Optional[Literal["linear", "dynamic", "yarn", "llama3"]] = opt(None, "RoPE scaling to extend the context.")


@dataclass
class QuantizationArgs:
    quantization_bit: Optional[Literal[4, 8]] = opt(None, "Load the base model's weights in 4 or 8 bits with bitsandbytes (QLoRA).")
    quantization_method: Literal["bnb", "bitsandbytes"] = opt("bnb", "Quantization backend (bitsandbytes).")
    quantization_type: Literal["nf4", "fp4"] = opt("nf4", "4-bit data type.")
    double_quantization: bool = opt(True, "Quantize the 4-bit quantization constants too (saves ~0.4 bit/param).")
    quantization_device_map: Optional[Literal["auto"]] = opt(None, "Device map for quantized inference (auto to spread over devices).")


@dataclass
class AdapterArgs:
    finetuning_type: Literal["lora", "freeze", "full"] = opt("lora", "What to train: LoRA adapters, the last layers (freeze) or everything (full).")
    lora_rank: int = opt(8, "LoRA rank r.")
    lora_alpha: Optional[int] = opt(None, "LoRA alpha (default: 2 x lora_rank).")
    lora_dropout: float = opt(0.0, "Dropout on the LoRA input.")
    lora_target: str = opt("all", "Modules to adapt: all (every linear layer except the output head) or a comma list (q_proj,v_proj).")
    additional_target: Optional[str] = opt(None, "Extra modules to train fully and save with the adapter (comma list, e.g. embed_tokens,lm_head).")
    use_rslora: bool = opt(False, "Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    use_dora: bool = opt(False, "Weight-decomposed LoRA (DoRA).")
    loraplus_lr_ratio: Optional[float] = opt(None, "LoRA+: learning-rate ratio of B over A.")
    create_new_adapter: bool = opt(False, "With adapter_name_or_path: merge the given adapter(s) and train a fresh one on top.")
    freeze_trainable_layers: int = opt(2, "freeze: how many layers to train (positive: the last n, negative: the first n).")
    freeze_trainable_modules: str = opt("all", "freeze: which modules of those layers to train (all or a comma list).")
    freeze_extra_modules: Optional[str] = opt(None, "freeze: extra modules outside the layers to train (comma list).")


@dataclass
class DataArgs:
    dataset: Optional[str] = opt(None, "Training dataset(s): names in dataset_dir/dataset_info.json, built-in names, or paths (comma list).")
    eval_dataset: Optional[str] = opt(None, "Evaluation dataset(s), same forms as dataset.")
    dataset_dir: str = opt("data", "Folder holding dataset_info.json and the data files.")
    cutoff_len: int = opt(2048, "Maximum tokens per sample after the template (longer samples are truncated).")
    max_samples: Optional[int] = opt(None, "Use at most this many samples of each dataset (for quick runs).")
    val_size: float = opt(0.0, "Hold out this fraction (0-1) or this many samples (>=1) of the training data for evaluation.")
    overwrite_cache: bool = opt(False, "Re-tokenize even when a cached tokenized copy of the same data exists.")
    preprocessing_num_workers: Optional[int] = opt(None, "Processes used for tokenization.")
    preprocessing_batch_size: int = opt(1000, "Samples per tokenization batch.")
    packing: Optional[bool] = opt(None, "Pack several samples into one sequence (attention kept within each sample).")
    neat_packing: bool = opt(False, "Accepted for LLaMA-Factory compatibility; tunelab's packing never attends across samples.")
    train_on_prompt: bool = opt(False, "Also train on prompt tokens.")
    mask_history: bool = opt(False, "Train on the last assistant turn only.")
    skip_invalid: bool = opt(False, "Skip invalid records (and report how many) instead of stopping.")
    streaming: bool = opt(False, "Accepted for LLaMA-Factory compatibility; true is refused for now (not implemented).")
    buffer_size: int = opt(16384, "Shuffle buffer size when streaming.")
    tokenized_path: Optional[str] = opt(None, "Folder to save / load the tokenized dataset.")
    tool_format: Optional[str] = opt(None, "Accepted for LLaMA-Factory compatibility; tools are rendered by the chat template.")


@dataclass
class TrainArgs:
    stage: Literal["sft"] = opt("sft", "Training stage (supervised fine-tuning).")
    do_train: bool = opt(False, "Run training (LLaMA-Factory's default is false: a training config sets do_train: true).")
    do_eval: bool = opt(False, "Evaluate once at the end (eval_loss).")
    do_predict: bool = opt(False, "Generate for eval_dataset (or the val_size split) and write generated_predictions.jsonl + predict_results.json (needs predict_with_generate).")
    predict_with_generate: bool = opt(False, "With do_predict: generate the answers (LLaMA-Factory requires it for do_predict).")
    output_dir: str = opt("saves/run", "Where the adapter, checkpoints, logs and plots go.")
    overwrite_output_dir: bool = opt(False, "Start over in a non-empty output_dir (otherwise a run with checkpoints resumes).")
    resume_from_checkpoint: Optional[Union[bool, str]] = opt(None, "A checkpoint folder, or true for the latest in output_dir.")
    num_train_epochs: float = opt(3.0, "Epochs (ignored when max_steps > 0).")
    max_steps: int = opt(-1, "Total optimizer steps (overrides num_train_epochs when > 0).")
    per_device_train_batch_size: Union[int, Literal["auto"]] = opt(
        8, "Samples per batch; auto: the largest power of two (up to 64) that tunelab's memory estimate fits into the GPU's free memory (1 on a CPU)."
    )
    per_device_eval_batch_size: int = opt(8, "Samples per evaluation (and do_predict) batch.")
    gradient_accumulation_steps: int = opt(1, "Batches per optimizer step.")
    learning_rate: float = opt(5e-5, "Peak learning rate.")
    lr_scheduler_type: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
        "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay",
    ] = opt("linear", "Learning-rate schedule.")
    warmup_ratio: float = opt(0.0, "Fraction of steps for linear warm-up.")
    warmup_steps: int = opt(0, "Warm-up steps (overrides warmup_ratio when > 0).")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    adam_beta1: float = opt(0.9, "AdamW beta1.")
    adam_beta2: float = opt(0.999, "AdamW beta2.")
    adam_epsilon: float = opt(1e-8, "AdamW epsilon.")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0 disables).")
    optim: Literal[
        "adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw_bnb_8bit",
        "adafactor", "sgd",
    ] = opt("adamw_torch", "Optimizer.")
    seed: int = opt(42, "Random seed (data order, dropout, initialisation).")
    fp16: bool = opt(False, "Train in float16 mixed precision.")
    bf16: bool = opt(False, "Train in bfloat16 mixed precision.")
    pure_bf16: bool = opt(False, "Keep everything in bf16 (no fp32 master weights).")
    gradient_checkpointing: Optional[bool] = opt(None, "Recompute activations in backward to save memory (default on).")
    disable_gradient_checkpointing: bool = opt(False, "LLaMA-Factory's switch to turn gradient checkpointing off.")
    logging_steps: int = opt(10, "Log every n optimizer steps.")
    save_strategy: Literal["steps", "epoch", "no"] = opt("steps", "When to save checkpoints.")
    save_steps: int = opt(500, "Save a checkpoint every n steps.")
    save_total_limit: Optional[int] = opt(None, "Keep at most this many checkpoints (the best one is kept too).")
    save_only_model: bool = opt(False, "Checkpoints hold only the adapter/model (no optimizer state: cannot resume exactly).")
    eval_strategy: Literal["no", "steps", "epoch"] = opt("no", "When to evaluate (needs val_size or eval_dataset).")
    eval_steps: Optional[int] = opt(None, "Evaluate every n steps (default: logging_steps when set, else 500, as LLaMA-Factory).")
    load_best_model_at_end: bool = opt(False, "At the end, load the checkpoint with the lowest eval_loss.")
    metric_for_best_model: str = opt("eval_loss", "Metric that picks the best checkpoint.")
    plot_loss: bool = opt(False, "Write training_loss.png (and training_eval_loss.png) at the end.")
    report_to: str = opt("none", "Experiment tracking: none, all, or a comma list of tensorboard, wandb, swanlab, mlflow.")
    run_name: Optional[str] = opt(None, "Run name for experiment trackers.")
    logging_dir: Optional[str] = opt(None, "TensorBoard log folder (default: output_dir/runs).")
    use_swanlab: bool = opt(False, "Log to SwanLab (same as adding swanlab to report_to).")
    swanlab_project: Optional[str] = opt("tunelab", "SwanLab project name.")
    swanlab_run_name: Optional[str] = opt(None, "SwanLab experiment name.")
    swanlab_workspace: Optional[str] = opt(None, "SwanLab workspace.")
    swanlab_api_key: Optional[str] = opt(None, "SwanLab API key.")
    swanlab_mode: Literal["cloud", "local", "offline", "disabled"] = opt("cloud", "SwanLab mode.")
    dataloader_num_workers: int = opt(0, "Worker processes for the data loader.")
    dataloader_pin_memory: bool = opt(True, "Pin host memory for faster GPU transfer.")
    ddp_timeout: int = opt(1800, "Timeout (s) for distributed operations.")
    group_by_length: bool = opt(False, "Batch samples of similar length together (less padding).")
    deepspeed: Optional[str] = opt(None, "DeepSpeed JSON config (LLaMA-Factory's ds_z2_config.json / ds_z3_config.json): ZeRO-2/3 over the GPUs (pip install 'tunelab[deepspeed]').")
    fsdp: Optional[str] = opt(None, "Shard the model with FSDP2 over the GPUs: full_shard (or shard_grad_op, with offload to add CPU offload).")
    fsdp_config: Optional[str] = opt(None, "JSON file of FSDP settings (transformers' fsdp_config keys; version 2 is the default).")
    plot_smoothing: Optional[float] = opt(None, "Smoothing weight of the smoothed loss curve: null = LLaMA-Factory's adaptive weight (grows with the number of points), or a fixed weight in [0, 1).")
    nan_check: bool = opt(True, "Stop the run on a NaN/infinite loss, keeping the last good checkpoint.")


@dataclass
class GenerationArgs:
    do_sample: bool = opt(True, "Sample (true) or greedy decoding (false).")
    temperature: float = opt(0.95, "Sampling temperature.")
    top_p: float = opt(0.7, "Nucleus sampling probability mass.")
    top_k: int = opt(50, "Sample from the k most likely tokens.")
    num_beams: int = opt(1, "Beam search width (1 = no beam search).")
    max_new_tokens: int = opt(1024, "Maximum tokens to generate per answer.")
    max_length: Optional[int] = opt(1024, "Maximum total length (prompt + answer), used only when max_new_tokens <= 0 (as LLaMA-Factory).")
    repetition_penalty: float = opt(1.0, "Penalty > 1 discourages repeating tokens.")
    length_penalty: float = opt(1.0, "Beam search length penalty.")
    system: Optional[str] = opt(None, "System prompt for chat (overrides the template's default).")
    decode_backend: Literal["auto", "hf", "static"] = opt("auto", "Decode loop of the inference engine: hf (transformers generate, dynamic KV cache), static (static KV cache, CUDA graphs on CUDA; same greedy output), auto (static on CUDA, hf elsewhere).")


@dataclass
class ExportArgs:
    export_dir: Optional[str] = opt(None, "Where the merged model is written.")
    export_size: int = opt(5, "Shard size of the merged model in GB.")
    export_device: Literal["cpu", "auto"] = opt("cpu", "Device used for merging.")
    export_dtype: Literal["auto", "bfloat16", "float16", "float32"] = opt("auto", "Dtype of the merged weights.")
    export_legacy_format: bool = opt(False, "Write .bin instead of safetensors.")
    export_hub_model_id: Optional[str] = opt(None, "Push the merged model to this hub repository.")
    export_base: Literal["original", "dequantized"] = opt("original", "Merge into the original 16-bit weights or into the dequantized NF4 weights the QLoRA adapter was trained on.")
    checkpoint: Optional[str] = opt(None, "Which checkpoint of a run: best (lowest eval_loss), last, or a name like checkpoint-500.")
    export_ollama: bool = opt(False, "Also write an Ollama Modelfile.")
    overwrite: bool = opt(False, "Replace a non-empty export_dir.")
    export_tolerance: Optional[float] = opt(
        None, "Largest max-abs logit difference allowed between the merged model and base + adapter (default: 1e-3 x logit scale in float32, 3e-2 x in 16-bit)."
    )
    export_verify: bool = opt(True, "After merging, compare the merged model's logits with base + adapter (fails beyond export_tolerance).")


@dataclass
class EvalArgs:
    task: Optional[str] = opt(None, "Evaluation task: predict, perplexity, mmlu, cmmlu, ceval (or a folder name in task_dir).")
    task_dir: str = opt("evaluation", "Folder holding the benchmark data.")
    n_shot: int = opt(5, "Few-shot examples per question.")
    lang: Literal["en", "zh"] = opt("en", "Prompt language of the benchmark.")
    batch_size: int = opt(4, "Prompts per batch for evaluation.")
    save_dir: Optional[str] = opt(None, "Alias of output_dir for evaluation results.")
    eval_split: Optional[str] = opt(None, "Split of the benchmark to score (validation or test).")


SECTIONS: dict[str, type] = {
    "model": ModelArgs,
    "quantization": QuantizationArgs,
    "adapter": AdapterArgs,
    "data": DataArgs,
    "train": TrainArgs,
    "generation": GenerationArgs,
    "export": ExportArgs,
    "eval": EvalArgs,
}
