"""The one model loader: base model (local / HF hub / ModelScope) -> bitsandbytes quantization -> adapters -> kernels.

Training, chat, evaluation, export and the server all load models through here:

    model = load_model(cfg, resolved, for_training=True)      # PeftModel with trainable LoRA in fp32
    model = load_model(cfg, resolved, for_training=False)     # inference: base + adapters, eval mode

Choices (named in the README): trainable parameters are kept in fp32 while frozen base weights stay in the
compute dtype; we do NOT call peft's `prepare_model_for_kbit_training`, which upcasts every non-quantized weight
(embeddings, output head, norms) to fp32 and costs ~4 GB on a 7B model; bitsandbytes quant storage = compute dtype
(so FSDP can shard it later); gradient checkpointing is non-reentrant.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from tunelab.config.parse import Config
from tunelab.config.resolve import Resolved
from tunelab.errors import ModelError

logger = logging.getLogger(__name__)


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def looks_like_local_path(name: str) -> bool:
    """A name that can only mean a local path (./x, /x, ~/x, a/b/c), as opposed to a hub id ("org/name")."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def model_source(name: str, what: str = "model_name_or_path") -> str:
    """'local' or 'hub', decided at once, before anything is loaded; a name that can only be a missing local folder
    is a ModelError right here (not a hub lookup with retries).

    Local: an existing folder. Missing and local: ./x, /x, ~/x, a/b/c, a name without a slash (a hub id is
    'org/name'), or 'dir/name' whose 'dir' is a folder here (examples/tiny-qwen3 when examples/ exists).
    Everything else ('Qwen/Qwen2.5-7B-Instruct') is a hub id."""
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return "local"
    if os.path.exists(expanded):
        raise ModelError(f"{what} '{name}' is a file: expected a model folder (config.json + weights) or a hub id like Qwen/Qwen2.5-7B-Instruct.")
    first = name.split("/")[0]
    if "/" in name and not looks_like_local_path(name) and not os.path.isdir(first):
        return "hub"
    if looks_like_local_path(name):
        why = "it is a path: it starts with ./, / or ~ or has several /"
    elif "/" in name:
        why = f"'{first}' is a local folder, so this is a path, not a hub id"
    else:
        why = "a hub id would read 'org/name', like Qwen/Qwen2.5-7B-Instruct"
    raise ModelError(f"{what} '{name}': no such folder ({os.path.abspath(expanded)} does not exist; {why}).{_near(expanded)}")


def _near(path: str) -> str:
    """' Did you mean ...?' for a missing folder whose parent holds similar names."""
    import difflib

    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return ""
    close = difflib.get_close_matches(os.path.basename(path), sorted(os.listdir(parent)), n=2, cutoff=0.6)
    return f" Did you mean {' or '.join(repr(os.path.join(os.path.dirname(path), c)) for c in close)}?" if close else ""


def resolve_model_path(name_or_path: str, *, cache_dir: str | None, revision: str, use_modelscope: bool) -> str:
    """A local folder as is; a ModelScope id downloaded first when asked; otherwise the hub id for transformers."""
    if model_source(name_or_path) == "local":
        return os.path.expanduser(name_or_path)
    if use_modelscope:
        try:
            from modelscope import snapshot_download  # type: ignore
        except ImportError:
            raise ModelError("USE_MODELSCOPE_HUB / use_modelscope_hub is set but modelscope is not installed: pip install 'tunelab[modelscope]'.") from None
        try:
            return snapshot_download(name_or_path, revision=None if revision == "main" else revision, cache_dir=cache_dir)
        except Exception as exc:  # network, unknown id
            raise ModelError(f"could not download '{name_or_path}' from ModelScope: {exc}") from None
    return name_or_path


def quantization_config(cfg: Config, compute_dtype: str):
    """A BitsAndBytesConfig for quantization_bit 4/8, or None."""
    if not cfg.quantization_bit:
        return None
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError("quantization_bit needs bitsandbytes: pip install 'bitsandbytes>=0.49'.")
    from transformers import BitsAndBytesConfig

    dtype = torch_dtype(compute_dtype)
    if cfg.quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quantization_type,
        bnb_4bit_use_double_quant=cfg.double_quantization,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


