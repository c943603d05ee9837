"""tunelab eval on the quickstart's tiny Qwen2 (CPU, offline): multiple choice, perplexity, predict, compare, bad input."""
from __future__ import annotations

import csv
import json
import os

import pytest

torch = pytest.importorskip("torch")

from tunelab.config import load_config  # noqa: E402
from tunelab.errors import ConfigError, DataError, ModelError  # noqa: E402

LETTERS = ["A", "B", "C", "D"]


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory):
    """`tunelab quickstart --dir <tmp>`: the tiny random Qwen2 model (real Qwen2.5 tokenizer) and the demo data."""
    from tunelab.commands.quickstart import main

    base = tmp_path_factory.mktemp("quickstart")
    assert main(["--dir", str(base)]) == 0
    return base


@pytest.fixture(scope="session")
def mc_model(quickstart, tmp_path_factory):
    """The tiny model with larger, random output rows for the letter tokens, so that its answers vary by question."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = str(quickstart / "tiny-qwen2")
    out = str(tmp_path_factory.mktemp("mc") / "model")
    model = AutoModelForCausalLM.from_pretrained(src)
    tok = AutoTokenizer.from_pretrained(src)
    ids = tok.convert_tokens_to_ids(LETTERS)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.lm_head.weight[ids] = torch.randn(len(ids), model.config.hidden_size, generator=gen) * 3.0
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _cfg(model: str, tmp_path, **kw):
    values = {"model_name_or_path": model, "template": "qwen", "output_dir": str(tmp_path / "out"), "batch_size": 3}
    values.update(kw)
    return load_config(values)


@pytest.fixture(scope="session")
def mc_engine(mc_model):
    from tunelab.infer.engine import Engine

    return Engine.from_config(load_config({"model_name_or_path": mc_model, "template": "qwen"}), max_batch_size=3)


def _write_csv(path, rows, header=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        if header:
            w.writerow(header)
        w.writerows(rows)


def _questions(subject: str, n: int, offset: int = 0):
    return [[f"In {subject}, which number follows {i * 7 + offset}?" + " Think." * (i % 3), str(i * 7 + offset + 1),
             str(i * 3), f"{i}{subject[:2]}", "none of these", LETTERS[(i + offset) % 4]] for i in range(n)]


def write_benchmark(root, *, mapping=True):
    """tiny/{dev,test}: two subjects in MMLU's headerless layout, one in C-Eval's header layout; categories."""
    folder = os.path.join(root, "tiny")
    _write_csv(os.path.join(folder, "dev", "algebra_dev.csv"), _questions("algebra", 3))
    _write_csv(os.path.join(folder, "test", "algebra_test.csv"), _questions("algebra", 7, 1))
    _write_csv(os.path.join(folder, "dev", "geology_dev.csv"), _questions("geology", 3, 2))
    _write_csv(os.path.join(folder, "test", "geology_test.csv"), _questions("geology", 5, 3))
    header = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    _write_csv(os.path.join(folder, "dev", "law_dev.csv"), [[k, *r, ""] for k, r in enumerate(_questions("law", 3, 5))], header)
    _write_csv(os.path.join(folder, "test", "law_test.csv"), [[k, *r, ""] for k, r in enumerate(_questions("law", 6, 4))], header)
    if mapping:
        with open(os.path.join(folder, "mapping.json"), "w", encoding="utf-8") as fh:
            json.dump({"algebra": {"name": "abstract algebra", "category": "STEM"},
                       "geology": {"name": "geology", "category": "STEM"},
                       "law": {"name": "law", "category": "Humanities"}}, fh)
    return folder


def _reference_prompt(tokenizer, subject_name, shots, question):
    """The n-shot prompt built here by hand, rendered by the tokenizer's own chat template (Qwen2.5's)."""
    def fmt(row):
        return row[0] + "".join(f"\n{L}. {c}" for L, c in zip(LETTERS, row[1:5])) + "\nAnswer:"

    messages = []
    for shot in shots:
        messages += [{"role": "user", "content": fmt(shot)}, {"role": "assistant", "content": shot[5]}]
    messages.append({"role": "user", "content": fmt(question)})
    messages[0]["content"] = f"The following are multiple choice questions (with answers) about {subject_name}.\n\n" + messages[0]["content"]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_multiple_choice_matches_independent_argmax(mc_engine, tmp_path):
    from tunelab.eval import run_eval

    write_benchmark(tmp_path / "bench")
    cfg = _cfg(mc_engine.model.name_or_path, tmp_path, task="tiny", task_dir=str(tmp_path / "bench"), n_shot=2)
    results = run_eval(cfg, engine=mc_engine)

    tok, model = mc_engine.tokenizer, mc_engine.model
    letter_ids = tok.convert_tokens_to_ids(LETTERS)
    expected, correct = {}, {}
    names = {"algebra": "abstract algebra", "geology": "geology", "law": "law"}
    offsets = {"algebra": (0, 1, 7), "geology": (2, 3, 5), "law": (5, 4, 6)}
    for subject, (dev_off, test_off, n) in offsets.items():
        shots = _questions(subject, 3, dev_off)[:2]
        picks = []
        for q in _questions(subject, n, test_off):
            ids = _reference_prompt(tok, names[subject], shots, q)
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1, letter_ids]
            picks.append(LETTERS[int(logits.argmax())])
        expected[subject] = picks
        correct[subject] = sum(p == q[5] for p, q in zip(picks, _questions(subject, n, test_off)))
    assert results["predictions"] == expected
    assert len({p for ps in expected.values() for p in ps}) > 1  # the model does not answer one letter throughout
    for subject, (_, _, n) in offsets.items():
        assert results["subjects"][subject]["correct"] == correct[subject]
        assert results["subjects"][subject]["accuracy"] == pytest.approx(100 * correct[subject] / n)
    stem = correct["algebra"] + correct["geology"]
    assert results["categories"]["STEM"]["accuracy"] == pytest.approx(100 * stem / 12)
    assert results["categories"]["Humanities"]["accuracy"] == pytest.approx(100 * correct["law"] / 6)
    assert results["accuracy"] == pytest.approx(100 * (stem + correct["law"]) / 18)
    out = tmp_path / "out"
    assert json.loads((out / "results.json").read_text())["accuracy"] == pytest.approx(results["accuracy"])
    log = (out / "results.log").read_text()
    assert f"{'Average':>15}: {results['accuracy']:.2f}" in log and f"{'STEM':>15}: " in log


def test_shared_prefix_cache_gives_the_plain_logits(mc_engine):
    from tunelab.data.conversation import Conversation
    from tunelab.eval.choice import letter_logits, shared_prefix_len

    convs = [Conversation(messages=[{"role": "user", "content": "A long shared header. " * 5 + "question " * k}]) for k in range(1, 6)]
    prompts = [mc_engine.encode(c) for c in convs]
    assert shared_prefix_len(prompts) > 16
    ids = mc_engine.tokenizer.convert_tokens_to_ids(LETTERS)
    kw = dict(batch_size=2, pad_id=mc_engine.tokenizer.pad_token_id, device=mc_engine.device)
    shared = letter_logits(mc_engine.model, prompts, ids, share_prefix=True, **kw)
    plain = letter_logits(mc_engine.model, prompts, ids, share_prefix=False, **kw)
    with torch.no_grad():
        direct = torch.stack([mc_engine.model(torch.tensor([p])).logits[0, -1, ids] for p in prompts])
    torch.testing.assert_close(shared, direct, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(plain, direct, atol=1e-4, rtol=1e-4)


def test_perplexity_equals_the_models_own_loss(mc_engine, quickstart, tmp_path):
    from tunelab.data.loader import load_conversations
    from tunelab.eval import run_eval

    data = str(quickstart / "data" / "demo_eval.json")
    cfg = _cfg(mc_engine.model.name_or_path, tmp_path, task="perplexity", eval_dataset=data, max_samples=7, batch_size=3)
    results = run_eval(cfg, engine=mc_engine)
    total, count = 0.0, 0
    for conv in load_conversations(data, max_samples=7).conversations:
        ids, labels = mc_engine.template.encode_supervised(conv, cfg.cutoff_len)
        n = sum(1 for x in labels[1:] if x != -100)
        with torch.no_grad():
            loss = mc_engine.model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
        total, count = total + loss.item() * n, count + n
    assert results["tokens"] == count and results["samples"] == 7
    assert results["nll"] == pytest.approx(total / count, rel=1e-5)
    assert results["perplexity"] == pytest.approx(torch.tensor(total / count).exp().item(), rel=1e-5)
    saved = json.loads((tmp_path / "out" / "perplexity_results.json").read_text())
    assert saved["nll"] == pytest.approx(results["nll"]) and saved["tokens"] == count


def test_predict_writes_predictions_and_their_metrics(mc_engine, quickstart, tmp_path):
    pytest.importorskip("nltk")
    pytest.importorskip("jieba")
    pytest.importorskip("rouge_chinese")
    from tunelab.data.loader import load_conversations
    from tunelab.eval import run_eval
    from tunelab.eval.metrics import similarity_scores

    data = str(quickstart / "data" / "demo_eval.json")
    cfg = _cfg(mc_engine.model.name_or_path, tmp_path, task="predict", eval_dataset=data, max_samples=5,
               do_sample=False, max_new_tokens=6, batch_size=2)
    results = run_eval(cfg, engine=mc_engine)
    rows = [json.loads(line) for line in (tmp_path / "out" / "generated_predictions.jsonl").read_text().splitlines()]
    convs = list(load_conversations(data, max_samples=5).conversations)
    assert [r["label"] for r in rows] == [c.messages[-1]["content"] for c in convs]
    prompts = [type(c)(messages=c.messages[:-1], system=c.system) for c in convs]
    assert [r["prompt"] for r in rows] == [mc_engine.render(p) for p in prompts]
    assert [r["predict"] for r in rows] == mc_engine.generate(prompts, do_sample=False, max_new_tokens=6)
    expected = similarity_scores([r["predict"] for r in rows], [r["label"] for r in rows])
    for key, value in expected.items():
        assert results[f"predict_{key}"] == pytest.approx(value)
    saved = json.loads((tmp_path / "out" / "predict_results.json").read_text())
    assert saved["predict_samples"] == 5 and saved["predict_bleu-4"] == pytest.approx(expected["bleu-4"])


def test_lf_eval_command_line_runs_as_written(mc_model, tmp_path, monkeypatch):
    from tunelab.cli import main

    write_benchmark(tmp_path / "evaluation", mapping=False)
    monkeypatch.chdir(tmp_path)
    code = main(["eval", "--task", "tiny_test", "--model_name_or_path", mc_model, "--template", "qwen",
                 "--batch_size", "1", "--n_shot", "5", "--save_dir", "saves/eval"])
    assert code == 0
    results = json.loads((tmp_path / "saves" / "eval" / "results.json").read_text())
    assert results["split"] == "test" and results["questions"] == 18
    assert set(results["categories"]) == {"algebra", "geology", "law"}  # no mapping.json: each subject its own


# ------------------------------------------------------------------------------------------------ compare


def _fake_eval(folder, bleu, ppl, acc, answers):
    os.makedirs(folder)
    with open(os.path.join(folder, "predict_results.json"), "w") as fh:
        json.dump({"predict_bleu-4": bleu, "predict_rouge-l": 20.0, "predict_samples": 2}, fh)
    with open(os.path.join(folder, "perplexity_results.json"), "w") as fh:
        json.dump({"nll": 2.0, "perplexity": ppl, "tokens": 100}, fh)
    with open(os.path.join(folder, "results.json"), "w") as fh:
        json.dump({"task": "mmlu", "accuracy": acc, "categories": {"STEM": {"accuracy": acc}}}, fh)
    with open(os.path.join(folder, "generated_predictions.jsonl"), "w") as fh:
        for k, a in enumerate(answers):
            fh.write(json.dumps({"prompt": f"prompt {k}", "predict": a, "label": f"label {k}"}) + "\n")


def test_compare_report_table_and_chart(tmp_path):
    from tunelab.eval.compare import compare

    _fake_eval(tmp_path / "base", 10.0, 8.0, 40.0, ["base answer 0", "base answer 1", "base answer 2"])
    _fake_eval(tmp_path / "lora", 15.0, 6.0, 50.0, ["lora answer 0", "lora answer 1", "lora answer 2"])
    result = compare(str(tmp_path / "base"), str(tmp_path / "lora"), str(tmp_path / "report"), samples=2)
    md = (tmp_path / "report" / "compare.md").read_text()
    assert "| predict_bleu-4 | 10 | 15 | +5 | +50.00% |" in md
    assert "| perplexity (lower is better) | 8 | 6 | -2 | -25.00% |" in md
    assert "| mmlu accuracy | 40 | 50 | +10 | +25.00% |" in md
    assert "| nll (lower is better) | 2 | 2 | +0 | +0.00% |" in md
    assert "| mmlu STEM | 40 | 50 | +10 | +25.00% |" in md
    assert "base answer 1" in md and "lora answer 1" in md and "base answer 2" not in md  # first 2 shared prompts
    assert result["side_by_side"] == 2
    png = (tmp_path / "report" / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_compare_needs_results(tmp_path):
    from tunelab.errors import TunelabError
    from tunelab.eval.compare import compare

    os.makedirs(tmp_path / "empty")
    _fake_eval(tmp_path / "ok", 1.0, 2.0, 3.0, [])
    with pytest.raises(TunelabError, match="holds no evaluation results"):
        compare(str(tmp_path / "empty"), str(tmp_path / "ok"), str(tmp_path / "r"))


# ------------------------------------------------------------------------------------------------ bad input
# The model path does not exist: each data error must be raised before any model is loaded, and nothing written.


def _run_bad(tmp_path, **kw):
    from tunelab.eval import run_eval

    cfg = _cfg("/nonexistent/model", tmp_path, **kw)
    return run_eval(cfg)


def test_missing_task_folder(tmp_path):
    with pytest.raises(DataError, match="benchmark folder .*nope.* does not exist"):
        _run_bad(tmp_path, task="nope", task_dir=str(tmp_path))
    assert not (tmp_path / "out").exists()


def test_missing_subject_file(tmp_path):
    folder = write_benchmark(tmp_path / "bench")
    os.remove(os.path.join(folder, "test", "geology_test.csv"))
    with pytest.raises(DataError, match="geology_test.csv' is missing"):
        _run_bad(tmp_path, task="tiny", task_dir=str(tmp_path / "bench"))
    assert not (tmp_path / "out").exists()


def test_missing_dev_file_for_shots(tmp_path):
    folder = write_benchmark(tmp_path / "bench")
    os.remove(os.path.join(folder, "dev", "law_dev.csv"))
    with pytest.raises(DataError, match="law_dev.csv' is missing"):
        _run_bad(tmp_path, task="tiny", task_dir=str(tmp_path / "bench"))


def test_csv_with_wrong_columns(tmp_path):
    folder = write_benchmark(tmp_path / "bench")
    _write_csv(os.path.join(folder, "test", "law_test.csv"), [["what?", "1", "2", "A"]], ["prompt", "x", "y", "label"])
    with pytest.raises(DataError, match=r"law_test.csv has the columns \['prompt', 'x', 'y', 'label'\]; expected"):
        _run_bad(tmp_path, task="tiny", task_dir=str(tmp_path / "bench"))


def test_csv_with_a_bad_answer_names_the_line(tmp_path):
    folder = write_benchmark(tmp_path / "bench")
    rows = _questions("algebra", 3, 1)
    rows[1][5] = "E"
    _write_csv(os.path.join(folder, "test", "algebra_test.csv"), rows)
    with pytest.raises(DataError, match=r"algebra_test.csv:2: answer 'E' is not one of A, B, C, D"):
        _run_bad(tmp_path, task="tiny", task_dir=str(tmp_path / "bench"))


def test_dataset_without_references(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"instruction": "Say hi.", "output": "hi"}, {"instruction": "Count.", "output": ""}]))
    with pytest.raises(DataError, match=r"1 of 2 samples .* have no assistant reply .*task=predict needs a reference"):
        _run_bad(tmp_path, task="predict", eval_dataset=str(path))
    assert not (tmp_path / "out").exists()


def test_task_must_be_set(tmp_path):
    with pytest.raises(ConfigError, match="task is not set"):
        _run_bad(tmp_path)


def _char_tokenizer_without_capitals():
    """A character-level tokenizer that has no A-D: every capital letter is <unk>."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789 .,:?!\n'_-|<>/"))
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"])
    return tok


