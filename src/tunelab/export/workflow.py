"""`tunelab export`: merge LoRA adapter(s) into the base model and write a standalone model, read top to bottom in
`run_export`.

    from tunelab.config import load_config
    from tunelab.export import run_export
    run_export(load_config({"model_name_or_path": "Qwen/Qwen2.5-7B-Instruct", "adapter_name_or_path": "saves/run",
                            "checkpoint": "best", "export_dir": "models/merged"}))

Steps: check the inputs (before anything heavy) -> stream-merge the weights into a temporary folder beside
export_dir (export/merge.py) -> config, generation_config, tokenizer with the chat template, README, optional
Ollama Modelfile -> verify (merged model vs base + adapter, loaded one at a time; export/verify.py) -> rename the
temporary folder to export_dir. An interrupted or failed export leaves no folder that looks like a model.

The base is always merged unquantized: LoRA updates are tiny next to the 4-bit rounding steps, so merging into
4-bit weights and re-quantizing would lose most of them. A QLoRA adapter was trained against the rounded weights,
though, so `export_base: dequantized` merges into those instead (export/quant.py); the verification then
compares with the 4-bit base + adapter, and the report gives the shift between the two choices.
"""
from __future__ import annotations

import gc
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

from tunelab.config.parse import Config
from tunelab.errors import ConfigError, ModelError, TunelabError

logger = logging.getLogger(__name__)


@dataclass
class ExportResult:
    export_dir: str
    adapters: list[str]
    dtype: str
    seconds: float
    files: list[str]
    parity: Any = None  # verify.Parity of merged vs base + adapter (None when export_verify is off)
    tolerance: float | None = None
    shift: Any = None  # verify.Parity of 16-bit base + adapter vs quantized base + adapter (QLoRA adapters)
    notes: list[str] = field(default_factory=list)


@dataclass
class TrainedQuant:
    """How the adapter's base was quantized during training (None fields: not quantized)."""

    bits: int | None
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str | None = None
    source: str = ""


