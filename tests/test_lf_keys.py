"""LLaMA-Factory 0.9.5 keys for features tunelab lacks (config.parse.LF_UNSUPPORTED): a config naming one is refused
with a sentence naming the feature, from a file, a dict or the command line; any other unknown key keeps the
did-you-mean message."""
from __future__ import annotations

import pytest

from tunelab.config.parse import FIELDS, LF_UNSUPPORTED, load_config, lf_unsupported
from tunelab.errors import ConfigError

BASE = {"model_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct", "dataset": "identity", "template": "qwen",
        "stage": "sft", "finetuning_type": "lora"}
MEDIA = ("images, videos and audio are not supported: tunelab fine-tunes text-only models; remove the key (and use a "
         "text template and text datasets).")
KT = "KTransformers is not supported by tunelab; remove use_kt and the kt_* keys to train with transformers and PEFT."


def _refusal(key: str, value=True) -> str:
    with pytest.raises(ConfigError) as e:
        load_config({**BASE, key: value})
    return str(e.value)


@pytest.mark.parametrize(("key", "feature"), [
    ("pissa_init", "PiSSA initialisation is not supported by tunelab; remove the key to train plain LoRA."),
    ("pissa_iter", "PiSSA initialisation is not supported by tunelab; remove the key to train plain LoRA."),
    ("pissa_convert", "PiSSA initialisation is not supported by tunelab; remove the key to train plain LoRA."),
    ("use_kt", KT),
    ("kt_weight_path", KT),
    ("kt_lora_expert_num", KT),
    ("ray_num_workers", "Ray training is not supported by tunelab; remove the key and train on several GPUs through "
                        "torchrun (tunelab train starts it itself when NPROC_PER_NODE is set, as LLaMA-Factory does)."),
    ("ray_init_kwargs", "Ray training is not supported by tunelab; remove the key and train on several GPUs through "
                        "torchrun (tunelab train starts it itself when NPROC_PER_NODE is set, as LLaMA-Factory does)."),
    ("image_max_pixels", MEDIA), ("image_min_pixels", MEDIA), ("video_max_pixels", MEDIA), ("video_fps", MEDIA),
    ("audio_sampling_rate", MEDIA), ("use_audio_in_video", MEDIA), ("freeze_vision_tower", MEDIA),
    ("freeze_multi_modal_projector", MEDIA),
    ("use_v1_kernels", "LLaMA-Factory's v1 kernel replacements (NPU kernels) are not supported by tunelab; remove "
                       "the key (enable_liger_kernel fuses kernels on NVIDIA GPUs)."),
    ("pref_beta", "preference and reinforcement-learning training (DPO, KTO, ORPO, SimPO, PPO, reward models) is not "
                  "supported by tunelab, which trains supervised fine-tuning only (stage: sft); remove the key."),
    ("use_galore", "the GaLore optimizer is not supported by tunelab; remove the key."),
])
def test_lf_feature_keys_are_refused_with_the_feature(key, feature):
    assert _refusal(key) == f"'{key}' in <dict> is a LLaMA-Factory key: {feature}"


def test_refusal_from_a_config_file_and_the_command_line(tmp_path):
    path = tmp_path / "pissa.yaml"
    path.write_text("model_name_or_path: m\nstage: sft\nfinetuning_type: lora\npissa_init: true\npissa_iter: 16\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert str(e.value) == (f"'pissa_init' in {path} is a LLaMA-Factory key: PiSSA initialisation is not supported "
                            "by tunelab; remove the key to train plain LoRA.")
    with pytest.raises(ConfigError) as e:
        load_config(["--model_name_or_path", "m", "--use_kt", "true"])
    assert str(e.value) == f"'use_kt' in the command line is a LLaMA-Factory key: {KT}"


def test_other_unknown_keys_keep_the_did_you_mean():
    assert _refusal("lora_rnk", 8) == "unknown key 'lora_rnk' in <dict>. Did you mean 'lora_rank'?"
    assert lf_unsupported("lora_rank") is None and lf_unsupported("image") is None


def test_the_table_shadows_no_tunelab_key():
    # A prefix such as "image_*" must never catch a key tunelab supports (those never reach the table, but a
    # table entry for one would be a lie about the feature).
    assert [k for k in FIELDS if lf_unsupported(k)] == []
    assert [s for s in LF_UNSUPPORTED.values() if "not supported" not in s or s.endswith(".")] == []  # "." added