def test_tokenizer_without_single_token_letters():
    from tunelab.data.template import get_template
    from tunelab.eval.choice import letter_token_ids

    tok = _char_tokenizer_without_capitals()
    template = get_template("chatml", tok)
    with pytest.raises(ModelError, match="The tokenizer of 'char-model' has no single token for the answer letter 'A'"):
        letter_token_ids(tok, template, "ABCD", "char-model")


def test_val_size_scores_the_split_training_held_out(mc_engine, quickstart, tmp_path):
    from tunelab.data.processing import build_datasets
    from tunelab.eval.dataset import held_out, load_eval_conversations

    cfg = _cfg(mc_engine.model.name_or_path, tmp_path, task="perplexity", dataset=str(quickstart / "data" / "demo_train.json"),
               val_size=0.1, cutoff_len=64, tokenized_path=str(tmp_path / "cache"))
    convs = held_out(load_eval_conversations(cfg, purpose="perplexity"), cfg, mc_engine.template)
    training_eval = build_datasets(cfg, mc_engine.tokenizer, mc_engine.template).eval
    encoded = [mc_engine.template.encode_supervised(c, cfg.cutoff_len)[0] for c in convs]
    assert len(convs) == len(training_eval) > 0
    assert encoded == training_eval.input_ids


# ----------------------------------------------------------------------------------------------- benchmark folders as shipped
def _zip(path, files: dict):
    import zipfile

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, rows in files.items():
            zf.writestr(name, rows)