# Pre-quantized checkpoints (quantization_config in config.json) transformers loads itself, given its library:
# method -> (name, modules transformers 5 checks for, what to install). Methods not listed (fp8, mxfp4, bitnet, ...)
# go to transformers as they are; an ImportError it raises still becomes a sentence (load_base_model).
PREQUANTIZED: dict[str, tuple[str, tuple[str, ...], str]] = {
    "gptq": ("GPTQ", ("optimum", "gptqmodel"), "optimum gptqmodel"),
    "awq": ("AWQ", ("gptqmodel",), "gptqmodel"),  # transformers 5 runs AWQ checkpoints through gptqmodel
    "aqlm": ("AQLM", ("aqlm",), "'aqlm[gpu,cpu]'"),
    "eetq": ("EETQ", ("kernels",), "kernels"),
    "hqq": ("HQQ", ("hqq",), "hqq"),
    "compressed-tensors": ("compressed-tensors", ("compressed_tensors",), "compressed-tensors"),
    "torchao": ("torchao", ("torchao",), "torchao"),
    "quanto": ("Quanto", ("optimum", "optimum.quanto"), "optimum-quanto"),
    "vptq": ("VPTQ", ("vptq",), "vptq"),
    "spqr": ("SpQR", ("spqr_quant",), "'spqr_quant[gpu]'"),
    "auto-round": ("AutoRound", ("auto_round",), "auto-round"),
}


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # "optimum.quanto" without optimum
        return False


def _article(name: str) -> str:
    return "an" if name[:1].upper() in "AEIO" else "a"


