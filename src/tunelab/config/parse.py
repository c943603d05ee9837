"""Turn what the user gave (a YAML/JSON file, key=value overrides, --key value flags, or a dict) into a `Config`.

    cfg = load_config(["examples/quickstart.yaml", "learning_rate=1e-5", "--max_steps", "20"])
    cfg = load_config({"model_name_or_path": "...", "dataset": "..."})

Validation happens here, before anything heavy is imported: unknown keys (with a did-you-mean), value types,
closed choices and ranges, and contradictions between keys. Every problem is a `ConfigError` sentence naming
the key, the value and what is allowed. The user's values are never rewritten: derived values (dtype for the
hardware, lora_alpha default, ...) live in `tunelab.config.resolve`.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping, Union

from tunelab.config.schema import SECTIONS
from tunelab.errors import ConfigError

_NULLS = {"null", "none", "~", ""}
_TRUE = {"true", "yes", "on", "1", "y", "t"}
_FALSE = {"false", "no", "off", "0", "n", "f"}


def _all_fields() -> dict[str, tuple[str, dataclasses.Field, Any]]:
    """key -> (section name, dataclass field, resolved type hint)."""
    out: dict[str, tuple[str, dataclasses.Field, Any]] = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out[f.name] = (section, f, hints[f.name])
    return out


FIELDS = _all_fields()


@dataclass
class Config:
    """Validated settings, grouped in sections; flat attribute access (`cfg.lora_rank`) reaches any key.

    `given` holds the keys the user set explicitly (so a default can be told apart from a chosen value),
    `source` says where the config came from (for messages).
    """

    model: Any
    quantization: Any
    adapter: Any
    data: Any
    train: Any
    generation: Any
    export: Any
    eval: Any
    given: dict[str, Any] = field(default_factory=dict)
    source: str = "<dict>"

    def __getattr__(self, name: str) -> Any:  # only called when normal lookup fails
        if name in FIELDS:
            return getattr(object.__getattribute__(self, FIELDS[name][0]), name)
        raise AttributeError(name)

    def to_dict(self) -> dict[str, Any]:
        """All keys with their values (defaults filled in), flat, in schema order."""
        return {k: getattr(getattr(self, s), k) for k, (s, _, _) in FIELDS.items()}

    def replace(self, **changes: Any) -> "Config":
        """A copy with some keys changed (validated like user input)."""
        merged = dict(self.given)
        merged.update(changes)
        return build_config(merged, source=self.source)


# ---------------------------------------------------------------- reading the sources


def read_config_file(path: str) -> dict[str, Any]:
    """Read a YAML or JSON config file into a flat dict, with errors that name the file and line."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' does not exist.")
    try:
        with open(path, encoding="utf-8-sig") as fh:
            text = fh.read()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file '{path}' is not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as UTF-8.") from None
    if path.endswith(".json"):
        try:
            data = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file '{path}' line {exc.lineno} column {exc.colno}: invalid JSON ({exc.msg}).") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text) if text.strip() else {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
            raise ConfigError(f"config file '{path}'{where}: invalid YAML ({getattr(exc, 'problem', exc)}).") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold key: value pairs at the top level, found a {type(data).__name__}.")
    return data


def parse_cli_args(argv: Iterable[str]) -> tuple[str | None, dict[str, Any]]:
    """Split argv into (config file or None, {key: raw string value}).

    Accepts `cfg.yaml`, `key=value`, `--key value`, `--key=value`, and a bare `--flag` (meaning true).
    Dashes in keys are read as underscores (`--lora-rank 16`).
    """
    args = list(argv)
    config_file: str | None = None
    values: dict[str, Any] = {}
    i = 0
    while i < len(args):
        tok = args[i]
        if tok.startswith("--"):
            key, eq, val = tok[2:].partition("=")
            if not eq:
                if i + 1 < len(args) and not args[i + 1].startswith("--"):
                    val = args[i + 1]
                    i += 1
                else:
                    val = "true"
            values[key.replace("-", "_")] = val
        elif "=" in tok and not os.path.exists(tok):
            key, _, val = tok.partition("=")
            values[key.strip().replace("-", "_")] = val
        elif tok.endswith((".yaml", ".yml", ".json")) or os.path.isfile(tok):
            if config_file is not None:
                raise ConfigError(
                    f"two config files given ('{config_file}' and '{tok}'): tunelab reads one config file per run. "
                    "Merge them into one file, or give the second one's keys as key=value overrides."
                )
            config_file = tok
        else:
            raise ConfigError(
                f"cannot read argument '{tok}': expected a config file (.yaml/.json), key=value or --key value."
            )
        i += 1
    return config_file, values


# ---------------------------------------------------------------- value coercion


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) if isinstance(a, str) else str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        parts = [_describe(a) for a in typing.get_args(tp) if a is not type(None)]
        text = " or ".join(parts)
        return text + (" or null" if type(None) in typing.get_args(tp) else "")
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