def run_export(cfg: Config) -> ExportResult:
    from tunelab.export.lora import LoraAdapter
    from tunelab.export.merge import BaseCheckpoint, merge_weights
    from tunelab.export.quant import QuantRounding, quantized_weight_names
    from tunelab.model.adapters import training_settings
    from tunelab.infer.engine import resolve_adapters

    # 1. inputs, checked before anything heavy
    if not cfg.model_name_or_path:
        raise ConfigError("model_name_or_path is not set: give the base model the adapter was trained on.")
    if not cfg.adapter_name_or_path:
        raise ConfigError("adapter_name_or_path is not set: give the adapter (a training output_dir or a checkpoint folder) to merge.")
    if not cfg.export_dir:
        raise ConfigError("export_dir is not set: give the folder to write the merged model to.")
    export_dir = os.path.abspath(cfg.export_dir)
    check_export_dir(export_dir, cfg.overwrite)
    base_dir = locate_base(cfg)
    adapters = resolve_adapters(cfg)
    for path in [base_dir, *adapters]:
        if os.path.abspath(path) == export_dir:
            raise ConfigError(f"export_dir '{cfg.export_dir}' is an input folder ({path}); choose another folder.")
    if cfg.checkpoint:
        logger.info("checkpoint: %s -> %s", cfg.checkpoint, adapters[-1])
    settings = training_settings(adapters[-1])
    trained = trained_quantization(cfg, settings)
    if cfg.quantization_bit:
        logger.warning(
            "quantization_bit=%s is not used for the merge: the base model is loaded unquantized (16-bit) and the "
            "adapter is merged into those weights. Merging into %s-bit weights would round the merged weights back "
            "to %s bits and lose most of the adapter's small updates. To merge into the rounded weights a QLoRA "
            "adapter was trained on, set export_base: dequantized.",
            cfg.quantization_bit, cfg.quantization_bit, cfg.quantization_bit,
        )
    rounding = None
    if cfg.export_base == "dequantized":
        if not trained.bits:
            raise ConfigError(
                "export_base: dequantized merges into the quantized weights a QLoRA adapter was trained on, but "
                f"adapter '{adapters[-1]}' was not trained on a quantized base (its run's tunelab_config.yaml has no "
                "quantization_bit). Use export_base: original, or set quantization_bit (and quantization_type, "
                "double_quantization) as they were in training."
            )
        if len(adapters) > 1:
            raise ConfigError("export_base: dequantized merges exactly one QLoRA adapter; merge the others first.")
    base = BaseCheckpoint(base_dir)
    loaded = [LoraAdapter.load(path) for path in adapters]
    for adapter in loaded:
        adapter.check_fits(base.shapes, cfg.model_name_or_path)
    model_config = _model_config(cfg, base_dir)
    dtype = export_dtype(cfg, model_config)
    device = merge_device(cfg)
    if trained.bits and not trained.compute_dtype:
        trained.compute_dtype = "bfloat16" if device == "cuda" else "float32"
        logger.warning("the adapter's training compute dtype is unknown (no tunelab_config.yaml); assuming %s.", trained.compute_dtype)
    rounded_keys: set[str] = set()
    if cfg.export_base == "dequantized":
        rounding = QuantRounding(trained.bits, trained.quant_type, trained.double_quant, trained.compute_dtype)
        rounded_keys = quantized_weight_names(model_config)
        logger.info("export_base: dequantized: %d base weights rounded through %s (%s)", len(rounded_keys), rounding.describe(), trained.source)

    # 2. merge into a temporary folder beside export_dir
    parent = os.path.dirname(export_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(export_dir)}.tmp-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        logger.info("merging %s into %s (%s, on %s) ...", ", ".join(adapters), cfg.model_name_or_path, dtype, device)
        stats = merge_weights(base, loaded, tmp, dtype=dtype, shard_gb=cfg.export_size, device=device, rounding=rounding, rounded_keys=rounded_keys)
        logger.debug("merged %d of %d tensors in %.1f s into %d file(s)", stats.merged, stats.tensors, stats.seconds, len(stats.files))
        trained_template = (settings or {}).get("config", {}).get("template")
        template, tokenizer = write_side_files(cfg, base_dir, tmp, model_config, dtype, trained_template)
        result = ExportResult(export_dir, adapters, dtype, stats.seconds, stats.files)
        if cfg.export_verify:
            verify_export(cfg, result, tmp, template or tokenizer, trained, device)
        write_readme(cfg, tmp, result, trained)
        if cfg.export_ollama:
            write_modelfile(cfg, tmp, template)
        from tunelab.utils.io import honour_umask

        honour_umask(tmp)  # safetensors writes 0600; the model's files get the umask's modes like the rest
        _replace_dir(tmp, export_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.debug("merged model written to %s", export_dir)
    return result


# ------------------------------------------------------------------------------------------ input checks
def check_export_dir(export_dir: str, overwrite: bool) -> None:
    if os.path.isfile(export_dir):
        raise ConfigError(f"export_dir '{export_dir}' is a file: expected a folder (new or empty).")
    if os.path.isdir(export_dir) and os.listdir(export_dir) and not overwrite:
        found = sorted(os.listdir(export_dir))
        shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise ConfigError(
            f"export_dir '{export_dir}' is not empty (found {len(found)} entries: {shown}): choose a new or empty "
            "folder, or set overwrite: true to replace it."
        )


def locate_base(cfg: Config) -> str:
    """A local folder with the base model's config and weights (a hub / ModelScope id is downloaded first)."""
    from tunelab.config.resolve import resolve

    name = cfg.model_name_or_path
    expanded = os.path.expanduser(name)
    looks_local = os.path.isabs(expanded) or name.startswith((".", "~")) or name.count("/") != 1 or os.path.exists(expanded)
    if looks_local:
        if not os.path.isdir(expanded):
            raise ModelError(
                f"base model '{name}' not found: expected a folder with config.json and model weights (or a hub id "
                "like Qwen/Qwen2.5-7B-Instruct), found no such folder."
            )
        folder = expanded
    else:
        from tunelab.model.loader import resolve_model_path

        folder = resolve_model_path(name, cache_dir=cfg.cache_dir, revision=cfg.model_revision, use_modelscope=resolve(cfg).use_modelscope)
        if not os.path.isdir(folder):
            folder = _download(cfg, name)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        found = sorted(os.listdir(folder))
        raise ModelError(
            f"base model folder '{name}' has no config.json: expected a Hugging Face model folder, found "
            f"{', '.join(found[:10]) or 'an empty folder'}."
        )
    return folder


def _download(cfg: Config, repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            repo_id, revision=cfg.model_revision, cache_dir=cfg.cache_dir, token=cfg.hf_hub_token,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.tiktoken", "*.jinja"],
        )
    except Exception as exc:  # not found, gated, offline
        raise ModelError(
            f"base model '{repo_id}' not found: expected a local folder or a reachable hub id; the hub said: "
            f"{str(exc).splitlines()[0][:300]}"
        ) from None


def trained_quantization(cfg: Config, settings: dict[str, Any] | None) -> TrainedQuant:
    """The adapter's training quantization: from its run's tunelab_config.yaml, else from this config's keys."""
    if settings and settings["config"]:
        c = settings["config"]
        return TrainedQuant(
            c.get("quantization_bit"), c.get("quantization_type", "nf4"), bool(c.get("double_quantization", True)),
            (settings.get("resolved") or {}).get("compute_dtype"), "from the run's tunelab_config.yaml",
        )
    return TrainedQuant(cfg.quantization_bit, cfg.quantization_type, cfg.double_quantization, None, "from this config's quantization keys")


def _model_config(cfg: Config, base_dir: str):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=cfg.trust_remote_code)
    if getattr(config, "quantization_config", None):
        method = config.quantization_config.get("quant_method", "?") if isinstance(config.quantization_config, dict) else "?"
        raise ModelError(
            f"base model '{cfg.model_name_or_path}' is already quantized ({method}); a merge needs its original 16-bit "
            "weights. Use the unquantized model the quantized one was made from."
        )
    return config


