"""End-to-end training runs on the tiny Qwen2 model (CPU, offline): 4-bit QLoRA with every output of the train
issue's section 6 checked, the loss falling on a learnable toy task, the adapter loading in plain PEFT with the
trained model's logits, 8-bit QLoRA, freeze and full fine-tuning, continuing from an adapter, packing, and packed
rows giving the same per-token logits and losses as separate forward passes.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import tunelab
from helpers_train import (  # noqa: F401  (fixtures)
    adapter_tensors,
    assert_section6_outputs,
    base_config,
    checkpoint_steps,
    counting_records,
    isolated_env,
    offline_session,
    read_json,
    read_jsonl,
    tiny_model,
    toy_records,
    write_dataset_dir,
)

LORA_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _capture_trained_model(monkeypatch) -> dict:
    """Record the model the trainer trained (run_train hands it to save_final)."""
    import tunelab.train.workflow as workflow

    seen: dict = {}
    original = workflow.save_final

    def save_final(trainer, tokenizer, output_dir):
        seen["model"] = trainer.model
        return original(trainer, tokenizer, output_dir)

    monkeypatch.setattr(workflow, "save_final", save_final)
    return seen


def _encoded_toy(tiny: str, data_dir: str, name: str, cutoff_len: int = 64, train_on_prompt: bool = False):
    from tunelab.data.loader import load_conversations
    from tunelab.data.template import get_template
    from tunelab.model.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny)
    template = get_template("qwen", tok)
    convs = load_conversations(name, data_dir).conversations
    return [template.encode_supervised(c, cutoff_len, train_on_prompt=train_on_prompt) for c in convs], tok


def _bnb_base(tiny: str, bits: int):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits == 4:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(tiny, quantization_config=q, device_map="cpu", dtype=torch.float32)
    for m in model.modules():  # the same CPU 4-bit kernel as training uses (see model/loader.prepare_for_training)
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


# ---------------------------------------------------------------- the main 4-bit QLoRA run


@pytest.fixture(scope="module")
def qlora_run(tiny_model, tmp_path_factory):
    """6 steps of 4-bit NF4 double-quant QLoRA over exactly one epoch (12 samples, batch 2), eval every 3 steps."""
    root = tmp_path_factory.mktemp("qlora")
    data_dir = write_dataset_dir(root / "data", {
        "toy": ("alpaca", toy_records(12)),
        "toy_eval": ("alpaca", [dict(r, instruction=f"What is the secret word? ({i})") for i, r in enumerate(toy_records(4))]),
    })
    out = str(root / "out")
    cfg = base_config(
        tiny_model, data_dir, out,
        quantization_bit=4, quantization_type="nf4", double_quantization=True,
        eval_dataset="toy_eval", eval_strategy="steps", eval_steps=3, save_steps=3, max_steps=6,
        lr_scheduler_type="cosine", plot_loss=True, tokenized_path=str(root / "cache"),
    )
    with pytest.MonkeyPatch.context() as mp:
        seen = _capture_trained_model(mp)
        metrics = tunelab.run(cfg)
    return {"out": out, "data_dir": data_dir, "cfg": cfg, "metrics": metrics, "model": seen["model"]}


def test_qlora_run_leaves_every_section6_output(qlora_run):
    out = qlora_run["out"]
    assert_section6_outputs(out, eval_expected=True)
    assert checkpoint_steps(out) == [3, 6]
    cfg = read_json(os.path.join(out, "adapter_config.json"))
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert set(cfg["target_modules"]) == LORA_TARGETS
    assert cfg["base_model_name_or_path"] == qlora_run["cfg"]["model_name_or_path"]
    # the last checkpoint holds exactly the final adapter
    final, last = adapter_tensors(out), adapter_tensors(os.path.join(out, "checkpoint-6"))
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    assert len(final) == 2 * 2 * len(LORA_TARGETS)  # 2 layers x (A, B) x 7 modules


def test_qlora_trainer_log_records_are_exact(qlora_run):
    log = read_jsonl(os.path.join(qlora_run["out"], "trainer_log.jsonl"))
    train = [r for r in log if "loss" in r]
    evals = [r for r in log if "eval_loss" in r]
    assert [r["current_steps"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["current_steps"] for r in evals] == [3, 6]
    for r in log:
        k = r["current_steps"]
        assert r["total_steps"] == 6
        assert r["percentage"] == round(100 * k / 6, 2)
        assert r["epoch"] == round(k / 6, 4)  # 12 samples, batch 2: 6 steps per epoch
        assert "gpu_memory_gib" not in r  # CPU run
        assert isinstance(r["elapsed_time"], str) and r["elapsed_time"].count(":") == 2
    for r in train:  # cosine without warm-up; the lr logged at step k is the one step k used
        k = r["current_steps"]
        assert r["lr"] == pytest.approx(5e-3 * 0.5 * (1 + math.cos(math.pi * (k - 1) / 6)), rel=1e-9, abs=1e-12)
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])


def test_qlora_results_files(qlora_run):
    out = qlora_run["out"]
    train_results = read_json(os.path.join(out, "train_results.json"))
    all_results = read_json(os.path.join(out, "all_results.json"))
    log = read_jsonl(os.path.join(out, "trainer_log.jsonl"))
    assert train_results["epoch"] == 1.0 and all_results["epoch"] == 1.0
    losses = [r["loss"] for r in log if "loss" in r]
    assert train_results["train_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert all_results["eval_loss"] == [r["eval_loss"] for r in log if "eval_loss" in r][-1]
    assert read_json(os.path.join(out, "eval_results.json"))["eval_loss"] == all_results["eval_loss"]
    assert qlora_run["metrics"]["eval_loss"] == all_results["eval_loss"]
    # one epoch exactly: every training token was seen once (no padding counted)
    encoded, _ = _encoded_toy(qlora_run["cfg"]["model_name_or_path"], qlora_run["data_dir"], "toy")
    assert all_results["num_input_tokens_seen"] == sum(len(ids) for ids, _ in encoded)


def test_qlora_saved_config_holds_config_given_and_resolved(qlora_run):
    import yaml

    with open(os.path.join(qlora_run["out"], "tunelab_config.yaml"), encoding="utf-8") as fh:
        saved = yaml.safe_load(fh)
    given = qlora_run["cfg"]
    assert saved["given"] == given
    assert saved["config"]["quantization_bit"] == 4 and saved["config"]["lora_rank"] == 8  # a default filled in
    assert saved["config"]["lora_alpha"] is None  # the user's value is not rewritten ...
    assert saved["resolved"]["lora_alpha"] == 16  # ... the derived one lives in resolved
    assert saved["resolved"]["device"] == "cpu" and saved["resolved"]["compute_dtype"] == "float32"
    assert saved["resolved"]["fast_path"] == "off (the device is cpu: the fast path needs a CUDA GPU)"


def test_qlora_loss_falls_on_the_toy_task(qlora_run):
    log = read_jsonl(os.path.join(qlora_run["out"], "trainer_log.jsonl"))
    losses = [r["loss"] for r in log if "loss" in r]
    evals = [r["eval_loss"] for r in log if "eval_loss" in r]
    assert losses[0] > 10.0  # ~ln(151936) = 11.9 for a random model
    assert losses[-1] < losses[0] - 5.0, losses
    assert evals[-1] < evals[0], evals


def test_qlora_base_is_really_4bit_nf4_double_quant(qlora_run):
    import bitsandbytes as bnb

    layers = [m for m in qlora_run["model"].modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * len(LORA_TARGETS)
    for m in layers:
        assert m.weight.quant_state.quant_type == "nf4"
        assert m.weight.quant_state.nested  # double quantization
    trainable = {n for n, p in qlora_run["model"].named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in qlora_run["model"].named_parameters() if p.requires_grad)


def test_qlora_adapter_learned_the_toy_task_in_plain_peft(qlora_run, tiny_model):
    """Loaded by plain PEFT on the 4-bit base, the adapter makes a held-out prompt's answer far more likely."""
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(_bnb_base(tiny_model, 4), qlora_run["out"]).eval()
    encoded, _ = _encoded_toy(tiny_model, qlora_run["data_dir"], "toy_eval")
    ids, labels = torch.tensor([encoded[0][0]]), torch.tensor([encoded[0][1]])
    with torch.no_grad():
        trained = loaded(input_ids=ids, labels=labels).loss.item()
        with loaded.disable_adapter():
            untrained = loaded(input_ids=ids, labels=labels).loss.item()
    assert untrained > 10.0 and trained < untrained - 5.0, (trained, untrained)