class _Bad(Exception):
    pass


def coerce(value: Any, tp: Any) -> Any:
    """Convert `value` (from YAML, a dict or a command-line string) to type `tp`, or raise _Bad."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.strip().lower() in _NULLS):
            if type(None) in args:
                return None
            raise _Bad()
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg)
            except _Bad:
                continue
        raise _Bad()
    if origin is Literal:
        choices = typing.get_args(tp)
        for c in choices:
            try:
                if coerce(value, type(c)) == c:
                    return c
            except _Bad:
                pass
            if isinstance(c, str) and isinstance(value, str) and value.strip().lower() == c.lower():
                return c
        raise _Bad()
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _Bad()
    if tp is int:
        if isinstance(value, bool):
            raise _Bad()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    raise _Bad() from None
                if f.is_integer():
                    return int(f)
        raise _Bad()
    if tp is float:
        if isinstance(value, bool):
            raise _Bad()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise _Bad() from None
        raise _Bad()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
            return ",".join(str(v) for v in value)  # YAML lists for comma keys (dataset: [a, b])
        raise _Bad()
    raise _Bad()


# LLaMA-Factory 0.9.5 keys (its hparams/*.py) for features tunelab deliberately lacks: a config naming one is refused
# with the feature's name, not "unknown key". Keys are exact names; a name ending in "*" is a prefix.
_MEDIA = ("images, videos and audio are not supported: tunelab fine-tunes text-only models; remove the key (and use a "
          "text template and text datasets)")
_RLHF = ("preference and reinforcement-learning training (DPO, KTO, ORPO, SimPO, PPO, reward models) is not supported "
         "by tunelab, which trains supervised fine-tuning only (stage: sft); remove the key")
LF_UNSUPPORTED: dict[str, str] = {
    "pissa_*": "PiSSA initialisation is not supported by tunelab; remove the key to train plain LoRA",
    "use_kt": "KTransformers is not supported by tunelab; remove use_kt and the kt_* keys to train with transformers "
              "and PEFT",
    "kt_*": "KTransformers is not supported by tunelab; remove use_kt and the kt_* keys to train with transformers "
            "and PEFT",
    **dict.fromkeys(("ray_*", "master_addr", "master_port"), "Ray training is not supported by tunelab; remove the "
                    "key and train on several GPUs through torchrun (tunelab train starts it itself when "
                    "NPROC_PER_NODE is set, as LLaMA-Factory does)"),
    **dict.fromkeys(("image_*", "video_*", "audio_*", "use_audio_in_video", "crop_to_patches", "media_dir",
                     "freeze_vision_tower", "freeze_multi_modal_projector", "freeze_language_model"), _MEDIA),
    **dict.fromkeys(("oft_*", "module_dropout"), "OFT adapters are not supported by tunelab; remove the key and use "
                    "finetuning_type: lora"),
    **dict.fromkeys(("pref_*", "dpo_*", "kto_*", "simpo_*", "ppo_*", "ref_model*", "reward_model*", "ld_alpha"),
                    _RLHF),
    **dict.fromkeys(("use_galore", "galore_*"), "the GaLore optimizer is not supported by tunelab; remove the key"),
    **dict.fromkeys(("use_apollo", "apollo_*"), "the APOLLO optimizer is not supported by tunelab; remove the key"),
    **dict.fromkeys(("use_badam", "badam_*"), "the BAdam optimizer is not supported by tunelab; remove the key"),
    "use_adam_mini": "the Adam-mini optimizer is not supported by tunelab; remove the key",
    "use_muon": "the Muon optimizer is not supported by tunelab; remove the key",
    "use_llama_pro": "LLaMA Pro block expansion is not supported by tunelab; remove the key",
    "use_mca": "MCoreAdapter (Megatron-Core) training is not supported by tunelab; remove the key",
    **dict.fromkeys(("use_hyper_parallel", "hyper_parallel_args"), "HyperParallel training is not supported by "
                    "tunelab; remove the key"),
    **dict.fromkeys(("use_dft_loss", "use_asft_loss", "asft_alpha", "use_eaft_loss", "eaft_alpha"), "the DFT, ASFT "
                    "and EAFT losses are not supported by tunelab; remove the key to train with the cross-entropy loss"),
    **dict.fromkeys(("infer_backend", "vllm_*", "sglang_*"), "the vLLM and SGLang inference backends are not "
                    "supported by tunelab; remove the key (tunelab generates with transformers)"),
    **dict.fromkeys(("enable_torch_profiler", "profiler_*", "profile_modules"), "LLaMA-Factory's torch profiler "
                    "options are not supported by tunelab; remove the key"),
    "fp8*": "FP8 training is not supported by tunelab; remove the key (bf16: true trains in bfloat16)",
    "mixture_of_depths": "Mixture-of-Depths is not supported by tunelab; remove the key",
    "shift_attn": "LongLoRA's shift short attention is not supported by tunelab; remove the key",
    "use_unsloth_gc": "Unsloth's gradient checkpointing is not supported by tunelab; remove the key",
    "use_v1_kernels": "LLaMA-Factory's v1 kernel replacements (NPU kernels) are not supported by tunelab; remove the "
                      "key (enable_liger_kernel fuses kernels on NVIDIA GPUs)",
    "train_from_scratch": "training from randomly initialised weights is not supported by tunelab; remove the key",
    **dict.fromkeys(("resize_vocab", "add_tokens", "add_special_tokens", "new_special_tokens_config",
                     "init_special_tokens"), "adding tokens to the vocabulary is not supported by tunelab; remove "
                    "the key"),
    "export_quantization_*": "quantized export (GPTQ) is not supported by tunelab; remove the key to export 16-bit "
                             "weights",
}


def lf_unsupported(key: str) -> str | None:
    """The sentence for a LLaMA-Factory key whose feature tunelab lacks (LF_UNSUPPORTED), or None."""
    for name, sentence in LF_UNSUPPORTED.items():
        if key == name or (name.endswith("*") and key.startswith(name[:-1])):
            return sentence
    return None


def _unknown_key_error(key: str, source: str) -> ConfigError:
    feature = lf_unsupported(key)
    if feature:
        return ConfigError(f"'{key}' in {source} is a LLaMA-Factory key: {feature}.")
    close = difflib.get_close_matches(key, list(FIELDS), n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else " Run `tunelab train --help` for the list of keys."
    return ConfigError(f"unknown key '{key}' in {source}.{hint}")


# ---------------------------------------------------------------- building and validating


def build_config(values: Mapping[str, Any], source: str = "<dict>") -> Config:
    """Validate flat `values` against the schema and return a Config (defaults for missing keys)."""
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    given: dict[str, Any] = {}
    for raw_key, raw in values.items():
        key = str(raw_key).strip()
        if key not in FIELDS:
            raise _unknown_key_error(key, source)
        section, f, tp = FIELDS[key]
        try:
            value = coerce(raw, tp)
        except _Bad:
            raise ConfigError(f"{key}={raw!r} in {source} is not valid: expected {_describe(tp)}.") from None
        sections[section][key] = value
        given[key] = value
    cfg = Config(**{name: SECTIONS[name](**kw) for name, kw in sections.items()}, given=given, source=source)
    validate(cfg)
    return cfg


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Ranges and contradictions between keys, each explained."""
    _check(cfg.lora_rank >= 1, f"lora_rank must be at least 1, got {cfg.lora_rank}.")
    _check(cfg.lora_alpha is None or cfg.lora_alpha > 0, f"lora_alpha must be positive, got {cfg.lora_alpha}.")
    _check(0.0 <= cfg.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}.")
    _check(cfg.cutoff_len >= 2, f"cutoff_len must be at least 2 tokens, got {cfg.cutoff_len}.")
    _check(cfg.max_samples is None or cfg.max_samples >= 1, f"max_samples must be at least 1, got {cfg.max_samples}.")
    _check(cfg.val_size >= 0, f"val_size must be a fraction in (0, 1) or a sample count, got {cfg.val_size}.")
    _check(
        cfg.val_size < 1 or float(cfg.val_size).is_integer(),
        f"val_size={cfg.val_size}: use a fraction below 1 (0.1) or a whole number of samples (200).",
    )
    _check(cfg.learning_rate > 0, f"learning_rate must be positive, got {cfg.learning_rate}.")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps"):
        _check(getattr(cfg, key) == "auto" or getattr(cfg, key) >= 1, f"{key} must be at least 1, got {getattr(cfg, key)}.")
    _check(0.0 <= cfg.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}.")
    _check(cfg.max_steps != 0, "max_steps=0 trains nothing: use a positive number, or -1 to train by num_train_epochs.")
    _check(cfg.max_steps > 0 or cfg.num_train_epochs > 0, "num_train_epochs must be positive when max_steps is not set.")
    _check(cfg.eval_steps is None or cfg.eval_steps >= 1, f"eval_steps must be at least 1, got {cfg.eval_steps}.")
    _check(
        not (cfg.quantization_bit and cfg.finetuning_type != "lora"),
        f"quantization_bit={cfg.quantization_bit} needs finetuning_type: lora. Quantized weights cannot be trained "
        f"directly, so finetuning_type={cfg.finetuning_type} cannot use them; remove quantization_bit or use LoRA (QLoRA).",
    )
    _check(
        not (cfg.val_size > 0 and cfg.eval_dataset),
        "val_size and eval_dataset are both set: choose one. val_size splits the training data for evaluation; "
        "eval_dataset names a separate evaluation set.",
    )
    _check(not (cfg.fp16 and cfg.bf16), "fp16 and bf16 are both true: choose one precision.")
    _check(
        not (cfg.eval_strategy != "no" and cfg.do_train and not (cfg.val_size > 0 or cfg.eval_dataset)),
        f"eval_strategy={cfg.eval_strategy} needs evaluation data: set val_size (e.g. 0.1) or eval_dataset.",
    )
    _check(
        not (cfg.load_best_model_at_end and cfg.eval_strategy == "no"),
        "load_best_model_at_end needs evaluation: set eval_strategy: steps (with eval_steps) and val_size or eval_dataset.",
    )
    _check(
        not cfg.streaming,
        "streaming: true is not supported by tunelab train yet: datasets are read (lazily, record by record) and "
        "tokenized into memory, then cached. Remove streaming, or use max_samples for a quick run on a huge set.",
    )
    _validate_sharding(cfg)
    _check(
        not (cfg.do_predict and not cfg.predict_with_generate),
        "do_predict: true needs predict_with_generate: true (as in LLaMA-Factory): predictions are generated answers. "
        "Add predict_with_generate: true, or remove do_predict.",
    )
    _check(
        cfg.max_new_tokens > 0 or (cfg.max_length or 0) > 0,
        f"max_new_tokens={cfg.max_new_tokens} sets no answer length: give a positive max_new_tokens, or max_length "
        "(prompt + answer) with max_new_tokens: 0.",
    )
    _check(
        cfg.finetuning_type == "lora" or not cfg.adapter_name_or_path,
        f"adapter_name_or_path is a LoRA adapter, but finetuning_type is {cfg.finetuning_type}.",
    )