def export_dtype(cfg: Config, model_config: Any) -> str:
    """export_dtype, or for auto: the dtype the base checkpoint is stored in (bfloat16 when unknown)."""
    if cfg.export_dtype != "auto":
        return cfg.export_dtype
    stored = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    name = str(stored).replace("torch.", "") if stored is not None else ""
    return name if name in ("float32", "bfloat16", "float16") else "bfloat16"


def merge_device(cfg: Config) -> str:
    if cfg.export_device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


# ------------------------------------------------------------------------------------------ side files
def _template_for(cfg: Config, tokenizer: Any, trained_template: str | None):
    from tunelab.data.template import get_template

    name = cfg.template if "template" in cfg.given or not trained_template else trained_template
    try:
        return get_template(name, tokenizer, enable_thinking=cfg.enable_thinking)
    except ConfigError:
        if name == "auto":  # a base model without a chat template: nothing to put in the tokenizer
            return None
        raise


def write_side_files(cfg: Config, base_dir: str, out_dir: str, model_config: Any, dtype: str, trained_template: str | None):
    """config.json, generation_config.json (stopping on the template's stop tokens), the tokenizer with the chat
    template used in training, and any remote-code files. Returns (template or None, tokenizer)."""
    import torch
    from transformers import GenerationConfig

    from tunelab.model.tokenizer import load_tokenizer

    model_config.dtype = getattr(torch, dtype)
    model_config.save_pretrained(out_dir)
    for name in os.listdir(base_dir):
        if name.endswith(".py"):
            shutil.copy2(os.path.join(base_dir, name), out_dir)
    tokenizer = load_tokenizer(base_dir, trust_remote_code=cfg.trust_remote_code)
    template = _template_for(cfg, tokenizer, trained_template)
    if template is not None:
        tokenizer.chat_template = template.text
    tokenizer.save_pretrained(out_dir)
    try:
        gen = GenerationConfig.from_pretrained(base_dir)
    except OSError:
        gen = GenerationConfig.from_model_config(model_config)
    if template is not None:
        eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else ([gen.eos_token_id] if gen.eos_token_id is not None else [])
        gen.eos_token_id = list(dict.fromkeys([*eos, *template.stop_token_ids]))
    gen.save_pretrained(out_dir)
    return template, tokenizer


