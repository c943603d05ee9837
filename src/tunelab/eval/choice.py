"""Multiple-choice benchmarks (MMLU, CMMLU, C-Eval, and any set in the same CSV layout): n-shot accuracy per
subject, per category and overall, read from the logits of the answer letters. No generation.

    tunelab eval --task mmlu --task_dir evaluation --model_name_or_path Qwen/Qwen2.5-7B-Instruct --template qwen \
        --n_shot 5 --batch_size 8 --save_dir saves/mmlu

Data layout (LLaMA-Factory's `evaluation/` folder, the benchmarks' own CSVs):

    <task_dir>/<task>/mapping.json                       optional: {"<subject>": {"name": ..., "category": ...}}
    <task_dir>/<task>/{dev,val,test}/<subject>_{dev,val,test}.csv

The split folders are also found as the benchmarks ship them, extracted or still archived: under a `data/`
subfolder (MMLU's own data.tar: data/dev/abstract_algebra_dev.csv), inside one archive in the task folder (.zip, .tar,
.tar.gz: LLaMA-Factory's evaluation/mmlu/mmlu.zip, ceval/ceval.zip, cmmlu/cmmlu.zip beside their mapping.json, or
the originals), and with files named `<subject>.csv`, without the split (CMMLU's dev/ and test/). An archive is
extracted once into tunelab's cache (`$TUNELAB_CACHE/benchmarks`, else ~/.cache/tunelab/benchmarks), keyed by the
archive's path, size and time; the user's folder is never written to.

A CSV has a header naming question, A, B, C, D (more letters allowed) and answer (C-Eval and CMMLU; other columns
such as id or explanation are ignored), or no header and exactly six columns question, A, B, C, D, answer (MMLU).
Without mapping.json every subject file of the split is a subject and its own category.

Prompts follow LLaMA-Factory's former `eval` command, so numbers compare with published ones: each of the n_shot
dev examples is a user turn (question, "\nA. ...", ..., "\nAnswer:") and an assistant turn (the letter), then the
question itself, all through the chat template; the benchmark's header ("The following are multiple choice
questions (with answers) about {subject}.\n\n", or the Chinese one for C-Eval / CMMLU) opens the first user turn.
One difference: the shots are the first n_shot dev rows (as the original MMLU code), not a fresh random sample per
question, so a run is deterministic and every question of a subject shares the same prefix.

Scoring: the answer is the argmax over the logits of the letter tokens at the last prompt position, the tokens the
template would train for the reply "A" (Qwen's "A", the default template's " A"; checked to be single tokens).
Speed: the prompt tokens every question of a subject shares (system prompt, header, the shots) are run once and
their KV cache is reused for each batch, so only the question itself is computed per question.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from tunelab.data.conversation import Conversation
from tunelab.errors import ConfigError, DataError, ModelError

logger = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJ"
HEADERS = {
    "en": ("The following are multiple choice questions (with answers) about {subject}.\n\n", "\nAnswer:"),
    "zh": ("以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n", "\n答案："),
}
BENCHMARK_LANG = {"mmlu": "en", "cmmlu": "zh", "ceval": "zh"}
DEFAULT_SPLIT = {"ceval": "val"}  # C-Eval's test answers are not public
SPLITS = ("dev", "val", "test")
SPLIT_ALIASES = {"validation": "val", "valid": "val", "train": "dev"}
HUB_REPOS = {"mmlu": "llamafactory/mmlu", "cmmlu": "llamafactory/cmmlu", "ceval": "llamafactory/ceval"}
MIN_SHARED_PREFIX = 16  # shorter shared prefixes are not worth a separate cached forward


@dataclass
class Question:
    question: str
    choices: list[str]
    answer: str | None  # a letter, or None where the file has no answer (C-Eval test)
    source: str  # file:line, for messages


@dataclass
class Subject:
    key: str
    name: str
    category: str


@dataclass
class Benchmark:
    task: str
    folder: str  # the task folder (mapping.json)
    split: str
    lang: str
    subjects: list[Subject] = field(default_factory=list)
    root: str = ""  # the folder holding the split folders: `folder` itself, its data/, or an extracted archive

    def csv_path(self, subject: str, split: str) -> str:
        """<subject>_<split>.csv, or <subject>.csv where only that exists (CMMLU names files without the split)."""
        base = os.path.join(self.root or self.folder, split)
        named = os.path.join(base, f"{subject}_{split}.csv")
        bare = os.path.join(base, f"{subject}.csv")
        return bare if not os.path.isfile(named) and os.path.isfile(bare) else named


# ---------------------------------------------------------------------------------------------------- data


def find_benchmark(task: str, task_dir: str, eval_split: str | None = None, lang: str | None = None) -> Benchmark:
    """Locate the task folder (`mmlu`, or `mmlu_test` naming the split as LLaMA-Factory did) and its subjects."""
    name, split = task, eval_split
    folder = os.path.join(task_dir, task)
    if not os.path.isdir(folder) and "_" in task:
        head, tail = task.rsplit("_", 1)
        if SPLIT_ALIASES.get(tail, tail) in SPLITS:
            name, split, folder = head, split or tail, os.path.join(task_dir, head)
    if not os.path.isdir(folder):
        folder = _download(name, task_dir) or folder
    if not os.path.isdir(folder):
        raise DataError(
            f"The benchmark folder '{folder}' does not exist. Set task_dir to the folder that holds '{name}/' "
            f"(with {name}/dev/, {name}/test/ ... of <subject>_<split>.csv files, as LLaMA-Factory's evaluation/ "
            "folder), or check the task name."
        )
    split = SPLIT_ALIASES.get(split, split) if split else DEFAULT_SPLIT.get(name, "test")
    if split not in SPLITS:
        raise ConfigError(f"eval_split={split!r} is not a split of a multiple-choice benchmark: use val or test (or dev).")
    root = _data_root(folder, name)
    if not os.path.isdir(os.path.join(root, split)):
        present = [s for s in SPLITS if os.path.isdir(os.path.join(root, s))]
        where = folder if root == folder else f"{root} (in {folder})"
        raise DataError(f"The benchmark folder '{where}' has no '{split}/' split folder (it has: "
                        f"{', '.join(present) or 'none'}). Set eval_split to one of those.")
    bench = Benchmark(task=name, folder=folder, split=split, lang=lang or BENCHMARK_LANG.get(name, "en"), root=root)
    bench.subjects = _subjects(bench)
    return bench


ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")


def _has_splits(folder: str) -> bool:
    return any(os.path.isdir(os.path.join(folder, s)) for s in SPLITS)


def _data_root(folder: str, task: str) -> str:
    """Where the split folders are: the task folder, its data/ (MMLU's own layout), or an archive inside it."""
    for candidate in (folder, os.path.join(folder, "data")):
        if _has_splits(candidate):
            return candidate
    archives = sorted(f for f in os.listdir(folder) if f.lower().endswith(ARCHIVE_SUFFIXES))
    if not archives:
        return folder
    preferred = [f for f in archives if f.lower().startswith((task.lower() + ".", "data."))]
    archive = os.path.join(folder, (preferred or archives)[0])
    extracted = _extract(archive)
    roots = sorted((d for d, _, _ in os.walk(extracted) if _has_splits(d)), key=lambda d: (d.count(os.sep), d))
    if not roots:
        raise DataError(f"The archive '{archive}' holds no dev/, val/ or test/ folder of subject CSV files, so it is "
                        "not a multiple-choice benchmark in the MMLU / C-Eval / CMMLU layout.")
    logger.info("reading %s from the archive %s (extracted into %s)", task, archive, roots[0])
    return roots[0]


def _extract(archive: str) -> str:
    """The archive extracted into tunelab's cache, once per (path, size, mtime); atomic (temp folder + rename)."""
    import hashlib
    import shutil
    import tarfile
    import tempfile
    import zipfile

    stat = os.stat(archive)
    key = hashlib.sha256(f"{os.path.abspath(archive)}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = os.path.join(os.environ.get("TUNELAB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache")), "tunelab"), "benchmarks")
    target = os.path.join(cache, f"{os.path.basename(archive)}-{key}")
    if os.path.isdir(target):
        return target
    os.makedirs(cache, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache, prefix=".extract-")
    try:
        if archive.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp)  # zipfile drops absolute paths and ".." parts
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(tmp, filter="data")  # no absolute paths, links out of the folder, devices
        os.replace(tmp, target)
    except (zipfile.BadZipFile, tarfile.TarError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.isdir(target):  # another run extracted it at the same time
            return target
        raise DataError(f"Cannot read the benchmark archive '{archive}': {exc}.") from None
    return target


def _subjects(bench: Benchmark) -> list[Subject]:
    mapping_path = os.path.join(bench.folder, "mapping.json")
    if not os.path.isfile(mapping_path) and bench.root:
        mapping_path = os.path.join(bench.root, "mapping.json")
    if os.path.isfile(mapping_path):
        try:
            with open(mapping_path, encoding="utf-8") as fh:
                mapping = json.load(fh)
        except (OSError, ValueError) as exc:
            raise DataError(f"{mapping_path} is not valid JSON: {exc}.") from None
        if not isinstance(mapping, dict) or not mapping:
            raise DataError(f"{mapping_path} must map each subject to {{\"name\": ..., \"category\": ...}}.")
        subjects = []
        for key, info in mapping.items():
            info = info if isinstance(info, dict) else {"category": str(info)}
            subjects.append(Subject(key, str(info.get("name", key.replace("_", " "))), str(info.get("category", key))))
    else:
        split_dir = os.path.join(bench.root or bench.folder, bench.split)
        suffix = f"_{bench.split}.csv"
        csvs = sorted(f for f in os.listdir(split_dir) if f.endswith(".csv"))
        files = [f for f in csvs if f.endswith(suffix)]
        if not files:  # CMMLU: dev/<subject>.csv, test/<subject>.csv
            files, suffix = csvs, ".csv"
        subjects = [Subject(f[: -len(suffix)], f[: -len(suffix)].replace("_", " "), f[: -len(suffix)]) for f in files]
        if not subjects:
            raise DataError(f"'{split_dir}' holds no <subject>_{bench.split}.csv (or <subject>.csv) file.")
    for s in subjects:
        path = bench.csv_path(s.key, bench.split)
        if not os.path.isfile(path):
            raise DataError(f"The subject file '{path}' is missing (subject '{s.key}' is listed in "
                            f"{os.path.join(bench.folder, 'mapping.json')}).")
    return subjects


def read_questions(path: str, *, need_answers: bool) -> list[Question]:
    """The questions of one CSV file (either layout, see the module doc), checked row by row."""
    if not os.path.isfile(path):
        raise DataError(f"The subject file '{path}' is missing.")
    with open(path, encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise DataError(f"'{path}' is empty.")
    columns, first_line = _layout(path, rows[0])
    letters = [c for c in LETTERS if c in columns]
    questions = []
    for line, row in enumerate(rows[first_line - 1:], start=first_line):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(columns.values()):
            raise DataError(f"{path}:{line} has {len(row)} columns; the file's layout needs {max(columns.values()) + 1}.")
        answer = row[columns["answer"]].strip().upper() if "answer" in columns else ""
        if answer and answer not in letters:
            raise DataError(f"{path}:{line}: answer {answer!r} is not one of {', '.join(letters)}.")
        if need_answers and not answer:
            raise DataError(f"{path}:{line} has no answer, so it cannot be scored (C-Eval's test split has no public "
                            "answers: use eval_split: val).")
        choices = [row[columns[c]].strip() for c in letters]
        questions.append(Question(row[columns["question"]].strip(), choices, answer or None, f"{path}:{line}"))
    if not questions:
        raise DataError(f"'{path}' has a header but no questions.")
    return questions


def _layout(path: str, first: list[str]) -> tuple[dict[str, int], int]:
    """Column index of question, A.., answer and the first data line (1-based)."""
    names = {cell.strip().lower(): i for i, cell in enumerate(first)}
    if "question" in names and "a" in names and "b" in names:
        columns = {"question": names["question"]}
        for letter in LETTERS:
            if letter.lower() not in names:
                break
            columns[letter] = names[letter.lower()]
        if "answer" in names:
            columns["answer"] = names["answer"]
        return columns, 2
    if len(first) == 6:  # MMLU: no header
        return {"question": 0, "A": 1, "B": 2, "C": 3, "D": 4, "answer": 5}, 1
    raise DataError(
        f"{path} has the columns {first[:8]}; expected a header naming question, A, B, C, D and answer (the C-Eval / "
        "CMMLU layout), or no header and six columns: question, A, B, C, D, answer (the MMLU layout)."
    )


def _download(task: str, task_dir: str) -> str | None:
    """Fetch a known benchmark's data.zip from the Hugging Face Hub into task_dir/task; None when that fails."""
    repo = HUB_REPOS.get(task)
    if repo is None:
        return None
    import shutil
    import tempfile
    import zipfile

    try:
        from huggingface_hub import hf_hub_download

        archive = hf_hub_download(repo, "data.zip", repo_type="dataset")
        mapping = hf_hub_download(repo, "mapping.json", repo_type="dataset")
    except Exception as exc:  # offline, no such repo: the caller's "folder does not exist" error explains
        logger.warning("could not download %s from the Hugging Face Hub (%s: %s)", repo, type(exc).__name__, exc)
        return None
    target = os.path.join(task_dir, task)
    with tempfile.TemporaryDirectory(dir=task_dir if os.path.isdir(task_dir) else None) as tmp:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        root = next((d for d, subdirs, _ in os.walk(tmp) if {"dev", "test"} <= set(subdirs)), None)
        if root is None:
            logger.warning("%s's data.zip has no dev/ and test/ folders; not using it", repo)
            return None
        os.makedirs(task_dir, exist_ok=True)
        shutil.copy(mapping, os.path.join(root, "mapping.json"))
        shutil.move(root, target)
    logger.info("downloaded %s into %s", repo, target)
    return target


# ---------------------------------------------------------------------------------------------------- prompts


def _format(q: Question, answer_suffix: str) -> str:
    return q.question + "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(q.choices)) + answer_suffix


def build_conversation(subject_name: str, shots: Sequence[Question], question: Question, lang: str) -> Conversation:
    """The n-shot prompt as a conversation: shots as user/assistant turns, then the question (LLaMA-Factory's form)."""
    header, answer_suffix = HEADERS[lang]
    messages: list[dict[str, Any]] = []
    for shot in shots:
        messages.append({"role": "user", "content": _format(shot, answer_suffix)})
        messages.append({"role": "assistant", "content": shot.answer})
    messages.append({"role": "user", "content": _format(question, answer_suffix)})
    messages[0]["content"] = header.format(subject=subject_name) + messages[0]["content"]
    return Conversation(messages=messages, source=question.source)


def letter_token_ids(tokenizer: Any, template: Any, letters: str, model_name: str = "this model") -> list[int]:
    """The token the template trains as the reply `L`, for each letter; a ModelError unless each is one token."""
    ids = []
    for letter in letters:
        probe = Conversation(messages=[{"role": "user", "content": "Question?"}])
        prompt = template.encode_prompt(probe)
        probe.messages.append({"role": "assistant", "content": letter})
        full, _ = template.encode_supervised(probe)
        token = full[len(prompt)] if full[: len(prompt)] == prompt and len(full) > len(prompt) else None
        text = tokenizer.decode([token]) if token is not None else ""
        if token is None or text.strip() != letter:
            reply = full[len(prompt):] if full[: len(prompt)] == prompt else full
            raise ModelError(
                f"The tokenizer of '{model_name}' has no single token for the answer letter {letter!r} after the "
                f"chat template's generation prompt (the reply {letter!r} is encoded as "
                f"{tokenizer.convert_ids_to_tokens(reply[:4])}). Multiple-choice scoring reads one logit per letter, "
                "so it cannot score this model with this template."
            )
        ids.append(token)
    if len(set(ids)) != len(ids):
        raise ModelError(f"The tokenizer of '{model_name}' maps different answer letters to the same token {ids}.")
    return ids


# ---------------------------------------------------------------------------------------------------- scoring


def shared_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix common to all prompts, leaving at least one token of each to run."""
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        i = 0
        while i < n and p[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def _forward_last_logits(model, batch: Sequence[Sequence[int]], pad_id: int, device, prefix=None):
    """Logits at each prompt's last token. Without a prefix: left padding, position ids from the mask.
    With a prefix (ids, per-layer (keys, values)): right-padded suffixes after the cached prefix."""
    import torch

    longest = max(len(p) for p in batch)
    if prefix is None:
        ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for i, p in enumerate(batch):
            ids[i, longest - len(p):] = torch.tensor(p)
            mask[i, longest - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=1)
        return out.logits[:, -1, :]
    from transformers import DynamicCache

    prefix_len, layers = prefix
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), prefix_len + longest), dtype=torch.long)
    mask[:, :prefix_len] = 1
    for i, p in enumerate(batch):
        ids[i, : len(p)] = torch.tensor(p)
        mask[i, prefix_len: prefix_len + len(p)] = 1
    ids, mask = ids.to(device), mask.to(device)
    cache = DynamicCache()
    for layer, (keys, values) in enumerate(layers):  # expanded views: the forward concatenates into new tensors
        cache.update(keys.expand(len(batch), -1, -1, -1), values.expand(len(batch), -1, -1, -1), layer)
    positions = torch.arange(prefix_len, prefix_len + longest, device=device).unsqueeze(0).expand(len(batch), -1)
    last = torch.tensor([len(p) - 1 for p in batch], device=device)
    keep = torch.unique(last)  # the lm_head runs only at the positions read
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                logits_to_keep=keep)
    return out.logits[torch.arange(len(batch), device=device), torch.searchsorted(keep, last)]


def _prefix_cache(model, prefix_ids: Sequence[int], device):
    import torch

    out = model(input_ids=torch.tensor([list(prefix_ids)], device=device), use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    return len(prefix_ids), [(layer.keys, layer.values) for layer in cache.layers]


def letter_logits(model, prompts: Sequence[Sequence[int]], letter_ids: Sequence[int], *, batch_size: int,
                  pad_id: int, device, share_prefix: bool = True, on_batch=None):
    """[len(prompts), len(letter_ids)] float32 logits of the letters after each prompt, batched longest first.

    The answer is their argmax (LLaMA-Factory takes the argmax of their softmax: the same letter)."""
    import torch

    choice_ids = torch.tensor(list(letter_ids), device=device)
    out = torch.empty((len(prompts), len(choice_ids)), dtype=torch.float32)
    prefix = None
    start = shared_prefix_len(prompts) if share_prefix and len(prompts) > 1 else 0
    with torch.inference_mode():
        if start >= MIN_SHARED_PREFIX:
            prefix = _prefix_cache(model, prompts[0][:start], device)
        else:
            start = 0
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        for b in range(0, len(order), batch_size):
            idx = order[b: b + batch_size]
            logits = _forward_last_logits(model, [prompts[i][start:] for i in idx], pad_id, device, prefix)
            out[idx] = logits.index_select(-1, choice_ids).float().cpu()
            if on_batch is not None:
                on_batch(len(idx))
    return out


# ---------------------------------------------------------------------------------------------------- the task


@dataclass
class LoadedBenchmark:
    bench: Benchmark
    data: dict[str, tuple[list[Question], list[Question]]]  # subject -> (shots, questions to score)


def load_benchmark(cfg) -> LoadedBenchmark:
    """Find the benchmark and read every CSV it needs (all checked before a model is loaded)."""
    lang = cfg.lang if "lang" in cfg.given else None
    bench = find_benchmark(cfg.task, cfg.task_dir, cfg.eval_split, lang)
    data = {}
    for s in bench.subjects:
        shots = read_questions(bench.csv_path(s.key, "dev"), need_answers=True)[: cfg.n_shot] if cfg.n_shot > 0 else []
        data[s.key] = (shots, read_questions(bench.csv_path(s.key, bench.split), need_answers=True))
    if cfg.n_shot > 0 and any(len(shots) < cfg.n_shot for shots, _ in data.values()):
        logger.warning("some subjects have fewer than n_shot=%d dev examples; they use all they have", cfg.n_shot)
    return LoadedBenchmark(bench, data)


def run_choice(cfg, engine, loaded: LoadedBenchmark, output_dir: str) -> dict[str, Any]:
    """Score every subject; write results.json and results.log into output_dir; return the results."""
    from tunelab.eval.progress import Progress
    from tunelab.utils.io import atomic_write_json, atomic_write_text

    bench, data = loaded.bench, loaded.data
    tokenizer, template, model = engine.tokenizer, engine.template, engine.model
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    name = cfg.model_name_or_path
    letter_ids = {n: letter_token_ids(tokenizer, template, LETTERS[:n], name)
                  for n in sorted({len(qs[0].choices) for _, qs in data.values()})}
    total = sum(len(qs) for _, qs in data.values())
    logger.info("%s (%s split, %d-shot, %s prompts): %d questions in %d subjects", bench.task, bench.split, cfg.n_shot,
                bench.lang, total, len(data))
    started = time.time()
    per_subject: dict[str, dict[str, Any]] = {}
    predictions: dict[str, list[str]] = {}
    with Progress(total, bench.task, unit="q") as bar:
        for s in bench.subjects:
            shots, questions = data[s.key]
            prompts = [engine.encode(build_conversation(s.name, shots, q, bench.lang)) for q in questions]
            logits = letter_logits(model, prompts, letter_ids[len(questions[0].choices)], batch_size=cfg.batch_size,
                                   pad_id=pad_id, device=engine.device, on_batch=lambda n, key=s.key: bar.update(n, key))
            letters = [LETTERS[p] for p in logits.argmax(-1).tolist()]
            correct = sum(1 for q, letter in zip(questions, letters) if q.answer == letter)
            predictions[s.key] = letters
            per_subject[s.key] = {"name": s.name, "category": s.category, "questions": len(questions),
                                  "correct": correct, "accuracy": 100.0 * correct / len(questions)}
    results = summarize(bench, per_subject, cfg.n_shot)
    results["runtime_s"] = round(time.time() - started, 2)
    results["predictions"] = predictions
    atomic_write_json(os.path.join(output_dir, "results.json"), results)
    atomic_write_text(os.path.join(output_dir, "results.log"), results_log(results))
    logger.info("%s accuracy: %.2f (results in %s)", bench.task, results["accuracy"], output_dir)
    return results


def summarize(bench: Benchmark, per_subject: dict[str, dict[str, Any]], n_shot: int) -> dict[str, Any]:
    """Accuracy per category and overall (question-weighted, as LLaMA-Factory) from the per-subject counts."""
    categories: dict[str, dict[str, Any]] = {}
    for info in per_subject.values():
        cat = categories.setdefault(info["category"], {"questions": 0, "correct": 0})
        cat["questions"] += info["questions"]
        cat["correct"] += info["correct"]
    for cat in categories.values():
        cat["accuracy"] = 100.0 * cat["correct"] / cat["questions"]
    questions = sum(c["questions"] for c in categories.values())
    correct = sum(c["correct"] for c in categories.values())
    return {
        "task": bench.task, "split": bench.split, "n_shot": n_shot, "lang": bench.lang,
        "accuracy": 100.0 * correct / max(questions, 1), "questions": questions, "correct": correct,
        "categories": dict(sorted(categories.items())), "subjects": per_subject,
    }


def results_log(results: dict[str, Any]) -> str:
    """LLaMA-Factory's results.log lines (category: accuracy), then Average, then each subject."""
    lines = [f"{name:>15}: {info['accuracy']:.2f}" for name, info in results["categories"].items()]
    lines.append(f"{'Average':>15}: {results['accuracy']:.2f}")
    lines.append("")
    lines += [f"{key}: {info['accuracy']:.2f} ({info['correct']}/{info['questions']})"
              for key, info in results["subjects"].items()]
    return "\n".join(lines) + "\n"