def deepspeed_stage(path: str) -> int:
    """The ZeRO stage of a DeepSpeed JSON config (0 when it names none); errors name the file."""
    if not os.path.isfile(path):
        raise ConfigError(f"deepspeed: config file '{path}' does not exist (LLaMA-Factory ships examples/deepspeed/ds_z3_config.json).")
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"deepspeed: '{path}' is not a readable JSON file ({exc}).") from None
    stage = doc.get("zero_optimization", {}).get("stage", 0) if isinstance(doc, dict) else 0
    return int(stage) if isinstance(stage, (int, float, str)) and str(stage).isdigit() else 0


def _validate_sharding(cfg: Config) -> None:
    """FSDP / DeepSpeed keys: files exist, and the combinations that cannot work are refused with the alternative."""
    _check(not (cfg.fsdp and cfg.deepspeed), "fsdp and deepspeed are both set: choose one way to shard the model.")
    if cfg.fsdp:
        words = set(cfg.fsdp.replace(",", " ").split())
        allowed = {"full_shard", "shard_grad_op", "offload", "auto_wrap"}
        _check(words <= allowed, f"fsdp: '{cfg.fsdp}' is not understood; use full_shard or shard_grad_op (optionally with "
               "offload). Hybrid sharding needs a two-level device mesh, which tunelab does not set up.")
        _check(
            cfg.fsdp_config is None or os.path.isfile(cfg.fsdp_config),
            f"fsdp_config: file '{cfg.fsdp_config}' does not exist.",
        )
    else:
        _check(cfg.fsdp_config is None, "fsdp_config is set but fsdp is not: add fsdp: full_shard to shard with FSDP.")
    stage = deepspeed_stage(cfg.deepspeed) if cfg.deepspeed else 0
    if cfg.quantization_bit == 8 and (cfg.fsdp or stage == 3):
        way = "FSDP" if cfg.fsdp else "DeepSpeed ZeRO-3"
        raise ConfigError(
            f"quantization_bit: 8 cannot be sharded with {way}: bitsandbytes' 8-bit weights keep their scales in a "
            "separate state that sharding does not carry. Use quantization_bit: 4 (QLoRA, sharded in the compute "
            "dtype), or 8-bit with plain data parallel (remove fsdp/deepspeed, or a ZeRO-2 config)."
        )


def load_config(source: Union[Mapping[str, Any], Iterable[str], str, None] = None, **overrides: Any) -> Config:
    """Build a Config from a dict, a config file path, or command-line arguments (file, key=value, --flags)."""
    if isinstance(source, Mapping):
        values, where = dict(source), "<dict>"
    elif isinstance(source, str):
        values, where = read_config_file(source), source
    else:
        config_file, cli = parse_cli_args(source or [])
        values, where = (read_config_file(config_file), config_file) if config_file else ({}, "command line")
        for key in cli:
            if key not in FIELDS:
                raise _unknown_key_error(key, "the command line")
        values.update(cli)
        if cli and config_file:
            where = f"{config_file} + command line"
    values.update(overrides)
    return build_config(values, source=where)