def test_evaluation_during_qlora_training_leaves_the_4bit_base_unchanged(qlora_run, tiny_model):
    """The frozen 4-bit base after a run with evaluations must be the base every user loads from the model folder;
    otherwise the adapter was trained against other weights than it is used with."""
    fresh = {k: v for k, v in _bnb_base(tiny_model, 4).state_dict().items() if ".layers." in k}
    trained = {k.replace("base_model.model.", "", 1).replace(".base_layer", ""): v
               for k, v in qlora_run["model"].state_dict().items() if ".layers." in k and "lora_" not in k}
    assert fresh.keys() == trained.keys()
    differ = [k for k in fresh if fresh[k].shape != trained[k].shape
              or not torch.equal(fresh[k].contiguous().view(torch.uint8), trained[k].contiguous().view(torch.uint8))]
    assert not differ, f"{len(differ)} quantized base tensors changed during training, e.g. {differ[:3]}"


def test_adapter_loads_in_plain_peft_with_the_trained_logits(tiny_model, tmp_path, monkeypatch):
    from peft import PeftModel

    data_dir = write_dataset_dir(tmp_path / "data", {"toy": ("alpaca", toy_records(8))})
    seen = _capture_trained_model(monkeypatch)
    out = str(tmp_path / "out")
    tunelab.run(base_config(tiny_model, data_dir, out, quantization_bit=4, max_steps=2, save_steps=2))
    loaded = PeftModel.from_pretrained(_bnb_base(tiny_model, 4), out).eval()
    trained = seen["model"].eval()
    encoded, _ = _encoded_toy(tiny_model, data_dir, "toy")
    ids = torch.tensor([encoded[0][0]])
    with torch.no_grad():
        want = trained(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
        with loaded.disable_adapter():
            untrained = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - untrained).abs().max() > 0.1  # the adapter matters


