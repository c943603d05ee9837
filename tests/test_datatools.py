"""Tests for `tunelab data` (tunelab.commands.data + tunelab.datatools): the three tutorial conversions as one
command each, exact output files, broken inputs (exact messages, exit codes, no half-written output), split
reproducibility, validate / stats / preview output with the offline Qwen tokenizer, register's entry handling.

Every test runs `tunelab.cli.main([...])` in a temporary working directory on files it writes, CPU only, offline.
"""
from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from tunelab.cli import main as cli
from tunelab.data.conversation import Conversation
from tunelab.data.formats import RecordError
from tunelab.data.registry import resolve_dataset, spec_from_path
from tunelab.datatools.convert import to_alpaca, to_openai, to_sharegpt, unescape
from tunelab.datatools.numbers import describe, histogram_lines
from tunelab.datatools.source import iter_conversations
from tunelab.datatools.split import parse_amount
from tunelab.errors import ConfigError


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("USE_MODELSCOPE_HUB", raising=False)


def run(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli(["data", *args])
    out, err = capsys.readouterr()
    return code, out, err


def write_jsonl(path: str, records: list) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return path


def write_json(path: str, data) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, ensure_ascii=False)
    return path


def read(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def pretty(records: list) -> str:
    """What a .json output must hold, byte for byte."""
    return json.dumps(records, indent=2, ensure_ascii=False) + "\n"


def files() -> list[str]:
    """Everything in the working directory, hidden temp files included."""
    return sorted(os.listdir("."))


GSM8K = [
    {"question": "Natalia sold clips to 48 friends in April, and half as many in May. How many in total?",
     "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn total 48+24 = <<48+24=72>>72.\n#### 72"},
    {"question": "Weng earns $12 an hour. How much did she earn for 50 minutes?",
     "answer": "12/60 = $<<12/60=0.2>>0.2 per minute.\n50 * 0.2 = $<<50*0.2=10>>10.\n#### 10"},
]

SHAREGPT_EXTRA = [
    {"id": "a1", "score": 4.5, "lang": "zh", "conversations": [
        {"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！有什么可以帮你？"}]},
    {"id": "a2", "score": 3.0, "lang": "en", "system": "Be brief.", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."},
        {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
    {"id": "a3", "score": 1.0, "lang": "en", "conversations": [{"from": "human", "value": "Bye"},
                                                                {"from": "gpt", "value": "Bye!"}]},
]


# ----------------------------------------------------------------------------------------------- tutorials


def test_tutorial_1_gsm8k_parquet_to_alpaca_json(capsys):
    pd.DataFrame(GSM8K).to_parquet("gsm8k_train.parquet")
    code, out, err = run(capsys, "convert", "gsm8k_train.parquet", "data/gsm8k_alpaca.json", "--to", "alpaca",
                         "--map", "instruction=question,output=answer")
    assert (code, err) == (0, "")
    assert out == ("Read gsm8k_train.parquet as alpaca (detected: the record has 'instruction', 'output').\n"
                   "Wrote 2 alpaca records to data/gsm8k_alpaca.json.\n")
    assert read("data/gsm8k_alpaca.json") == pretty(
        [{"instruction": r["question"], "input": "", "output": r["answer"]} for r in GSM8K])


def test_tutorial_1_variant_separate_solution_and_final_answer_columns(capsys):
    pd.DataFrame({"question": ["1+1?", "2*3?"], "solution": ["1+1 = 2.", "2*3 = 6."],
                  "answer": [2, 6]}).to_parquet("math.parquet")  # an integer column: written as text
    code, out, _ = run(capsys, "convert", "math.parquet", "math.json", "--to", "alpaca", "--map",
                       "instruction=question,output=solution", "--output-template", r"{output}\n#### {answer}")
    assert code == 0
    assert read("math.json") == pretty([
        {"instruction": "1+1?", "input": "", "output": "1+1 = 2.\n#### 2"},
        {"instruction": "2*3?", "input": "", "output": "2*3 = 6.\n#### 6"}])


def test_tutorial_2_split_2000_train_200_eval_from_first_90_and_last_10_percent(capsys):
    records = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(3000)]
    write_json("gsm8k_alpaca.json", records)
    args = ("split", "gsm8k_alpaca.json", "--train", "2000", "--eval", "200", "--head", "0.9", "--seed", "42")
    code, out, _ = run(capsys, *args, "--out-dir", "a")
    assert code == 0
    assert out == ("gsm8k_alpaca.json: 3,000 records; train drawn from records 1-2,700, eval from 2,701-3,000 "
                   "(seed 42).\nWrote 2,000 train records to a/gsm8k_alpaca_train.json.\n"
                   "Wrote 200 eval records to a/gsm8k_alpaca_eval.json.\n")
    train = json.loads(read("a/gsm8k_alpaca_train.json"))
    evaluation = json.loads(read("a/gsm8k_alpaca_eval.json"))
    train_ids = [int(r["instruction"][1:]) for r in train]
    eval_ids = [int(r["instruction"][1:]) for r in evaluation]
    assert len(set(train_ids)) == 2000 and len(set(eval_ids)) == 200
    assert max(train_ids) < 2700 <= min(eval_ids)  # from the head / the tail: never overlapping
    assert train_ids == sorted(train_ids)  # records keep their file order
    assert train == [records[i] for i in train_ids]  # copied unchanged
    # Reproducible: the same seed gives the same bytes; another seed another sample.
    assert run(capsys, *args, "--out-dir", "b")[0] == 0
    assert read("b/gsm8k_alpaca_train.json") == read("a/gsm8k_alpaca_train.json")
    assert read("b/gsm8k_alpaca_eval.json") == read("a/gsm8k_alpaca_eval.json")
    run(capsys, "split", "gsm8k_alpaca.json", "--train", "2000", "--eval", "200", "--head", "0.9", "--seed", "7",
        "--out-dir", "c")
    assert read("c/gsm8k_alpaca_train.json") != read("a/gsm8k_alpaca_train.json")


def test_tutorial_3_sharegpt_jsonl_with_extra_fields_to_clean_sharegpt_json(capsys):
    write_jsonl("sharegpt_137k.jsonl", SHAREGPT_EXTRA)
    code, out, _ = run(capsys, "convert", "sharegpt_137k.jsonl", "data/sharegpt_clean.json", "--to", "sharegpt",
                       "--limit", "2")
    assert code == 0
    assert out == ("Read sharegpt_137k.jsonl as sharegpt (detected: 'conversations' holds turns with "
                   "'from'/'value').\nWrote 2 sharegpt records to data/sharegpt_clean.json.\n")
    assert read("data/sharegpt_clean.json") == pretty([
        {"conversations": SHAREGPT_EXTRA[0]["conversations"]},
        {"conversations": SHAREGPT_EXTRA[1]["conversations"], "system": "Be brief."}])


# ----------------------------------------------------------------------------------------------- convert


def test_convert_keep_extra_to_jsonl(capsys):
    write_jsonl("chat.jsonl", SHAREGPT_EXTRA[:1])
    assert run(capsys, "convert", "chat.jsonl", "chat_openai.jsonl", "--to", "openai", "--keep-extra")[0] == 0
    assert read("chat_openai.jsonl") == json.dumps({
        "messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"}],
        "id": "a1", "score": 4.5, "lang": "zh"}, ensure_ascii=False) + "\n"