def write_readme(cfg: Config, out_dir: str, result: ExportResult, trained: TrainedQuant) -> None:
    from tunelab import __version__

    lines = [
        f"# {os.path.basename(result.export_dir)}",
        "",
        "A LoRA adapter merged into its base model with tunelab export. Loads with plain transformers:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{result.export_dir}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{result.export_dir}")',
        "```",
        "",
        f"- base model: `{cfg.model_name_or_path}`",
        f"- adapter(s): {', '.join(f'`{a}`' for a in result.adapters)}" + (f" (checkpoint: {cfg.checkpoint})" if cfg.checkpoint else ""),
        f"- dtype: {result.dtype}; merged into the {'dequantized ' + str(trained.bits) + '-bit' if cfg.export_base == 'dequantized' else 'original 16-bit'} base weights",
        f"- adapter trained on a {trained.bits}-bit base ({trained.quant_type})" if trained.bits else "- adapter trained on a 16-bit base",
        f"- shards: {len(result.files)} file(s) of at most {cfg.export_size} GB",
    ]
    if result.parity is not None:
        lines.append(f"- check vs base + adapter: {result.parity.line()} (tolerance {result.tolerance:.3g})")
    if result.shift is not None:
        lines.append(f"- 16-bit vs quantized base (both + adapter): {result.shift.line()}")
    lines += [f"- made with tunelab {__version__}", ""]
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))