def prequantized_method(config) -> str | None:
    """The quant_method of a pre-quantized checkpoint's config (not bitsandbytes, which tunelab drives), or None."""
    qc = getattr(config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else vars(qc)
    method = str((qc or {}).get("quant_method") or "").lower()
    return None if not method or method.startswith("bitsandbytes") else method


def check_prequantized(cfg: Config, config, *, quantize: bool) -> None:
    """Before any weight is read: a pre-quantized base with quantization_bit, or without its library, is a sentence."""
    method = prequantized_method(config)
    if method is None:
        return
    name, modules, install = PREQUANTIZED.get(method, (method, (), ""))
    model, a = cfg.model_name_or_path, _article(name)
    if quantize and cfg.quantization_bit:
        raise ModelError(
            f"model_name_or_path '{model}' is already {a} {name}-quantized model (quant_method '{method}' in its "
            f"config.json), so quantization_bit: {cfg.quantization_bit} cannot quantize it again with bitsandbytes: "
            f"remove quantization_bit to train LoRA on the {name} base, or use the unquantized model with "
            f"quantization_bit: {cfg.quantization_bit}."
        )
    missing = [m for m in modules if not _importable(m)]
    if missing:
        raise ModelError(
            f"model_name_or_path '{model}' is {a} {name}-quantized model (quant_method '{method}' in its config.json); "
            f"loading it needs `pip install {install}` (LoRA on {a} {name} base), or use the unquantized model with "
            "quantization_bit: 4."
        )


def device_map_for(device: str) -> Any:
    """The whole model on this process's accelerator: its LOCAL_RANK under torchrun / accelerate (0 alone)."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return {"": local} if device == "cuda" else ({"": f"npu:{local}"} if device == "npu" else device)


def load_base_model(
    cfg: Config,
    resolved: Resolved,
    *,
    dtype: str | None = None,
    quantize: bool = True,
    device: str | None = None,
):
    """from_pretrained with the config's quantization, dtype, attention and hub settings; errors as sentences."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not cfg.model_name_or_path:
        raise ModelError("model_name_or_path is not set: give a local model folder or a hub id (e.g. Qwen/Qwen2.5-7B-Instruct).")
    path = resolve_model_path(
        cfg.model_name_or_path, cache_dir=cfg.cache_dir, revision=cfg.model_revision, use_modelscope=resolved.use_modelscope
    )
    dtype = dtype or resolved.compute_dtype
    device = device or resolved.device
    common = dict(trust_remote_code=cfg.trust_remote_code, cache_dir=cfg.cache_dir, revision=cfg.model_revision, token=cfg.hf_hub_token)
    try:
        config = AutoConfig.from_pretrained(path, **common)
    except (OSError, ValueError) as exc:
        tried = (f"the local folder {os.path.abspath(path)}" if os.path.isdir(path)
                 else f"no local folder of that name, so the {'ModelScope' if resolved.use_modelscope else 'Hugging Face'} hub id '{path}'")
        raise ModelError(
            f"cannot load the model config of '{cfg.model_name_or_path}' (tried {tried}): {str(exc).splitlines()[0]} "
            "Check model_name_or_path (a folder with config.json, or a hub id reachable from this machine)."
        ) from None
    check_prequantized(cfg, config, quantize=quantize)
    if cfg.rope_scaling:
        config.rope_scaling = {"type": cfg.rope_scaling, "factor": 2.0}
    kwargs: dict[str, Any] = dict(
        config=config,
        dtype=torch_dtype(dtype),
        attn_implementation=resolved.attn_implementation,
        low_cpu_mem_usage=cfg.low_cpu_mem_usage,
        **common,
    )
    qconf = quantization_config(cfg, dtype) if quantize else None
    # FSDP and ZeRO-3 place (and shard) the weights themselves; transformers refuses a device_map under ZeRO-3, and
    # without one bitsandbytes quantizes on the current device (this rank's GPU), as LLaMA-Factory relies on.
    sharded = getattr(resolved, "parallel", "single") in ("fsdp", "deepspeed-zero3")
    if qconf is not None:
        kwargs["quantization_config"] = qconf
        if not sharded:
            kwargs["device_map"] = device_map_for(device)
    elif device != "cpu" and not sharded:
        kwargs["device_map"] = device_map_for(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model weights from '{cfg.model_name_or_path}': {str(exc).splitlines()[0]}") from None
    except ImportError as exc:  # a quantization or kernel library transformers asks for (a version too old, ...)
        method = prequantized_method(config)
        name = PREQUANTIZED.get(method, (method,))[0] if method else ""
        what = f"is {_article(name)} {name}-quantized model and " if method else ""
        raise ModelError(
            f"model_name_or_path '{cfg.model_name_or_path}' {what}cannot be loaded without a library that is missing "
            f"here: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    model.generation_config.pad_token_id = model.generation_config.pad_token_id or config.pad_token_id
    return model


def lora_target_modules(model, lora_target: str) -> list[str] | str:
    """`all` -> every nn.Linear (incl. bitsandbytes layers) except the output head; else the comma list."""
    if lora_target.strip() != "all":
        return [t.strip() for t in lora_target.split(",") if t.strip()]
    import torch

    output = model.get_output_embeddings()
    names: set[str] = set()
    for name, module in model.named_modules():
        if module is output or "lm_head" in name:
            continue
        if isinstance(module, torch.nn.Linear):  # bnb Linear4bit / Linear8bitLt subclass nn.Linear
            names.add(name.split(".")[-1])
    if not names:
        raise ModelError("lora_target: all found no linear layers in this model; list the module names (e.g. q_proj,v_proj).")
    return sorted(names)


def _check_targets_exist(model, targets: list[str] | str) -> None:
    if isinstance(targets, str):
        return
    present = {name.split(".")[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        import difflib

        close = difflib.get_close_matches(missing[0], sorted(present), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ModelError(f"lora_target '{missing[0]}' is not a module of this model.{hint} Use lora_target: all, or names such as q_proj,v_proj.")


def attach_lora(model, cfg: Config, resolved: Resolved, *, is_trainable: bool):
    """New LoRA adapter, or continue from adapter_name_or_path (comma list: all but the last are merged)."""
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model

    adapters = [a.strip() for a in (cfg.adapter_name_or_path or "").split(",") if a.strip()]
    adapters = [resolve_adapter_path(a) for a in adapters]
    if adapters:
        # Training continues the last adapter unless create_new_adapter; the ones before it are merged first.
        new_on_top = is_trainable and cfg.create_new_adapter
        to_merge, last = (adapters, None) if new_on_top else (adapters[:-1], adapters[-1])
        if cfg.quantization_bit and to_merge:
            raise ModelError("several adapters (or create_new_adapter) with a quantized base cannot be merged; merge them with `tunelab export` first.")
        for path in to_merge:
            model = PeftModel.from_pretrained(model, path).merge_and_unload()
        if last is not None:
            try:
                return PeftModel.from_pretrained(model, last, is_trainable=is_trainable)
            except (RuntimeError, ValueError, KeyError) as exc:
                raise ModelError(f"adapter '{last}' does not fit this base model: {str(exc).splitlines()[0][:300]}") from None
    if not is_trainable:
        return model
    targets = lora_target_modules(model, cfg.lora_target)
    _check_targets_exist(model, targets)
    extra = [t.strip() for t in (cfg.additional_target or "").split(",") if t.strip()] or None
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=cfg.lora_rank,
        lora_alpha=resolved.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        modules_to_save=extra,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
    )
    return get_peft_model(model, lora)


def resolve_adapter_path(path: str) -> str:
    """A local adapter folder, a run folder (its final adapter) or a hub id ("user/adapter", downloaded by PEFT)."""
    from tunelab.model.adapters import adapter_dir

    if not os.path.exists(path) and not looks_like_local_path(path) and "/" in path:
        return path
    return adapter_dir(path)


def setup_freeze(model, cfg: Config) -> None:
    """finetuning_type freeze: train the last (or first) n decoder layers' chosen modules."""
    num_layers = getattr(model.config, "num_hidden_layers", None)
    if not num_layers:
        raise ModelError("finetuning_type freeze needs a model with num_hidden_layers in its config.")
    n = cfg.freeze_trainable_layers
    ids = range(max(0, num_layers - n), num_layers) if n > 0 else range(min(-n, num_layers))
    modules = [m.strip() for m in cfg.freeze_trainable_modules.split(",")]
    extra = [m.strip() for m in (cfg.freeze_extra_modules or "").split(",") if m.strip()]
    layer_tags = {f".{i}." for i in ids}
    for name, p in model.named_parameters():
        in_layer = any(tag in name for tag in layer_tags) and (modules == ["all"] or any(f".{m}." in name for m in modules))
        p.requires_grad_(in_layer or any(e in name for e in extra))


def prepare_for_training(model, cfg: Config, resolved: Resolved):
    """Freeze / LoRA / full set-up, gradient checkpointing, fp32 trainable parameters."""
    import torch

    for module in model.modules():
        # bitsandbytes' CPU 4-bit layer repacks its weights for an AVX512-bf16 kernel on the first eval-mode forward
        # and converts them back (lossily) when saving: during training that would change the frozen base under the
        # adapter at every evaluation. Training keeps the portable layout.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False

    if cfg.finetuning_type == "lora":
        for p in model.parameters():
            p.requires_grad_(False)
        if resolved.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.config.use_cache = False
        model = attach_lora(model, cfg, resolved, is_trainable=True)
    elif cfg.finetuning_type == "freeze":
        setup_freeze(model, cfg)
        if resolved.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.config.use_cache = False
    else:  # full
        if resolved.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise ModelError("no parameter is trainable with this configuration (check lora_target / freeze_trainable_modules).")
    total = sum(p.numel() for p in model.parameters())
    logger.info("trainable parameters: %s of %s (%.4f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return model


def load_model(cfg: Config, resolved: Resolved, *, for_training: bool):
    """The whole chain for training or inference (base -> quantization -> adapters -> kernels)."""
    from tunelab.model.kernels import apply_kernels

    model = load_base_model(cfg, resolved)
    apply_kernels(model, cfg, resolved, for_training=for_training)
    if for_training:
        from tunelab.model.fast import apply_fast_path

        model = prepare_for_training(model, cfg, resolved)
        # after the adapters: it patches their layers (and decides itself: off for FSDP / ZeRO-3, whose sharded
        # weights are no longer bitsandbytes layers with a quant state)
        model.tunelab_fast_path = apply_fast_path(model, cfg, resolved)
        return model
    if cfg.adapter_name_or_path:
        model = attach_lora(model, cfg, resolved, is_trainable=False)
    model.eval()
    return model


def use_trained_adapter(cfg: Config, command: str, cli_keys: set[str] | frozenset[str] = frozenset()) -> Config:
    """A training config (do_train: true, LoRA) given to chat, export or eval means the model that training made:
    the adapter in its output_dir (the final one, else its latest checkpoint; `checkpoint` picks another). Logged.

    adapter_name_or_path on the command line wins (adapter_name_or_path=none: the base model alone). An adapter the
    config itself names was the starting point of that training: the trained one replaces it (with
    create_new_adapter, it goes on top of the ones named). No trained adapter yet is a ModelError saying so."""
    from tunelab.model.adapters import adapter_checkpoints, is_adapter_dir

    if "adapter_name_or_path" in cli_keys or not cfg.do_train or cfg.finetuning_type != "lora":
        return cfg
    out = cfg.output_dir
    source = cfg.source.split(" + ")[0]  # the config file, without "+ command line"
    if not (is_adapter_dir(out) or (os.path.isdir(out) and adapter_checkpoints(out))):
        raise ModelError(
            f"{source} is a training config (do_train: true), but its output_dir '{out}' holds no trained adapter "
            f"yet: run `tunelab train {source}` first, or set adapter_name_or_path (a run folder, "
            "or adapter_name_or_path=none for the base model alone)."
        )
    given = [a.strip() for a in (cfg.adapter_name_or_path or "").split(",") if a.strip()]
    chain = (given if cfg.create_new_adapter else given[:-1]) + [out]
    logger.info("%s: %s is a training config, so %s uses the adapter its training wrote, in %s%s (set "
                "adapter_name_or_path to choose another, or adapter_name_or_path=none for the base model)",
                command, source, command, out, f" on top of {', '.join(chain[:-1])}" if len(chain) > 1 else "")
    return cfg.replace(adapter_name_or_path=",".join(chain))