def test_convert_alpaca_with_history_to_sharegpt_and_openai_and_back(capsys):
    record = {"instruction": "And 3+3?", "input": "Be exact.", "output": "6", "system": "You do sums.",
              "history": [["1+1?", "2"]]}
    write_jsonl("sums.jsonl", [record])
    assert run(capsys, "convert", "sums.jsonl", "sums_sharegpt.json", "--to", "sharegpt")[0] == 0
    assert json.loads(read("sums_sharegpt.json")) == [{"conversations": [
        {"from": "human", "value": "1+1?"}, {"from": "gpt", "value": "2"},
        {"from": "human", "value": "And 3+3?\nBe exact."}, {"from": "gpt", "value": "6"}], "system": "You do sums."}]
    assert run(capsys, "convert", "sums_sharegpt.json", "sums_openai.json", "--to", "openai")[0] == 0
    assert json.loads(read("sums_openai.json")) == [{"messages": [
        {"role": "system", "content": "You do sums."}, {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"}, {"role": "user", "content": "And 3+3?\nBe exact."},
        {"role": "assistant", "content": "6"}]}]
    assert run(capsys, "convert", "sums_openai.json", "sums_alpaca.json", "--to", "alpaca")[0] == 0
    assert json.loads(read("sums_alpaca.json")) == [{"instruction": "And 3+3?\nBe exact.", "input": "", "output": "6",
                                                    "system": "You do sums.", "history": [["1+1?", "2"]]}]
    # alpaca -> alpaca keeps the instruction / input split; every output reads back as the same conversation.
    assert run(capsys, "convert", "sums.jsonl", "sums_copy.json", "--to", "alpaca")[0] == 0
    assert json.loads(read("sums_copy.json")) == [record]
    convs = [list(iter_conversations(spec_from_path(p))) for p in
             ("sums.jsonl", "sums_sharegpt.json", "sums_openai.json", "sums_alpaca.json")]
    assert all([(c.system, c.messages) for c in group] == [(convs[0][0].system, convs[0][0].messages)]
               for group in convs)


TOOL_CONV = Conversation(
    messages=[{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": "", "tool_calls": [{"name": "weather", "arguments": {"city": "Paris"}}]},
              {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}],
    tools=[{"name": "weather", "parameters": {"type": "object"}}])


def test_inverse_writers_with_tool_calls():
    assert to_sharegpt(TOOL_CONV) == {"conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}],
        "tools": '[{"name": "weather", "parameters": {"type": "object"}}]'}
    assert to_openai(TOOL_CONV) == {"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}],
        "tools": [{"name": "weather", "parameters": {"type": "object"}}]}
    with pytest.raises(RecordError, match="tool calls or tool results, which alpaca records cannot hold"):
        to_alpaca(TOOL_CONV)


def test_convert_tool_calls_to_alpaca_reports_the_record(capsys):
    write_jsonl("tools.jsonl", [{"conversations": to_sharegpt(TOOL_CONV)["conversations"]}])
    code, _, err = run(capsys, "convert", "tools.jsonl", "tools_alpaca.json", "--to", "alpaca")
    assert code == 1
    assert err == ("tunelab data: error: tools.jsonl:1: it has tool calls or tool results, which alpaca records "
                   "cannot hold; convert it to sharegpt or openai instead.\n")
    assert files() == ["tools.jsonl"]


BROKEN = [
    # (file name, bytes, extra args, error after "tunelab data: error: ")
    ("truncated.json", b'[{"instruction": "a", "output": "b"},\n{"instruction": "c", "outp', (),
     "truncated.json:2: invalid JSON: the file ends before the JSON is complete (line 2, column 22); it looks "
     "truncated."),
    ("broken.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "c" "output": "d"}\n', (),
     "broken.jsonl:2: invalid JSON: Expecting ',' delimiter at column 21."),
    ("cut.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "c", "outp', (),
     "cut.jsonl:2: invalid JSON: the line ends before the record is complete; the file looks truncated."),
    ("gbk.jsonl", '{"instruction": "你好", "output": "好"}\n'.encode("gbk"), (),
     "gbk.jsonl:1: the text is not valid UTF-8 (byte 0xc4 at byte 18 of the line); it looks like GBK/GB18030. "
     "Re-save the file as UTF-8 (for example: iconv -f GB18030 -t UTF-8 old > new)."),
    ("empty.jsonl", b"", (), "empty.jsonl is empty: it contains no records."),
    ("math.csv", b"question,answer\n1+1?,2\n", ("--map", "instruction=question,output=solution"),
     "math.csv:row 1: the column 'solution' named by --map output=solution is missing (the record has "
     "'question', 'answer')."),
    ("broken.parquet", b"PAR1 not really parquet", (),
     "broken.parquet cannot be read as Parquet (Parquet magic bytes not found in footer. Either the file is "
     "corrupted or this is not a parquet file.); it may be truncated or not a Parquet file."),
    ("text.jsonl", b'{"text": "plain pre-training text"}\n', (),
     "Cannot tell the format of text.jsonl from its first record (text.jsonl:1): the record only has 'text' "
     "(plain text for pre-training); supervised fine-tuning needs alpaca, sharegpt or openai records. Give --from, "
     "or --map the columns to the names of a format (e.g. --map instruction=question,output=answer)."),
]


@pytest.mark.parametrize(("name", "content", "extra", "message"), BROKEN, ids=[b[0] for b in BROKEN])
def test_convert_broken_input_is_a_clear_error_and_leaves_no_output(capsys, name, content, extra, message):
    with open(name, "wb") as fh:
        fh.write(content)
    with open("out.json", "w") as fh:
        fh.write("old output\n")
    code, out, err = run(capsys, "convert", name, "out.json", "--to", "alpaca", *extra)
    assert (code, out, err) == (1, "", f"tunelab data: error: {message}\n")
    assert files() == sorted([name, "out.json"])  # no temp file left behind ...
    assert read("out.json") == "old output\n"  # ... and the old output untouched


def test_convert_skip_invalid_reports_them(capsys):
    with open("mixed.jsonl", "w") as fh:
        fh.write('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n[1]\n'
                 '{"instruction": "d", "output": "e"}\n')
    code, out, _ = run(capsys, "convert", "mixed.jsonl", "ok.jsonl", "--to", "alpaca", "--skip-invalid")
    assert code == 0
    assert out.splitlines()[1:] == ["Wrote 2 alpaca records to ok.jsonl.", "Skipped 2 invalid records:",
                                    "  mixed.jsonl:2: the 'output' field is missing or empty",
                                    "  mixed.jsonl:3: the record is a list, not a JSON object"]


def test_convert_usage_errors(capsys):
    write_jsonl("chat.jsonl", SHAREGPT_EXTRA)
    assert run(capsys, "convert", "chat.jsonl", "x.json")[0] == 2  # --to is required
    assert run(capsys, "convert", "chat.jsonl", "x.parquet", "--to", "alpaca")[2] == (
        "tunelab data: error: Cannot write x.parquet: the output must end in .json (a JSON array) or .jsonl (one "
        "record per line).\n")
    assert run(capsys, "convert", "chat.jsonl", "x.json", "--to", "alpaca", "--map", "instruction")[2] == (
        "tunelab data: error: --map expects NAME=VALUE pairs separated by commas (for example --map "
        "instruction=question,output=answer); 'instruction' is not one.\n")
    assert run(capsys, "convert", "chat.jsonl", "x.json", "--to", "alpaca", "--output-template", "{x}")[2] == (
        "tunelab data: error: --output-template sets the alpaca 'output' field, but chat.jsonl is read as "
        "sharegpt.\n")
    assert files() == ["chat.jsonl"]


def test_unescape():
    assert unescape(r"{a}\n#### {b}\t\\n") == "{a}\n#### {b}\t\\n"


# ----------------------------------------------------------------------------------------------- split


def test_split_without_head_fractions_do_not_overlap(capsys):
    write_jsonl("all.jsonl", [{"instruction": f"q{i}", "output": "a"} for i in range(50)])
    code, out, _ = run(capsys, "split", "all.jsonl", "--train", "0.8", "--eval", "0.2", "--seed", "1")
    assert code == 0
    assert out == ("all.jsonl: 50 records; train and eval drawn from all of them (seed 1).\n"
                   "Wrote 40 train records to ./all_train.jsonl.\nWrote 10 eval records to ./all_eval.jsonl.\n")
    train = {line for line in read("all_train.jsonl").splitlines()}
    evaluation = {line for line in read("all_eval.jsonl").splitlines()}
    assert len(train) == 40 and len(evaluation) == 10 and not train & evaluation


def test_split_fractions_adding_up_to_one_write_every_record(capsys):
    write_jsonl("all.jsonl", [{"instruction": f"q{i}", "output": "a"} for i in range(254)])
    code, out, _ = run(capsys, "split", "all.jsonl", "--train", "0.8", "--eval", "0.2", "--seed", "1")
    assert code == 0
    assert out.splitlines()[1:] == ["Wrote 203 train records to ./all_train.jsonl.", "Wrote 51 eval records to ./all_eval.jsonl."]
    train, evaluation = set(read("all_train.jsonl").splitlines()), set(read("all_eval.jsonl").splitlines())
    assert len(train | evaluation) == 254 and not train & evaluation
    code, out, _ = run(capsys, "split", "all.jsonl", "--train", "0.5", "--eval", "0.3", "--seed", "1")
    assert out.splitlines()[1:] == ["Wrote 127 train records to ./all_train.jsonl.", "Wrote 76 eval records to ./all_eval.jsonl."]


def test_split_asking_for_too_many_is_an_error(capsys):
    write_jsonl("few.jsonl", [{"instruction": f"q{i}", "output": "a"} for i in range(10)])
    code, _, err = run(capsys, "split", "few.jsonl", "--train", "5", "--eval", "2", "--head", "0.9")
    assert code == 1
    assert err == ("tunelab data: error: --eval 2 asks for more records than the file has records after its first "
                   "0.9 (1 of 10).\n")
    assert files() == ["few.jsonl"]


def test_parse_amount():
    assert (parse_amount("2000", "--train"), parse_amount("0.1", "--eval"), parse_amount("1.0", "--eval")) == (
        2000, 0.1, 1.0)
    with pytest.raises(ConfigError, match="a count >= 0 or a fraction between 0 and 1"):
        parse_amount("1.5", "--train")


# ----------------------------------------------------------------------------------------------- validate

ALPACA = [{"instruction": "Hi", "output": "Hello!"},
          {"instruction": "What is 2+2?", "input": "Answer briefly.", "output": "4", "system": "Be brief."}]


def test_validate_clean_file_exits_0(capsys):
    write_jsonl("ok.jsonl", ALPACA)
    assert run(capsys, "validate", "ok.jsonl") == (0, "ok.jsonl (alpaca): 2 records, 2 valid, 0 invalid.\n", "")


def test_validate_reports_every_invalid_record_and_exits_1(capsys):
    with open("bad.jsonl", "w") as fh:
        fh.write('{"instruction": "Hi", "output": "Hello"}\n{"instruction": "x"}\n{bad\n"text"\n'
                 '{"instruction": "", "output": "y"}\n')
    code, out, err = run(capsys, "validate", "bad.jsonl")
    assert (code, err) == (1, "")
    assert out == ("bad.jsonl:2: the 'output' field is missing or empty\n"
                   "bad.jsonl:3: invalid JSON: Expecting property name enclosed in double quotes at column 2\n"
                   "bad.jsonl:4: the record is text, not a JSON object\n"
                   "bad.jsonl:5: the 'instruction' field is missing or empty\n"
                   "bad.jsonl (alpaca): 5 records, 1 valid, 4 invalid.\n")


def test_validate_registered_name_and_unknown_name(capsys):
    os.mkdir("data")
    write_jsonl("data/chat.jsonl", SHAREGPT_EXTRA)
    write_json("data/dataset_info.json", {"chat": {"file_name": "chat.jsonl", "formatting": "sharegpt"}})
    assert run(capsys, "validate", "chat") == (0, "data/chat.jsonl (sharegpt): 3 records, 3 valid, 0 invalid.\n", "")
    code, _, err = run(capsys, "validate", "chta")
    assert code == 1 and "Did you mean 'chat'?" in err


@pytest.mark.parametrize("workers", ["1", "2"])
def test_validate_token_report_with_offline_qwen_tokenizer(capsys, qwen_tokenizer, workers):
    write_jsonl("ok.jsonl", ALPACA * 3)
    code, out, err = run(capsys, "validate", "ok.jsonl", "--template", "qwen", "--cutoff-len", "30",
                         "--workers", workers)
    assert code == 0
    assert out == (
        "No --model given: using the offline Qwen2.5 tokenizer and template 'qwen'.\n"
        "ok.jsonl (alpaca): 6 records, 6 valid, 0 invalid.\n"
        "Tokens per sample with template 'qwen' (before truncation):\n"
        "  tokens: min 29, mean 31.5, p50 29, p90 34, p99 34, max 34\n"
        "  over cutoff_len 30: 3 of 6 samples (50.0%) would be truncated\n"
        "  whole response lost: 0 samples (training drops such samples)\n"
        "  trained tokens (after truncation): 15\n")
    assert err == "[tunelab] validate: 6 samples\n"  # plain progress lines: stderr is not a terminal


def test_validate_counts_samples_that_lose_their_whole_response(capsys, qwen_tokenizer):
    long = {"instruction": "word " * 300, "output": "one two three four five six seven eight nine ten"}
    write_jsonl("long.jsonl", [long, ALPACA[0]])
    code, out, _ = run(capsys, "validate", "long.jsonl", "--template", "qwen", "--cutoff-len", "20",
                       "--workers", "1")
    assert code == 0  # a warning, not an invalid record
    assert out.splitlines()[3:] == [
        "  tokens: min 34, mean 188.0, p50 34, p90 342, p99 342, max 342",
        "  over cutoff_len 20: 2 of 2 samples (100.0%) would be truncated",
        "  whole response lost: 1 sample (training drops such samples)",
        "  trained tokens (after truncation): 3"]
    # The same numbers straight from the template layer.
    from tunelab.data.formats import convert_alpaca
    from tunelab.data.template import get_template

    tpl = get_template("qwen", qwen_tokenizer)
    assert [len(tpl.encode_supervised(convert_alpaca(r))[0]) for r in (long, ALPACA[0])] == [342, 34]
    assert tpl.encode_supervised(convert_alpaca(long), 20) is None


# ----------------------------------------------------------------------------------------------- stats


def test_stats_counts_lengths_chinese_share_duplicates_and_plot(capsys):
    write_jsonl("chat.jsonl", SHAREGPT_EXTRA + [dict(SHAREGPT_EXTRA[0], id="a4")])
    code, out, _ = run(capsys, "stats", "chat.jsonl", "--plot", "plots/stats.png")
    assert code == 0
    assert out == (
        "chat.jsonl (sharegpt): 4 records, 4 valid, 0 invalid.\n"
        "turns per conversation: min 1, mean 1.2, p50 1, p90 2, p99 2, max 2\n"
        "  1 | ######################################## 3\n"
        "  2 | #############                            1\n"
        "prompt characters: min 2, mean 5.5, p50 2, p90 15, p99 15, max 15\n"
        "   2-3 | ######################################## 3\n"
        "   4-7 |                                          0\n"
        "  8-15 | #############                            1\n"
        "response characters: min 4, mean 8.2, p50 7, p90 11, p99 11, max 11\n"
        "   4-7 | ######################################## 2\n"
        "  8-15 | ######################################## 2\n"
        "text: 40.7% Chinese (CJK characters) of 54 non-space characters; 2 of 4 samples (50.0%) are mostly "
        "Chinese.\n"
        "duplicates: 1 sample repeats an earlier one (chat.jsonl:4 = chat.jsonl:1).\n"
        "Wrote the histograms to plots/stats.png.\n")
    with open("plots/stats.png", "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_stats_with_tokens(capsys, qwen_tokenizer):
    write_jsonl("ok.jsonl", ALPACA)
    code, out, _ = run(capsys, "stats", "ok.jsonl", "--template", "qwen", "--workers", "1")
    assert code == 0
    # 34 and 29 tokens, of which 3 and 2 are trained (the reply and <|im_end|>)
    assert "prompt tokens (qwen): min 27, mean 29.0, p50 27, p90 31, p99 31, max 31\n" in out
    assert "response tokens (qwen): min 2, mean 2.5, p50 2, p90 3, p99 3, max 3\n" in out


def test_progress_is_a_live_line_on_a_terminal_and_plain_lines_otherwise():
    import io

    from tunelab.datatools.tokens import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    plain, tty = io.StringIO(), Terminal()
    for stream in (plain, tty):
        progress = Progress("validate", every=10, stream=stream)
        for _ in range(25):
            progress.update()
        progress.close()
    assert plain.getvalue() == ("[tunelab] validate: 10 samples\n[tunelab] validate: 20 samples\n"
                                "[tunelab] validate: 25 samples\n")
    assert tty.getvalue().startswith("\r\x1b[Kvalidate: 25 samples, ") and tty.getvalue().endswith(" s\n")


def test_numbers():
    assert describe([5, 1, 3, 2, 4]) == {"count": 5, "min": 1, "mean": 3.0, "p50": 3, "p90": 5, "p99": 5, "max": 5}
    assert histogram_lines([0, 1, 2, 3, 9], width=4) == [
        "     0 | ##   1", "     1 | ##   1", "   2-3 | #### 2", "   4-7 |      0", "  8-15 | ##   1"]


# ----------------------------------------------------------------------------------------------- preview


def test_preview_marks_trained_tokens_in_brackets(capsys, qwen_tokenizer):
    write_jsonl("one.jsonl", [{"instruction": "Hi", "output": "Hello!"}])
    code, out, err = run(capsys, "preview", "one.jsonl")
    assert (code, err) == (0, "")
    assert out == (
        "No --model given: using the offline Qwen2.5 tokenizer and template 'qwen'.\n"
        "Trained tokens (those with a loss) are shown in [[double brackets]].\n"
        "--- sample 1: one.jsonl:1 ---\n"
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n[[Hello!<|im_end|>]]\n")


def test_preview_colours_trained_tokens_on_a_terminal(capsys, qwen_tokenizer, monkeypatch):
    write_jsonl("one.jsonl", [{"instruction": "Hi", "output": "Hello!"}])
    monkeypatch.delenv("NO_COLOR", raising=False)
    capsys.readouterr()
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    assert cli(["data", "preview", "one.jsonl", "--template", "chatml"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n\x1b[32mHello!<|im_end|>\x1b[0m\n")


def test_preview_multi_turn_and_n(capsys, qwen_tokenizer):
    write_jsonl("chat.jsonl", SHAREGPT_EXTRA)
    code, out, _ = run(capsys, "preview", "chat.jsonl", "-n", "1", "--template", "chatml")
    assert code == 0
    assert out.count("--- sample") == 1 and "template 'chatml'" in out
    code, out, _ = run(capsys, "preview", "chat.jsonl", "-n", "2")
    assert out.split("--- sample 2: chat.jsonl:2 ---\n")[1] == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "[[Hello.<|im_end|>]]\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n[[4<|im_end|>]]\n")


# ----------------------------------------------------------------------------------------------- register


def test_register_adds_keeps_others_and_refuses_a_different_entry_without_force(capsys):
    os.mkdir("data")
    write_json("data/dataset_info.json", {"other": {"file_name": "other.json"}})
    write_json("data/other.json", ALPACA)
    write_jsonl("data/chat.jsonl", SHAREGPT_EXTRA)
    code, out, _ = run(capsys, "register", "chat", "data/chat.jsonl")
    assert code == 0
    chat = {"file_name": "chat.jsonl", "formatting": "sharegpt",  # record 2's system column is named
            "columns": {"messages": "conversations", "system": "system"}}
    assert out == f"Registered 'chat' in data/dataset_info.json (3 valid records): {json.dumps(chat)}\n"
    expected = {"other": {"file_name": "other.json"}, "chat": chat}
    assert json.loads(read("data/dataset_info.json")) == expected
    code, out, _ = run(capsys, "register", "chat", "chat.jsonl")  # found under --dataset-dir too
    assert (code, out.split(" in ")[0]) == (0, "Already registered 'chat'")
    code, _, err = run(capsys, "register", "chat", "data/other.json")
    assert code == 1
    assert err == ("tunelab data: error: Dataset 'chat' is already registered in data/dataset_info.json with a "
                   f"different entry ({json.dumps(chat)}); use force (--force) to replace it.\n")
    assert json.loads(read("data/dataset_info.json")) == expected
    code, out, _ = run(capsys, "register", "chat", "data/other.json", "--force")
    assert code == 0 and out.startswith("Replaced 'chat'")
    assert json.loads(read("data/dataset_info.json")) == {
        "other": {"file_name": "other.json"}, "chat": {"file_name": "other.json", "formatting": "alpaca", "columns": {
            "prompt": "instruction", "query": "input", "response": "output", "system": "system"}}}
    assert sorted(os.listdir("data")) == ["chat.jsonl", "dataset_info.json", "other.json"]


def test_register_validates_first_and_leaves_the_registry_alone(capsys):
    os.mkdir("data")
    write_json("data/dataset_info.json", {})
    with open("data/bad.jsonl", "w") as fh:
        fh.write('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    code, _, err = run(capsys, "register", "bad", "data/bad.jsonl")
    assert code == 1
    assert err == ("tunelab data: error: Not registering 'bad': data/bad.jsonl does not pass validation with the "
                   "entry {'file_name': 'bad.jsonl', 'formatting': 'alpaca'}.\nFound 1 invalid record:\n"
                   "  data/bad.jsonl:2: the 'output' field is missing or empty\nFix the file, or give --formatting "
                   "/ --columns / --tags that match it.\n")
    assert read("data/dataset_info.json") == "{}"


def test_register_openai_and_custom_columns_write_explicit_mappings(capsys):
    write_jsonl("msgs.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello"}]}])
    write_jsonl("dialog.jsonl", [{"dialog": [{"role": "user", "text": "Hi"}, {"role": "bot", "text": "Hello"}]}])
    assert run(capsys, "register", "msgs", "msgs.jsonl", "--dataset-dir", ".")[0] == 0
    assert run(capsys, "register", "dialog", "dialog.jsonl", "--dataset-dir", ".", "--formatting", "sharegpt",
               "--columns", "messages=dialog", "--tags", "role_tag=role,content_tag=text,user_tag=user,"
               "assistant_tag=bot")[0] == 0
    assert json.loads(read("dataset_info.json")) == {
        "msgs": {"file_name": "msgs.jsonl", "formatting": "openai", "columns": {"messages": "messages"},
                 "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                          "assistant_tag": "assistant", "observation_tag": "tool", "function_tag": "function_call",
                          "system_tag": "system"}},
        "dialog": {"file_name": "dialog.jsonl", "formatting": "sharegpt", "columns": {"messages": "dialog"},
                   "tags": {"role_tag": "role", "content_tag": "text", "user_tag": "user", "assistant_tag": "bot",
                            "observation_tag": "observation", "function_tag": "function_call",
                            "system_tag": "system"}}}
    assert run(capsys, "validate", "dialog", "--dataset-dir", ".")[0] == 0
    code, _, err = run(capsys, "register", "x", "msgs.jsonl", "--dataset-dir", ".", "--tags", "rol_tag=role")
    assert code == 1 and "Did you mean 'role_tag'?" in err


def test_register_writes_complete_columns_so_the_entry_reads_prompt_and_response(capsys):
    # An entry with "columns" reads exactly what it names (LLaMA-Factory, and tunelab's registry): naming only the
    # non-default system column would leave prompt and response unused.
    write_jsonl("sys.jsonl", [{"instruction": "Hi", "output": "Hello!", "sys": "Be kind."}])
    assert run(capsys, "register", "s", "sys.jsonl", "--dataset-dir", ".", "--columns", "system=sys")[0] == 0
    assert read("dataset_info.json") == (
        '{\n  "s": {\n    "file_name": "sys.jsonl",\n    "formatting": "alpaca",\n    "columns": {\n'
        '      "prompt": "instruction",\n      "query": "input",\n      "response": "output",\n'
        '      "system": "sys"\n    }\n  }\n}\n')
    conv = next(iter_conversations(resolve_dataset("s", ".")))
    assert (conv.system, [m["content"] for m in conv.messages]) == ("Be kind.", ["Hi", "Hello!"])


# ----------------------------------------------------------------------------------------------- the front


def test_folder_input_and_hub_datasets(capsys):
    os.mkdir("parts")
    write_jsonl("parts/b.jsonl", [ALPACA[1]])
    write_jsonl("parts/a.jsonl", [ALPACA[0]])
    assert run(capsys, "convert", "parts", "all.jsonl", "--to", "alpaca")[0] == 0
    assert [json.loads(line)["instruction"] for line in read("all.jsonl").splitlines()] == ["Hi", "What is 2+2?"]
    os.mkdir("data")
    write_json("data/dataset_info.json", {"hub": {"hf_hub_url": "someone/chat"}})
    code, _, err = run(capsys, "stats", "hub")
    assert code == 1
    assert err.startswith("tunelab data: error: Dataset 'hub' is on the Hugging Face Hub (someone/chat); "
                          "`tunelab data` works on local files.")


def test_help_and_usage_exit_codes(capsys):
    assert run(capsys, "--help")[0] == 0
    assert run(capsys)[0] == 2
    assert run(capsys, "split", "x.json")[0] == 2  # --train missing
    code, _, err = run(capsys, "validate", "missing.jsonl")
    assert code == 1 and "is not an existing file or folder" in err
