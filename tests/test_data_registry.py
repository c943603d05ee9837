"""Tests for tunelab.data.registry: dataset_info.json entries, built-ins, plain paths, error messages, and the
atomic registry writer."""
from __future__ import annotations

import json
import os

import pytest

from tunelab.data.formats import DEFAULT_COLUMNS, ENTRY_COLUMNS
from tunelab.data.registry import (
    DatasetSpec,
    check_registry,
    load_registry,
    resolve_dataset,
    write_registry_entry,
)
from tunelab.errors import DataError

ALPACA = {"instruction": "a", "input": "", "output": "b"}


@pytest.fixture(autouse=True)
def _no_modelscope_env(monkeypatch):
    monkeypatch.delenv("USE_MODELSCOPE_HUB", raising=False)


def _registry(folder, entries: dict) -> str:
    folder.mkdir(exist_ok=True)
    (folder / "dataset_info.json").write_text(json.dumps(entries, indent=2), encoding="utf-8")
    return str(folder)


def _jsonl(path, *records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def _error(name: str, dataset_dir: str, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        resolve_dataset(name, dataset_dir, **kwargs)
    return str(info.value)


# ----------------------------------------------------------------------------------------------- entries


def test_file_entry_with_defaults(tmp_path):
    data = _registry(tmp_path / "data", {"demo": {"file_name": "demo.json", "formatting": "sharegpt"}})
    (tmp_path / "data" / "demo.json").write_text("[]")
    assert resolve_dataset("demo", data) == DatasetSpec(
        name="demo", load_from="file", path=os.path.join(data, "demo.json"), formatting="sharegpt",
        columns={"messages": "conversations"},  # LLaMA-Factory's defaults: no system / tools column unless named
        tags={"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
              "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"},
        origin=os.path.join(data, "dataset_info.json"),
    )


def test_alpaca_is_the_default_formatting_and_named_columns_are_exactly_those(tmp_path):
    data = _registry(tmp_path / "data", {"d": {"file_name": "d.jsonl", "columns": {"prompt": "q", "response": "a"},
                                               "num_samples": 5}})
    (tmp_path / "data" / "d.jsonl").write_text("")
    spec = resolve_dataset("d", data)
    assert spec.formatting == "alpaca"
    # As LLaMA-Factory's DatasetAttr.join: a "columns" object replaces the defaults; the 'input' column is unused.
    assert spec.columns == {"prompt": "q", "response": "a"}
    assert spec.tags == {}
    assert spec.num_samples == 5


def test_openai_entry_tags(tmp_path):
    data = _registry(tmp_path / "data", {"o": {"file_name": "o.jsonl", "formatting": "openai",
                                               "tags": {"assistant_tag": "bot"}}})
    (tmp_path / "data" / "o.jsonl").write_text("")
    spec = resolve_dataset("o", data)
    assert spec.columns == {"messages": "messages"}
    assert spec.tags == {"assistant_tag": "bot"}  # a "tags" object names every tag read, as in LLaMA-Factory


def test_hub_entries_and_modelscope_choice(tmp_path, monkeypatch):
    entries = {
        "both": {"hf_hub_url": "org/hf", "ms_hub_url": "org/ms", "subset": "zh", "split": "test", "folder": "sub"},
        "ms_only": {"ms_hub_url": "org/ms"},
        "hub_and_file": {"hf_hub_url": "org/hf", "file_name": "not_needed.json"},
    }
    data = _registry(tmp_path / "data", entries)
    spec = resolve_dataset("both", data)
    assert (spec.load_from, spec.hf_hub_url, spec.ms_hub_url, spec.subset, spec.split, spec.folder, spec.path) == (
        "hf_hub", "org/hf", "org/ms", "zh", "test", "sub", None)
    assert spec.where == "org/hf"
    assert resolve_dataset("both", data, use_modelscope=True).load_from == "ms_hub"
    assert resolve_dataset("ms_only", data).load_from == "ms_hub"
    assert resolve_dataset("hub_and_file", data).load_from == "hf_hub"  # hub wins, as in LLaMA-Factory
    monkeypatch.setenv("USE_MODELSCOPE_HUB", "1")
    assert resolve_dataset("both", data).where == "org/ms"
    assert resolve_dataset("both", data, use_modelscope=False).load_from == "hf_hub"


def test_builtin_datasets(tmp_path):
    spec = resolve_dataset("alpaca_gpt4_zh", str(tmp_path / "no_such_dir"))
    assert spec == DatasetSpec(
        name="alpaca_gpt4_zh", load_from="hf_hub", hf_hub_url="llamafactory/alpaca_gpt4_zh",
        ms_hub_url="llamafactory/alpaca_gpt4_zh", formatting="alpaca", columns=ENTRY_COLUMNS["alpaca"],
        origin="built-in",
    )
    assert resolve_dataset("alpaca_gpt4_en", str(tmp_path), use_modelscope=True).where == "llamafactory/alpaca_gpt4_en"


def test_unused_columns_are_not_read(tmp_path):
    """A hub-style set with system / history / tools columns trains as LLaMA-Factory does: without them, unless the
    entry names them (tunelab used to fill these column names in)."""
    from tunelab.data.loader import load_conversations

    record = {"instruction": "q", "input": "", "output": "a", "system": "S", "history": [["h1", "h2"]]}
    turns = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "system": "S",
             "tools": '[{"name": "f"}]'}
    data = _registry(tmp_path / "data", {
        "plain": {"file_name": "a.jsonl"},
        "named": {"file_name": "a.jsonl", "columns": {"prompt": "instruction", "response": "output", "system": "system",
                                                      "history": "history"}},
        "chat": {"file_name": "s.jsonl", "formatting": "sharegpt"},
        "chat_named": {"file_name": "s.jsonl", "formatting": "sharegpt",
                       "columns": {"messages": "conversations", "system": "system", "tools": "tools"}},
    })
    _jsonl(tmp_path / "data" / "a.jsonl", record)
    _jsonl(tmp_path / "data" / "s.jsonl", turns)
    plain = load_conversations("plain", data).conversations[0]
    assert (plain.system, plain.messages) == (None, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    named = load_conversations("named", data).conversations[0]
    assert (named.system, len(named.messages)) == ("S", 4)
    chat = load_conversations("chat", data).conversations[0]
    assert (chat.system, chat.tools) == (None, None)
    chat_named = load_conversations("chat_named", data).conversations[0]
    assert (chat_named.system, chat_named.tools) == ("S", [{"name": "f"}])


def test_alpaca_entry_naming_a_tools_column_reads_it(tmp_path):
    """LLaMA-Factory's alpaca converter reads a named tools column (its _tools); so does tunelab's."""
    from tunelab.data.loader import load_conversations

    data = _registry(tmp_path / "data", {"t": {"file_name": "t.jsonl", "columns": {
        "prompt": "instruction", "response": "output", "tools": "tools"}}})
    _jsonl(tmp_path / "data" / "t.jsonl", {"instruction": "q", "output": "a", "tools": '[{"name": "f"}]'})
    assert load_conversations("t", data).conversations[0].tools == [{"name": "f"}]


def test_tags_object_leaves_unnamed_tags_unused(tmp_path):
    """LLaMA-Factory's mllm/kto demo entries name four tags: their system_tag is unused, so a leading turn whose role
    is "system" is not taken for the system prompt (it is an unknown role)."""
    from tunelab.data.loader import load_conversations

    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    data = _registry(tmp_path / "data", {"m": {"file_name": "m.jsonl", "formatting": "sharegpt",
                                               "columns": {"messages": "messages"}, "tags": tags}})
    turns = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    _jsonl(tmp_path / "data" / "m.jsonl", {"messages": turns}, {"messages": turns[1:]})
    result = load_conversations("m", data, skip_invalid=True)
    assert result.skipped == 1 and "unknown role 'system'" in result.errors[0][1]
    assert result.conversations[0].messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


@pytest.mark.parametrize("entry, words", [
    ({"file_name": "x.json", "formatting": "sharegpt", "ranking": True,
      "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
     "is a ranking dataset ('ranking': true: preference pairs for DPO / reward-model training); tunelab trains "
     "supervised fine-tuning only, so it cannot use it."),
    ({"file_name": "x.json", "formatting": "sharegpt", "columns": {"messages": "messages", "kto_tag": "label"}},
     "names the 'kto_tag' column (KTO's desirable / undesirable labels), which is for another training stage; "
     "tunelab trains supervised fine-tuning only, so it cannot use this entry."),
    ({"file_name": "x.json", "formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"}},
     "names the 'images' column: images, videos and audio are not supported (tunelab fine-tunes text-only models), "
     "so this entry cannot be used."),
    ({"file_name": "x.json", "formatting": "sharegpt",
      "columns": {"messages": "messages", "videos": "videos", "audios": "audios"}},
     "names the 'videos' and 'audios' column: images, videos and audio are not supported"),
])
def test_other_stages_and_media_are_refused(tmp_path, entry, words):
    data = _registry(tmp_path / "data", {"e": entry})
    (tmp_path / "data" / "x.json").write_text("[]")
    message = _error("e", data)
    assert message.startswith(f"{os.path.join(data, 'dataset_info.json')}: entry 'e' ")
    assert words in message


def test_registry_file_overrides_builtin(tmp_path):
    data = _registry(tmp_path / "data", {"alpaca_gpt4_en": {"file_name": "local.jsonl"}})
    (tmp_path / "data" / "local.jsonl").write_text("")
    assert resolve_dataset("alpaca_gpt4_en", data).load_from == "file"


def test_online_dataset_dir():
    spec = resolve_dataset("org/some_dataset", "ONLINE")
    assert (spec.load_from, spec.hf_hub_url, spec.formatting) == ("hf_hub", "org/some_dataset", "alpaca")


def test_remote_dataset_dir_is_refused_with_the_local_copy_to_use(tmp_path):
    # LLaMA-Factory's own example (examples/train_lora/qwen3_lora_sft_ray.yaml) names this registry.
    expected = ("dataset_dir 'REMOTE:llamafactory/demo_data' is LLaMA-Factory's hub-hosted registry (it downloads "
                "dataset_info.json from the Hugging Face dataset repo 'llamafactory/demo_data'); tunelab does not "
                "support REMOTE: dataset_dir yet, it never downloads a registry. Download the repo's "
                "dataset_info.json and data files into a local folder and point dataset_dir at it: `hf download "
                "llamafactory/demo_data --repo-type dataset --local-dir data/demo_data`, then "
                "`dataset_dir: data/demo_data`.")
    assert _error("identity", "REMOTE:llamafactory/demo_data") == expected
    # the same sentence wherever the registry is read (validation, listing), never "not registered"
    for read in (check_registry, load_registry):
        with pytest.raises(DataError) as info:
            read("REMOTE:llamafactory/demo_data")
        assert str(info.value) == expected


# ----------------------------------------------------------------------------------------------- plain paths


def test_path_with_detected_formats(tmp_path):
    alpaca = _jsonl(tmp_path / "a.jsonl", ALPACA)
    spec = resolve_dataset(alpaca, str(tmp_path / "data"))
    assert (spec.name, spec.load_from, spec.path, spec.formatting, spec.origin) == (
        alpaca, "file", alpaca, "alpaca", "path")
    assert spec.columns == DEFAULT_COLUMNS["alpaca"]

    turns = [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]
    sharegpt = _jsonl(tmp_path / "s.jsonl", {"messages": turns})
    spec = resolve_dataset(sharegpt, str(tmp_path))
    assert (spec.formatting, spec.columns["messages"], spec.tags["user_tag"]) == ("sharegpt", "messages", "human")

    openai = _jsonl(tmp_path / "o.jsonl", {"messages": [{"role": "user", "content": "a"}]})
    assert resolve_dataset(openai, str(tmp_path)).formatting == "openai"


def test_path_relative_to_dataset_dir_and_folders(tmp_path):
    (tmp_path / "data" / "shards").mkdir(parents=True)
    _jsonl(tmp_path / "data" / "shards" / "part1.jsonl", ALPACA)
    spec = resolve_dataset("shards", str(tmp_path / "data"))
    assert (spec.path, spec.formatting) == (str(tmp_path / "data" / "shards"), "alpaca")


def test_path_detection_skips_invalid_first_lines(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text("{broken\n" + json.dumps(ALPACA) + "\n")
    assert resolve_dataset(str(f), str(tmp_path)).formatting == "alpaca"


def test_path_with_unknown_format(tmp_path):
    f = _jsonl(tmp_path / "t.jsonl", {"text": "hello"})
    assert _error(f, str(tmp_path)) == (
        f"Cannot tell the format of {f} from its first record ({f}:1): the record only has 'text' (plain text for "
        "pre-training); supervised fine-tuning needs alpaca, sharegpt or openai records. Register it in "
        "dataset_info.json with 'formatting' and 'columns'.")


# ----------------------------------------------------------------------------------------------- errors


def test_unknown_name_lists_registered_names_and_did_you_mean(tmp_path):
    entries = {"identity": {"file_name": "i.json"}, "alpaca_zh_demo": {"file_name": "z.json"}}
    data = _registry(tmp_path / "data", entries)
    info = os.path.join(data, "dataset_info.json")
    assert _error("alpaca_zh_dem", data) == (
        f"Dataset 'alpaca_zh_dem' is not registered in {info}, is not a built-in dataset, and is not an existing "
        "file or folder.\n"
        "Did you mean 'alpaca_zh_demo'?\n"
        f"Registered in {info}: identity, alpaca_zh_demo.\n"
        "Built-in: alpaca_gpt4_en, alpaca_gpt4_zh.")


def test_unknown_name_without_registry_file(tmp_path):
    message = _error("Alpaca_GPT4_EN2", str(tmp_path))
    assert "Did you mean 'alpaca_gpt4_en'?" in message
    assert f"There is no {tmp_path / 'dataset_info.json'} (set dataset_dir to the folder that has it)." in message
    assert "Did you mean 'alpaca_gpt4_en' or 'alpaca_gpt4_zh'?" in _error("alpaca_gpt4", str(tmp_path))
    assert "Did you mean" not in _error("zzzz", str(tmp_path))


def test_invalid_registry_json(tmp_path):
    (tmp_path / "dataset_info.json").write_text('{\n  "a": {"file_name": "a.json"}\n  "b": {}\n}')
    assert _error("a", str(tmp_path)) == (
        f"{tmp_path / 'dataset_info.json'} is not valid JSON: Expecting ',' delimiter at line 3, column 3.")
    (tmp_path / "dataset_info.json").write_text("[]")
    assert "must hold a JSON object mapping dataset names to entries" in _error("a", str(tmp_path))


@pytest.mark.parametrize("entry, message", [
    ({"formatting": "alpaca"}, "entry 'bad' has neither 'file_name' nor 'hf_hub_url'/'ms_hub_url'; add one of them."),
    ({"script_url": "x"}, "entry 'bad' has neither 'file_name' nor 'hf_hub_url'/'ms_hub_url' (script_url is not "
                          "supported by tunelab); add one of them."),
    ({"file_name": "missing.json"}, "entry 'bad': file_name 'missing.json' does not exist under {dir} "
                                    "(looked for {dir}/missing.json)."),
    ({"file_name": "x.json", "formatting": "sharegtp"},
     "entry 'bad': formatting 'sharegtp' is not one of alpaca, sharegpt, openai. Did you mean 'sharegpt'?"),
    ({"hf_hub_url": "a/b", "num_samples": 0}, "entry 'bad': 'num_samples' must be a positive integer, not 0."),
    ({"hf_hub_url": 3}, "entry 'bad': 'hf_hub_url' must be a string, not int."),
    ({"hf_hub_url": "a/b", "columns": ["x"]}, "entry 'bad': 'columns' must be an object mapping names to strings."),
    ("x.json", "entry 'bad' must be a JSON object, not str."),
])
def test_invalid_entries_name_the_file_and_entry(tmp_path, entry, message):
    data = _registry(tmp_path / "data", {"bad": entry, "good": {"hf_hub_url": "a/b"}})
    info = os.path.join(data, "dataset_info.json")
    assert _error("bad", data) == f"{info}: " + message.format(dir=data)
    assert resolve_dataset("good", data).load_from == "hf_hub"  # one broken entry does not block the others


def test_unknown_entry_keys_warn(tmp_path, caplog):
    data = _registry(tmp_path / "data", {"d": {"hf_hub_url": "a/b", "formating": "sharegpt"}})
    resolve_dataset("d", data)
    assert "unknown key 'formating' is ignored (did you mean 'formatting'?)" in caplog.text


def test_check_registry_lists_every_problem(tmp_path):
    data = _registry(tmp_path / "data", {"a": {}, "b": {"hf_hub_url": "x/y"}, "c": {"file_name": "c.json"}})
    problems = check_registry(data)
    assert [p.split(": ")[1] for p in problems] == ["entry 'a' has neither 'file_name' nor 'hf_hub_url'/'ms_hub_url'; "
                                                    "add one of them.", "entry 'c'"]


def test_load_registry(tmp_path):
    assert load_registry(str(tmp_path)) == {}
    data = _registry(tmp_path / "data", {"x": {"hf_hub_url": "a/b"}})
    assert load_registry(data) == {"x": {"hf_hub_url": "a/b"}}


# ----------------------------------------------------------------------------------------------- writing


def test_write_registry_entry_keeps_other_entries(tmp_path):
    data = _registry(tmp_path / "data", {"b": {"hf_hub_url": "o/b"}, "a": {"hf_hub_url": "o/a"}})
    _jsonl(tmp_path / "data" / "new.jsonl", ALPACA)
    path = write_registry_entry(data, "new", {"file_name": "new.jsonl", "formatting": "alpaca"})
    assert path == os.path.join(data, "dataset_info.json")
    text = (tmp_path / "data" / "dataset_info.json").read_text(encoding="utf-8")
    assert json.loads(text) == {"b": {"hf_hub_url": "o/b"}, "a": {"hf_hub_url": "o/a"},
                                "new": {"file_name": "new.jsonl", "formatting": "alpaca"}}
    assert list(json.loads(text)) == ["b", "a", "new"]
    assert text.endswith("}\n")
    assert sorted(os.listdir(data)) == ["dataset_info.json", "new.jsonl"]  # no temp file left behind


def test_write_registry_entry_creates_the_file(tmp_path):
    data = str(tmp_path / "data")
    write_registry_entry(data, "hub", {"hf_hub_url": "o/x"})
    assert load_registry(data) == {"hub": {"hf_hub_url": "o/x"}}
    assert os.stat(os.path.join(data, "dataset_info.json")).st_mode & 0o777 == 0o644


def test_write_registry_entry_refuses_a_different_entry_without_force(tmp_path):
    data = _registry(tmp_path / "data", {"x": {"hf_hub_url": "o/x"}})
    info = tmp_path / "data" / "dataset_info.json"
    os.chmod(info, 0o640)
    before = info.read_bytes()
    write_registry_entry(data, "x", {"hf_hub_url": "o/x"})  # the same entry: nothing to do
    assert info.read_bytes() == before
    with pytest.raises(DataError) as err:
        write_registry_entry(data, "x", {"hf_hub_url": "o/y"})
    assert str(err.value) == (f"Dataset 'x' is already registered in {info} with a different entry "
                              '({"hf_hub_url": "o/x"}); use force (--force) to replace it.')
    assert info.read_bytes() == before
    write_registry_entry(data, "x", {"hf_hub_url": "o/y"}, force=True)
    assert load_registry(data) == {"x": {"hf_hub_url": "o/y"}}
    assert os.stat(info).st_mode & 0o777 == 0o640  # permissions kept


def test_write_registry_entry_is_atomic(tmp_path, monkeypatch):
    data = _registry(tmp_path / "data", {"x": {"hf_hub_url": "o/x"}})
    before = (tmp_path / "data" / "dataset_info.json").read_bytes()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_registry_entry(data, "y", {"hf_hub_url": "o/y"})
    assert (tmp_path / "data" / "dataset_info.json").read_bytes() == before
    assert os.listdir(data) == ["dataset_info.json"]


def test_write_registry_entry_validates_the_entry(tmp_path):
    data = _registry(tmp_path / "data", {})
    with pytest.raises(DataError, match="file_name 'gone.jsonl' does not exist under"):
        write_registry_entry(data, "g", {"file_name": "gone.jsonl"})
    with pytest.raises(DataError, match="A dataset name must be a non-empty string."):
        write_registry_entry(data, " ", {"hf_hub_url": "a/b"})
    assert load_registry(data) == {}