_OLLAMA_TEMPLATES = {
    "chatml": (
        "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    ),
    "llama3": (
        "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
}


def write_modelfile(cfg: Config, out_dir: str, template: Any) -> None:
    """An Ollama Modelfile: `ollama create NAME -f Modelfile` inside the export folder."""
    family = None
    if template is not None:
        family = "chatml" if template.end_marker == "<|im_end|>" else ("llama3" if template.end_marker == "<|eot_id|>" else None)
    lines = ["# Ollama: run `ollama create <name> -f Modelfile` in this folder.", "FROM ."]
    if family:
        lines.append(f'TEMPLATE """{_OLLAMA_TEMPLATES[family]}"""')
    else:
        lines.append("# No TEMPLATE: Ollama reads the chat template from tokenizer_config.json / chat_template.jinja.")
    if template is not None:
        for token_id in template.stop_token_ids:
            lines.append(f'PARAMETER stop "{template.tokenizer.convert_ids_to_tokens(token_id)}"')
    if cfg.do_sample:
        lines += [f"PARAMETER temperature {cfg.temperature}", f"PARAMETER top_p {cfg.top_p}", f"PARAMETER top_k {cfg.top_k}"]
    else:
        lines.append("PARAMETER temperature 0")
    if cfg.repetition_penalty != 1.0:
        lines.append(f"PARAMETER repeat_penalty {cfg.repetition_penalty}")
    system = cfg.system if cfg.system is not None else cfg.default_system
    if system is None and template is not None:
        system = template_default_system(template, family)  # what every training sample without a system had
    if system:
        lines.append(f'SYSTEM """{system}"""')
    with open(os.path.join(out_dir, "Modelfile"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def template_default_system(template: Any, family: str | None) -> str | None:
    """The system prompt the chat template puts in when a conversation has none (Qwen2.5's "You are Qwen, ..."):
    the template's declared default, else read off a rendered one-message conversation. Ollama's TEMPLATE only
    writes a system block when SYSTEM is set, so without this the exported model would chat without it."""
    if getattr(template, "default_system", None):
        return template.default_system
    markers = {"chatml": ("<|im_start|>system\n", "<|im_end|>"),
               "llama3": ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>")}
    if family not in markers:
        return None
    try:
        text = template.render([{"role": "user", "content": "x"}], add_generation_prompt=True)
    except Exception:  # a template that cannot render without a system: nothing to carry over
        return None
    start, end = markers[family]
    i = text.find(start)
    if i < 0:
        return None
    j = text.find(end, i + len(start))
    system = text[i + len(start): j if j >= 0 else None]
    # Llama 3.1's template puts its knowledge-cutoff lines in the system block even without a system prompt
    return system.strip() or None


def _replace_dir(tmp: str, export_dir: str) -> None:
    """Move the finished folder into place; an existing export_dir (overwrite, or empty) is removed after."""
    old = None
    if os.path.exists(export_dir):
        old = os.path.join(os.path.dirname(export_dir), f".{os.path.basename(export_dir)}.old-{os.getpid()}")
        os.replace(export_dir, old)
    os.replace(tmp, export_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------ verification
def verify_export(cfg: Config, result: ExportResult, merged_dir: str, template_or_tokenizer: Any, trained: TrainedQuant, device: str) -> None:
    """Merged model vs base + adapter (the 4-bit base for export_base: dequantized), one model in memory at a time;
    for a QLoRA adapter also the shift between its 16-bit and its quantized base. Raises beyond the tolerance."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.export.verify import compare, default_tolerance, probe_ids, probe_logits

    ids = probe_ids(template_or_tokenizer)
    ref16 = _reference_logits(cfg, result.adapters, result.dtype, None, device, ids)
    refq = None
    if trained.bits:
        refq = _reference_logits(cfg, result.adapters, trained.compute_dtype, trained, device, ids)
        result.shift = compare(ref16, refq)
        # the figures are the command's summary on stdout (commands/export.py), printed once: debug here
        logger.debug("QLoRA shift (16-bit base + adapter vs %s-bit base + adapter, i.e. original vs dequantized merge): %s", trained.bits, result.shift.line())
    reference = refq if cfg.export_base == "dequantized" else ref16
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=getattr(torch, result.dtype), device_map=None if device == "cpu" else device)
    got = probe_logits(merged, ids)
    del merged
    gc.collect()
    result.parity = compare(reference, got)
    # bitsandbytes' 4-bit matmul kernels (CPU, and the GPU batch-1 path) do not compute exactly x @ W_q.T, so a
    # comparison with the quantized model gets the 16-bit tolerance even in float32.
    check_dtype = result.dtype if cfg.export_base == "original" else "bfloat16"
    result.tolerance = cfg.export_tolerance if cfg.export_tolerance is not None else default_tolerance(check_dtype, result.parity.logit_scale)
    against = f"{trained.bits}-bit base + adapter" if cfg.export_base == "dequantized" else "base + adapter"
    logger.debug("check: merged vs %s: %s", against, result.parity.line())
    if result.parity.max_abs_diff > result.tolerance:
        raise TunelabError(
            f"the merged model does not match {against}: {result.parity.line()}, beyond the tolerance "
            f"{result.tolerance:.3g} (export_tolerance). Nothing was written to export_dir."
        )


def _reference_logits(cfg: Config, adapters: list[str], dtype: str, quant: TrainedQuant | None, device: str, ids) -> list:
    """Logits of base + adapter(s) through the normal loader: 16-bit, or quantized as in training."""
    from tunelab.config.resolve import resolve
    from tunelab.export.verify import probe_logits
    from tunelab.model.loader import attach_lora, load_base_model

    changes: dict[str, Any] = {"adapter_name_or_path": ",".join(adapters), "checkpoint": None}
    if quant is not None:
        changes.update(quantization_bit=quant.bits, quantization_type=quant.quant_type, double_quantization=quant.double_quant)
    ref_cfg = cfg.replace(**changes)
    resolved = resolve(ref_cfg)
    model = load_base_model(ref_cfg, resolved, dtype=dtype, quantize=quant is not None, device=device)
    model = attach_lora(model, ref_cfg, resolved, is_trainable=False)
    model.eval()
    try:
        return probe_logits(model, ids)
    finally:
        del model
        gc.collect()
