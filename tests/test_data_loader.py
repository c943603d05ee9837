"""Tests for tunelab.data.loader: registered and plain datasets -> Conversations, concatenation, max_samples,
num_samples, invalid-record handling, streaming, hub loading (faked, no network) and the content fingerprint."""
from __future__ import annotations

import json
import os
import sys
import types

import pytest

from tunelab.data.conversation import Conversation
from tunelab.data.loader import content_fingerprint, load_conversations
from tunelab.errors import DataError


@pytest.fixture(autouse=True)
def _no_modelscope_env(monkeypatch):
    monkeypatch.delenv("USE_MODELSCOPE_HUB", raising=False)


def _alpaca(i: int) -> dict:
    return {"instruction": f"q{i}", "input": "", "output": f"a{i}"}


def _jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def _data_dir(tmp_path, entries: dict, files: dict[str, list]) -> str:
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset_info.json").write_text(json.dumps(entries), encoding="utf-8")
    for name, records in files.items():
        _jsonl(data / name, records)
    return str(data)


def _error(*args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_conversations(*args, **kwargs)
    return str(info.value)


def test_sharegpt_with_custom_columns_and_tags_from_dataset_info(tmp_path):
    entry = {"file_name": "chat.jsonl", "formatting": "sharegpt",
             "columns": {"messages": "dialog", "system": "sys_prompt", "tools": "functions"},
             "tags": {"role_tag": "role", "content_tag": "text", "user_tag": "user", "assistant_tag": "bot",
                      "observation_tag": "result", "function_tag": "call"}}
    record = {"sys_prompt": "Be terse.", "functions": '[{"name": "add"}]',
              "dialog": [{"role": "user", "text": "1+2?"},
                         {"role": "call", "text": '{"name": "add", "arguments": {"a": 1, "b": 2}}'},
                         {"role": "result", "text": "3"}, {"role": "bot", "text": "3"}]}
    data = _data_dir(tmp_path, {"chat": entry}, {"chat.jsonl": [record]})
    result = load_conversations("chat", data)
    assert result.conversations == [Conversation(
        messages=[{"role": "user", "content": "1+2?"},
                  {"role": "assistant", "content": "", "tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]},
                  {"role": "tool", "content": "3"}, {"role": "assistant", "content": "3"}],
        system="Be terse.", tools=[{"name": "add"}], source=os.path.join(data, "chat.jsonl") + ":1")]
    assert (result.skipped, result.errors, result.per_dataset) == (0, [], {"chat": 1})


def test_concatenation_in_order_and_max_samples_per_dataset(tmp_path):
    data = _data_dir(tmp_path, {"a": {"file_name": "a.jsonl"}, "b": {"file_name": "b.jsonl"}},
                     {"a.jsonl": [_alpaca(i) for i in range(5)], "b.jsonl": [_alpaca(i) for i in range(10, 13)]})
    result = load_conversations("b, a", data)
    assert [c.messages[0]["content"] for c in result.conversations] == [
        "q10", "q11", "q12", "q0", "q1", "q2", "q3", "q4"]
    assert result.per_dataset == {"b": 3, "a": 5}
    result = load_conversations(["a", "b"], data, max_samples=2)
    assert [c.messages[0]["content"] for c in result.conversations] == ["q0", "q1", "q10", "q11"]
    assert result.per_dataset == {"a": 2, "b": 2}
    assert _error("a", data, max_samples=0) == "max_samples must be a positive integer, not 0."
    assert _error(" , ", data).startswith("No dataset given")


def test_num_samples_resamples_with_a_seed(tmp_path):
    data = _data_dir(tmp_path, {"few": {"file_name": "d.jsonl", "num_samples": 3},
                                "many": {"file_name": "d.jsonl", "num_samples": 7}},
                     {"d.jsonl": [_alpaca(i) for i in range(5)]})
    few = [c.messages[0]["content"] for c in load_conversations("few", data).conversations]
    assert len(few) == 3 and len(set(few)) == 3
    assert few == [c.messages[0]["content"] for c in load_conversations("few", data).conversations]  # seeded
    many = [c.messages[0]["content"] for c in load_conversations("many", data).conversations]
    assert len(many) == 7 and set(many) == {f"q{i}" for i in range(5)}  # every record, then repeats
    assert len(load_conversations("many", data, max_samples=4).conversations) == 4  # max_samples after num_samples


def test_invalid_records_raise_with_the_first_errors_and_the_total(tmp_path):
    f = tmp_path / "d.jsonl"
    lines = [json.dumps(_alpaca(0)), "{bad json", json.dumps({"instruction": "x"})] + \
            [json.dumps({"output": "y"})] * 5 + [json.dumps(_alpaca(1))]
    f.write_text("\n".join(lines) + "\n")
    message = _error(str(f), str(tmp_path))
    assert message == "\n".join([
        "7 invalid records:",
        f"  {f}:2: invalid JSON: Expecting property name enclosed in double quotes at column 2",
        f"  {f}:3: the 'output' field is missing or empty",
        f"  {f}:4: the 'instruction' field is missing or empty",
        f"  {f}:5: the 'instruction' field is missing or empty",
        f"  {f}:6: the 'instruction' field is missing or empty",
        "  ... and 2 more.",
        "Fix them, or set `skip_invalid: true` to skip invalid records (the number skipped is reported).",
    ])
    assert "  ... and 6 more." in _error(str(f), str(tmp_path), max_errors_shown=1)


def test_skip_invalid_counts_and_reports(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join([json.dumps(_alpaca(0)), "[]", json.dumps({"instruction": "x", "output": ""}),
                            json.dumps(_alpaca(1))]) + "\n")
    result = load_conversations(str(f), str(tmp_path), skip_invalid=True)
    assert [c.source for c in result.conversations] == [f"{f}:1", f"{f}:4"]
    assert result.skipped == 2
    assert result.errors == [(f"{f}:2", "the record is a list, not a JSON object"),
                             (f"{f}:3", "the 'output' field is missing or empty")]
    assert result.per_dataset == {str(f): 2}


def test_csv_with_a_missing_column(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("instruction,answer\nhello,hi\n")
    data = _data_dir(tmp_path, {"c": {"file_name": "../d.csv"}}, {})
    assert _error("c", data) == "\n".join([
        "1 invalid record:",
        f"  {os.path.join(data, '../d.csv')}:row 1: the 'output' field is missing or empty",
        "Fix them, or set `skip_invalid: true` to skip invalid records (the number skipped is reported).",
    ])
    data2 = tmp_path / "d2"
    data2.mkdir()
    # A "columns" object names every column read (LLaMA-Factory's DatasetAttr.join): the prompt must be named too.
    entry = {"file_name": "../d.csv", "columns": {"prompt": "instruction", "response": "answer"}}
    (data2 / "dataset_info.json").write_text(json.dumps({"c": entry}))
    assert load_conversations("c", str(data2)).conversations[0].messages[1] == {"role": "assistant", "content": "hi"}


def test_a_dataset_with_no_valid_records(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"instruction": "x"}, {"instruction": "y"}])
    assert _error(f, str(tmp_path), skip_invalid=True) == (
        f"Dataset {f!r} ({f}) has no valid records (2 invalid records were skipped).")


def test_prompts_without_replies_when_not_required(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"instruction": "x", "output": ""}])
    conv = load_conversations(f, str(tmp_path), require_reply=False).conversations[0]
    assert conv.messages == [{"role": "user", "content": "x"}]