# ---------------------------------------------------------------- other fine-tuning modes


@pytest.fixture
def toy_dir(tmp_path):
    return write_dataset_dir(tmp_path / "data", {"toy": ("alpaca", toy_records(8))})


def test_8bit_qlora_smoke(tiny_model, toy_dir, tmp_path, monkeypatch):
    import bitsandbytes as bnb

    seen = _capture_trained_model(monkeypatch)
    out = str(tmp_path / "out8")
    tunelab.run(base_config(tiny_model, toy_dir, out, quantization_bit=8, max_steps=2, save_steps=2))
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in seen["model"].modules())
    assert_section6_outputs(out, eval_expected=False, plots=False)
    assert checkpoint_steps(out) == [2]
    tensors = adapter_tensors(out)
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)  # B starts at 0: it was trained


def _model_tensors(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(str(folder), "model.safetensors"))


def test_freeze_trains_only_the_last_layer(tiny_model, toy_dir, tmp_path):
    out = str(tmp_path / "freeze")
    tunelab.run(base_config(tiny_model, toy_dir, out, finetuning_type="freeze", freeze_trainable_layers=1,
                            max_steps=2, save_steps=2, learning_rate=1e-3))
    assert "adapter_config.json" not in os.listdir(out)
    assert_section6_outputs(out, eval_expected=False, plots=False, adapter=False)
    before, after = _model_tensors(tiny_model), _model_tensors(out)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "freeze run changed nothing"
    assert all(k.startswith("model.layers.1.") for k in changed), sorted(changed)
    # every weight matrix of layer 1 received an update
    assert {k for k in before if k.startswith("model.layers.1.") and k.endswith("proj.weight")} <= changed