def _csv_text(rows, header=None) -> str:
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    if header:
        w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _load(tmp_path, task, task_dir, **kw):
    from tunelab.eval.choice import load_benchmark

    cfg = load_config({"model_name_or_path": "unused", "task": task, "task_dir": str(task_dir), "n_shot": 2,
                       "output_dir": str(tmp_path / "out"), **kw})
    return load_benchmark(cfg)


def _summary(loaded):
    return {k: (len(shots), len(qs), qs[0].answer) for k, (shots, qs) in loaded.data.items()}


def test_llamafactory_evaluation_folder_as_shipped(tmp_path, monkeypatch):
    """LLaMA-Factory's evaluation/: mmlu/mmlu.zip (data/<split>/<subject>_<split>.csv, no header), ceval/ceval.zip
    (<split>/<subject>_<split>.csv with a header), cmmlu/cmmlu.zip (<split>/<subject>.csv, index column), each beside
    its mapping.json. Read from the archives as they are; the archives are extracted once into the cache."""
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    ev = tmp_path / "evaluation"
    mmlu = {f"data/{split}/{s}_{split}.csv": _csv_text(_questions(s, n)) for s in ("algebra", "law")
            for split, n in (("dev", 3), ("val", 4), ("test", 5))}
    _zip(str(ev / "mmlu" / "mmlu.zip"), mmlu)
    (ev / "mmlu" / "mapping.json").write_text(json.dumps({"algebra": {"name": "abstract algebra", "category": "STEM"},
                                                          "law": {"name": "law", "category": "Humanities"}}))
    (ev / "mmlu" / "mmlu.py").write_text("# LLaMA-Factory's datasets loading script, not read\n")
    header = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    ceval = {f"{split}/physics_{split}.csv": _csv_text([[k, *r, ""] for k, r in enumerate(_questions("physics", n))],
                                                       header) for split, n in (("dev", 2), ("val", 6), ("test", 1))}
    _zip(str(ev / "ceval" / "ceval.zip"), ceval)
    (ev / "ceval" / "mapping.json").write_text(json.dumps({"physics": {"name": "物理", "category": "STEM"}}))
    cmmlu = {f"{split}/anatomy.csv": _csv_text([[k, *r] for k, r in enumerate(_questions("anatomy", n))],
                                              ["", "Question", "A", "B", "C", "D", "Answer"])
             for split, n in (("dev", 2), ("test", 7))}
    _zip(str(ev / "cmmlu" / "cmmlu.zip"), cmmlu)
    (ev / "cmmlu" / "mapping.json").write_text(json.dumps({"anatomy": {"name": "解剖学", "category": "STEM"}}))

    loaded = _load(tmp_path, "mmlu", ev)
    assert _summary(loaded) == {"algebra": (2, 5, "A"), "law": (2, 5, "A")}
    assert [s.name for s in loaded.bench.subjects] == ["abstract algebra", "law"]
    assert loaded.bench.root.startswith(str(tmp_path / "cache" / "benchmarks" / "mmlu.zip-"))
    assert _summary(_load(tmp_path, "mmlu_val", ev)) == {"algebra": (2, 4, "A"), "law": (2, 4, "A")}
    assert _summary(_load(tmp_path, "ceval", ev)) == {"physics": (2, 6, "A")}  # C-Eval: val by default
    cm = _load(tmp_path, "cmmlu", ev)
    assert _summary(cm) == {"anatomy": (2, 7, "A")} and cm.bench.lang == "zh"
    assert cm.data["anatomy"][1][0].question == _questions("anatomy", 1)[0][0]
    assert sorted(os.listdir(ev / "mmlu")) == ["mapping.json", "mmlu.py", "mmlu.zip"]  # nothing written there