def test_openai_and_every_file_type_through_the_loader(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    pq.write_table(pa.Table.from_pylist([record]), str(tmp_path / "o.parquet"))
    (tmp_path / "o.json").write_text(json.dumps([record]))
    result = load_conversations([str(tmp_path / "o.parquet"), str(tmp_path / "o.json")], str(tmp_path))
    expected = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert [(c.messages, c.source) for c in result.conversations] == [
        (expected, f"{tmp_path / 'o.parquet'}[0]"), (expected, f"{tmp_path / 'o.json'}[0]")]


# ----------------------------------------------------------------------------------------------- streaming


def test_streaming_yields_lazily_and_fills_counters(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [_alpaca(0), {"instruction": "x"}, _alpaca(1), _alpaca(2)])
    result = load_conversations(f, str(tmp_path), streaming=True, skip_invalid=True, max_samples=2)
    assert not isinstance(result.conversations, list)
    assert result.per_dataset == {} and result.skipped == 0
    assert [c.source for c in result.conversations] == [f"{f}:1", f"{f}:3"]
    assert result.skipped == 1
    assert result.errors == [(f"{f}:2", "the 'output' field is missing or empty")]
    assert result.per_dataset == {f: 2}


def test_streaming_without_skip_invalid_stops_at_the_first_bad_record(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [_alpaca(0), {"instruction": "x"}])
    result = load_conversations(f, str(tmp_path), streaming=True)
    conversations = iter(result.conversations)
    assert next(conversations).source == f"{f}:1"
    with pytest.raises(DataError) as info:
        next(conversations)
    assert str(info.value) == (f"Invalid record at {f}:2: the 'output' field is missing or empty. Fix it, or set "
                               "`skip_invalid: true` to skip invalid records.")


# ----------------------------------------------------------------------------------------------- hub (faked)


@pytest.fixture
def fake_datasets(monkeypatch):
    """A stand-in `datasets` module: records the load_dataset call and returns two alpaca rows."""
    calls = []
    module = types.ModuleType("datasets")

    def load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        if path == "org/offline":
            raise ConnectionError("Couldn't reach 'org/offline' on the Hub (LocalEntryNotFoundError)")
        return [_alpaca(0), _alpaca(1)]

    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls


def test_hub_dataset_loads_lazily_with_split_and_subset(tmp_path, fake_datasets):
    data = _data_dir(tmp_path, {"hub": {"hf_hub_url": "org/hub", "subset": "zh", "split": "dev"}}, {})
    result = load_conversations("hub", data, split="test")
    assert fake_datasets == [("org/hub", {"name": "zh", "data_dir": None, "split": "test", "streaming": False})]
    assert [(c.messages[1]["content"], c.source) for c in result.conversations] == [
        ("a0", "org/hub:test[0]"), ("a1", "org/hub:test[1]")]
    load_conversations("alpaca_gpt4_en", data, streaming=True)  # nothing is downloaded before iteration
    assert len(fake_datasets) == 1


def test_hub_dataset_without_network(tmp_path, fake_datasets):
    data = _data_dir(tmp_path, {"off": {"hf_hub_url": "org/offline"}}, {})
    assert _error("off", data) == (
        "Dataset 'off' could not be downloaded from the Hugging Face Hub (org/offline): ConnectionError: Couldn't "
        "reach 'org/offline' on the Hub (LocalEntryNotFoundError). Check the network connection and the dataset id, "
        "or download it and use a local file (a path, or file_name in dataset_info.json).")


def test_modelscope_without_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # makes `import modelscope` fail
    message = _error("alpaca_gpt4_zh", str(tmp_path), use_modelscope=True)
    assert message == ("Dataset 'alpaca_gpt4_zh' is on ModelScope (llamafactory/alpaca_gpt4_zh), which needs the "
                       "modelscope package: pip install modelscope (or pip install 'tunelab[modelscope]'). Or unset "
                       "USE_MODELSCOPE_HUB to use the Hugging Face Hub copy.")


# ----------------------------------------------------------------------------------------------- fingerprint


def test_content_fingerprint_follows_files_and_entries(tmp_path):
    data = _data_dir(tmp_path, {"a": {"file_name": "a.jsonl"}}, {"a.jsonl": [_alpaca(0)]})
    first = content_fingerprint("a", data)
    assert len(first) == 64 and first == content_fingerprint(["a"], data)
    path = os.path.join(data, "a.jsonl")
    _jsonl(tmp_path / "data" / "a.jsonl", [_alpaca(0), _alpaca(1)])
    second = content_fingerprint("a", data)
    assert second != first
    os.utime(path, ns=(1, 1))
    assert content_fingerprint("a", data) != second
    third = content_fingerprint("a", data)
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps({"a": {"file_name": "a.jsonl", "num_samples": 1}}))
    assert content_fingerprint("a", data) != third
    assert content_fingerprint("a,a", data) != content_fingerprint("a", data)