def test_full_finetuning_without_quantization(tiny_model, toy_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "full")
    tunelab.run(base_config(tiny_model, toy_dir, out, finetuning_type="full", max_steps=2, save_steps=2, learning_rate=1e-3))
    assert_section6_outputs(out, eval_expected=False, plots=False, adapter=False)
    before, after = _model_tensors(tiny_model), _model_tensors(out)
    for key in ("lm_head.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
        assert not torch.equal(before[key], after[key]), key
    assert all(after[k].dtype == torch.float32 for k in after)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.lm_head.weight.detach(), after["lm_head.weight"])


def test_continue_training_from_an_adapter(tiny_model, toy_dir, tmp_path):
    """Run 2 starts from run 1's adapter: its first loss (one batch = the whole set) is run 1's adapter's loss."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.data.collator import Collator

    first = str(tmp_path / "first")
    tunelab.run(base_config(tiny_model, toy_dir, first, max_steps=3, save_steps=3))
    second = str(tmp_path / "second")
    tunelab.run(base_config(tiny_model, toy_dir, second, adapter_name_or_path=first, max_steps=1, save_steps=1,
                            per_device_train_batch_size=8, lora_rank=4))  # rank 4 is ignored: the adapter's r=8 goes on
    log = read_jsonl(os.path.join(second, "trainer_log.jsonl"))
    assert [r["current_steps"] for r in log] == [1]

    encoded, tok = _encoded_toy(tiny_model, toy_dir, "toy")
    batch = Collator(tok.pad_token_id)([{"input_ids": i, "labels": lab} for i, lab in encoded])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), first).eval()
    with torch.no_grad():
        want = model(**batch).loss.item()
    assert log[0]["loss"] == pytest.approx(want, rel=1e-4)
    fresh_log = read_jsonl(os.path.join(first, "trainer_log.jsonl"))
    assert log[0]["loss"] < fresh_log[0]["loss"] - 3.0  # not a fresh adapter
    assert read_json(os.path.join(second, "adapter_config.json"))["r"] == 8
    a, b = adapter_tensors(first), adapter_tensors(second)
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)  # and it kept training


def test_packing_run(tiny_model, tmp_path, caplog):
    from tunelab.data.collator import PackedSet
    from tunelab.data.processing import EncodedSet

    data_dir = write_dataset_dir(tmp_path / "data", {"toy": ("alpaca", counting_records(12))})
    encoded, _ = _encoded_toy(tiny_model, data_dir, "toy", cutoff_len=128)
    rows = len(PackedSet(EncodedSet([i for i, _ in encoded], [lab for _, lab in encoded]), 128))
    assert rows <= len(encoded) // 2  # samples of ~40 tokens: at least two per 128-token row
    out = str(tmp_path / "packed")
    with caplog.at_level("INFO", logger="tunelab"):
        tunelab.run(base_config(tiny_model, data_dir, out, packing=True, cutoff_len=128, per_device_train_batch_size=1,
                                max_steps=rows, save_steps=rows, plot_loss=True))
    assert f"packing: 12 samples into {rows} rows of up to 128 tokens" in caplog.text
    assert_section6_outputs(out, eval_expected=False)
    results = read_json(os.path.join(out, "all_results.json"))
    assert results["epoch"] == 1.0
    assert results["num_input_tokens_seen"] == sum(len(i) for i, _ in encoded)  # every token once, no padding


# ---------------------------------------------------------------- packed rows == separate samples


@pytest.fixture(scope="module")
def fp32_model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def _samples(qwen_tokenizer, train_on_prompt: bool):
    from tunelab.data.conversation import Conversation
    from tunelab.data.template import get_template

    template = get_template("qwen", qwen_tokenizer)
    convs = [
        Conversation(messages=[{"role": "user", "content": "Count from 1 to 5."}, {"role": "assistant", "content": "1, 2, 3, 4, 5"}]),
        Conversation(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                               {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}], system="Be brief."),
        Conversation(messages=[{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]),
    ]
    return [template.encode_supervised(c, 128, train_on_prompt=train_on_prompt) for c in convs]


def _packed_batch(samples, capacity, pad_id):
    from tunelab.data.collator import Collator, PackedSet
    from tunelab.data.processing import EncodedSet

    packed = PackedSet(EncodedSet([s[0] for s in samples], [s[1] for s in samples]), capacity)
    return packed, Collator(pad_id)([packed[i] for i in range(len(packed))])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_the_logits_of_separate_forward_passes(fp32_model, qwen_tokenizer, attn):
    """use_cache=False as in training (the loader sets config.use_cache=False and the fused loss passes it):
    transformers derives the block-diagonal mask from restarting position_ids only when no KV cache is built."""
    samples = _samples(qwen_tokenizer, train_on_prompt=False)
    packed, batch = _packed_batch(samples, capacity=10_000, pad_id=qwen_tokenizer.pad_token_id)
    assert len(packed) == 1 and "attention_mask" not in batch
    fp32_model.set_attn_implementation(attn)
    with torch.no_grad():
        logits = fp32_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for j in packed.bins[0]:
            ids = samples[j][0]
            alone = fp32_model(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(logits[start : start + len(ids)], alone, rtol=1e-4, atol=1e-4)
            start += len(ids)
    fp32_model.set_attn_implementation("sdpa")


def test_packed_rows_with_padding_keep_samples_apart(fp32_model, qwen_tokenizer):
    """Two rows of different length: the shorter is padded, its real tokens still equal separate passes."""
    samples = _samples(qwen_tokenizer, train_on_prompt=False)
    longest = max(len(s[0]) for s in samples)
    packed, batch = _packed_batch(samples, capacity=longest, pad_id=qwen_tokenizer.pad_token_id)
    assert len(packed) >= 2 and batch["input_ids"].shape[1] == max(sum(len(samples[j][0]) for j in b) for b in packed.bins)
    with torch.no_grad():
        logits = fp32_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for row, bin_ in enumerate(packed.bins):
            start = 0
            for j in bin_:
                ids = samples[j][0]
                alone = fp32_model(input_ids=torch.tensor([ids])).logits[0]
                torch.testing.assert_close(logits[row, start : start + len(ids)], alone, rtol=1e-4, atol=1e-4)
                start += len(ids)


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_packed_loss_equals_the_sum_of_separate_losses(fp32_model, qwen_tokenizer, train_on_prompt):
    """The summed next-token loss of a packed row is the sum of its samples' losses: nothing is trained across a
    sample boundary (the last token of one sample must not be taught to predict the first token of the next)."""
    from tunelab.model.kernels import forward_hidden, fused_linear_cross_entropy

    samples = _samples(qwen_tokenizer, train_on_prompt=train_on_prompt)
    _, batch = _packed_batch(samples, capacity=10_000, pad_id=qwen_tokenizer.pad_token_id)
    with torch.no_grad():
        hidden, weight = forward_hidden(fp32_model, {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]})
        packed_sum = fused_linear_cross_entropy(hidden, weight, batch["labels"], 1).item()
        separate = 0.0
        for ids, labels in samples:
            h, w = forward_hidden(fp32_model, {"input_ids": torch.tensor([ids])})
            separate += fused_linear_cross_entropy(h, w, torch.tensor([labels]), 1).item()
    assert packed_sum == pytest.approx(separate, rel=1e-4)