def test_original_benchmark_layouts_extracted_or_archived(tmp_path, monkeypatch):
    """MMLU's own data.tar (data/dev/<subject>_dev.csv), extracted or not; CMMLU's own folders (<split>/<subject>.csv)."""
    import tarfile

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    for split, n in (("dev", 3), ("test", 4)):
        _write_csv(str(tmp_path / "orig" / "mmlu" / "data" / split / f"virology_{split}.csv"), _questions("virology", n))
        _write_csv(str(tmp_path / "orig" / "cmmlu" / split / "arts.csv"),
                   [[k, *r] for k, r in enumerate(_questions("arts", n))], ["", "Question", "A", "B", "C", "D", "Answer"])
    assert _summary(_load(tmp_path, "mmlu", tmp_path / "orig")) == {"virology": (2, 4, "A")}
    cm = _load(tmp_path, "cmmlu", tmp_path / "orig")
    assert _summary(cm) == {"arts": (2, 4, "A")} and cm.bench.subjects[0].category == "arts"
    os.makedirs(tmp_path / "tarred" / "mmlu")
    with tarfile.open(tmp_path / "tarred" / "mmlu" / "data.tar", "w") as tf:
        tf.add(tmp_path / "orig" / "mmlu" / "data", arcname="data")
    assert _summary(_load(tmp_path, "mmlu", tmp_path / "tarred")) == {"virology": (2, 4, "A")}


def test_archive_without_split_folders_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    _zip(str(tmp_path / "ev" / "mmlu" / "mmlu.zip"), {"readme.txt": "nothing here"})
    with pytest.raises(DataError, match=r"mmlu.zip' holds no dev/, val/ or test/ folder of subject CSV files"):
        _load(tmp_path, "mmlu", tmp_path / "ev")
