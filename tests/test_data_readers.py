"""Tests for tunelab.data.readers: every file type with its location strings, streaming, and every file or
record problem with its exact location."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunelab.data.readers import InvalidRecord, data_files, iter_records
from tunelab.errors import DataError

ROWS = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}, {"instruction": "e", "output": "f"}]


def _write(path, text: str | bytes) -> str:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return str(path)


def _collect(path: str) -> tuple[list, list[InvalidRecord]]:
    bad: list[InvalidRecord] = []
    return list(iter_records(path, on_error=bad.append)), bad


def _error(path: str) -> str:
    with pytest.raises(DataError) as info:
        list(iter_records(path))
    return str(info.value)


# ----------------------------------------------------------------------------------------------- file types


def test_jsonl_locations_skip_blank_lines_and_accept_bom(tmp_path):
    f = _write(tmp_path / "d.jsonl", "\ufeff" + json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\r\n")
    assert list(iter_records(f)) == [(f"{f}:1", ROWS[0]), (f"{f}:3", ROWS[1])]


def test_json_array(tmp_path):
    f = _write(tmp_path / "d.json", "\ufeff" + json.dumps(ROWS, indent=2))
    assert list(iter_records(f)) == [(f"{f}[0]", ROWS[0]), (f"{f}[1]", ROWS[1]), (f"{f}[2]", ROWS[2])]


def test_json_file_with_json_lines_content(tmp_path):
    f = _write(tmp_path / "d.json", "\n".join(json.dumps(r) for r in ROWS[:2]) + "\n")
    assert list(iter_records(f)) == [(f"{f}:1", ROWS[0]), (f"{f}:2", ROWS[1])]


def test_csv_rows_are_text_with_quoted_newlines(tmp_path):
    f = _write(tmp_path / "d.csv", "\ufeffinstruction,input,output\r\n"
                                   'a,,"line1\nline2"\r\n'
                                   "\r\n"
                                   "c,1,2\r\n")
    assert list(iter_records(f)) == [
        (f"{f}:row 1", {"instruction": "a", "input": "", "output": "line1\nline2"}),
        (f"{f}:row 2", {"instruction": "c", "input": "1", "output": "2"}),
    ]


def test_parquet_across_row_groups(tmp_path):
    f = str(tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS), f, row_group_size=2)
    assert pq.ParquetFile(f).num_row_groups == 2
    assert list(iter_records(f)) == [(f"{f}[0]", ROWS[0]), (f"{f}[1]", ROWS[1]), (f"{f}[2]", ROWS[2])]


def test_parquet_streams_without_reading_the_whole_table(tmp_path, monkeypatch):
    f = str(tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS), f, row_group_size=1)

    def whole_table(*args, **kwargs):
        raise AssertionError("read the whole file")

    monkeypatch.setattr(pq.ParquetFile, "read", whole_table)
    monkeypatch.setattr(pq, "read_table", whole_table)
    assert next(iter_records(f)) == (f"{f}[0]", ROWS[0])


@pytest.mark.parametrize("writer", [pa.ipc.new_stream, pa.ipc.new_file])
def test_arrow_stream_and_file_formats(tmp_path, writer):
    f = str(tmp_path / "d.arrow")
    table = pa.Table.from_pylist(ROWS)
    with pa.OSFile(f, "wb") as sink, writer(sink, table.schema) as out:
        for batch in table.to_batches(max_chunksize=2):
            out.write_batch(batch)
    assert list(iter_records(f)) == [(f"{f}[0]", ROWS[0]), (f"{f}[1]", ROWS[1]), (f"{f}[2]", ROWS[2])]


def test_save_to_disk_folder_reads_only_the_arrow_data(tmp_path):
    # The layout `datasets.Dataset.save_to_disk` writes: arrow stream shards plus two metadata JSON files.
    folder = tmp_path / "saved"
    folder.mkdir()
    for i, rows in enumerate([ROWS[:2], ROWS[2:]]):
        table = pa.Table.from_pylist(rows)
        with pa.OSFile(str(folder / f"data-0000{i}-of-00002.arrow"), "wb") as sink, \
                pa.ipc.new_stream(sink, table.schema) as out:
            out.write_table(table)
    _write(folder / "dataset_info.json", "{}")
    _write(folder / "state.json", '{"_data_files": []}')
    records = [r for _, r in iter_records(str(folder))]
    assert records == ROWS


def test_txt_lines(tmp_path):
    f = _write(tmp_path / "d.txt", "first line\n\nsecond line\r\n")
    assert list(iter_records(f)) == [(f"{f}:1", {"text": "first line"}), (f"{f}:3", {"text": "second line"})]


def test_folder_reads_data_files_in_sorted_order(tmp_path):
    _write(tmp_path / "b.jsonl", json.dumps(ROWS[1]) + "\n")
    _write(tmp_path / "a.json", json.dumps([ROWS[0]]))
    _write(tmp_path / "README.md", "# not data")
    _write(tmp_path / ".hidden.jsonl", json.dumps(ROWS[2]) + "\n")
    a, b = str(tmp_path / "a.json"), str(tmp_path / "b.jsonl")
    assert data_files(str(tmp_path)) == [a, b]
    assert list(iter_records(str(tmp_path))) == [(f"{a}[0]", ROWS[0]), (f"{b}:1", ROWS[1])]


def test_reading_is_lazy(tmp_path):
    f = _write(tmp_path / "d.jsonl", json.dumps(ROWS[0]) + "\n{broken\n")
    records = iter_records(f)
    assert next(records) == (f"{f}:1", ROWS[0])  # the bad line 2 is not read yet


# ----------------------------------------------------------------------------------------------- record problems


def test_invalid_json_line_raises_with_line_number(tmp_path):
    f = _write(tmp_path / "d.jsonl", json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + '\n{"instruction": "x",}\n')
    assert _error(f) == f"{f}:3: invalid JSON: Expecting property name enclosed in double quotes at column 21."


def test_on_error_collects_bad_records_and_goes_on(tmp_path):
    f = _write(tmp_path / "d.jsonl", json.dumps(ROWS[0]) + '\n[1, 2]\n"text"\n{"a": }\n' + json.dumps(ROWS[1]) + "\n")
    records, bad = _collect(f)
    assert records == [(f"{f}:1", ROWS[0]), (f"{f}:5", ROWS[1])]
    assert bad == [
        InvalidRecord(f"{f}:2", "the record is a list, not a JSON object"),
        InvalidRecord(f"{f}:3", "the record is text, not a JSON object"),
        InvalidRecord(f"{f}:4", "invalid JSON: Expecting value at column 7"),
    ]


def test_truncated_jsonl_last_line(tmp_path):
    f = _write(tmp_path / "d.jsonl", json.dumps(ROWS[0]) + '\n{"instruction": "cut he')
    records, bad = _collect(f)
    assert records == [(f"{f}:1", ROWS[0])]
    assert bad == [InvalidRecord(f"{f}:2", "invalid JSON: the line ends before the record is complete; "
                                           "the file looks truncated")]


def test_record_split_over_lines(tmp_path):
    f = _write(tmp_path / "d.jsonl", '{"instruction": "a",\n"output": "b"}\n')
    _, bad = _collect(f)
    assert bad[0] == InvalidRecord(f"{f}:1", "invalid JSON: the line ends before the record is complete "
                                             "(is a record split over several lines?)")


def test_non_object_in_json_array(tmp_path):
    f = _write(tmp_path / "d.json", json.dumps([ROWS[0], "oops", None]))
    records, bad = _collect(f)
    assert records == [(f"{f}[0]", ROWS[0])]
    assert bad == [InvalidRecord(f"{f}[1]", "the record is text, not a JSON object"),
                   InvalidRecord(f"{f}[2]", "the record is null, not a JSON object")]
    assert _error(f) == f"{f}[1]: the record is text, not a JSON object."


def test_csv_row_with_wrong_field_count(tmp_path):
    f = _write(tmp_path / "d.csv", "instruction,output\na,b\nc,d,e\n")
    records, bad = _collect(f)
    assert records == [(f"{f}:row 1", {"instruction": "a", "output": "b"})]
    assert bad == [InvalidRecord(f"{f}:row 2", "the row has 3 fields but the header has 2")]


# ----------------------------------------------------------------------------------------------- file problems


def test_gbk_bytes_in_jsonl(tmp_path):
    gbk = json.dumps({"instruction": "你好", "output": "世界"}, ensure_ascii=False).encode("gbk")
    f = _write(tmp_path / "d.jsonl", json.dumps(ROWS[0]).encode() + b"\n" + gbk + b"\n")
    message = _error(f)
    assert message.startswith(f"{f}:2: the text is not valid UTF-8 (byte 0xc4 at byte 18 of the line)")
    assert "it looks like GBK/GB18030. Re-save the file as UTF-8" in message
    with pytest.raises(DataError, match="looks like GBK"):  # a file problem: on_error does not skip it
        _collect(f)


def test_gbk_bytes_in_json_array_give_the_line(tmp_path):
    text = json.dumps([ROWS[0], {"instruction": "中文", "output": "x"}], ensure_ascii=False, indent=1)
    f = _write(tmp_path / "d.json", text.encode("gb18030"))
    message = _error(f)
    assert message.startswith(f"{f}:7: the text is not valid UTF-8")
    assert "looks like GBK/GB18030" in message


def test_other_non_utf8_bytes(tmp_path):
    f = _write(tmp_path / "d.txt", b"caf\xe9 au lait\n")
    assert _error(f) == (f"{f}:1: the text is not valid UTF-8 (byte 0xe9 at byte 4 of the line). "
                         "Re-save the file as UTF-8.")


@pytest.mark.parametrize("name, content", [
    ("d.jsonl", ""), ("d.jsonl", "\n  \n"), ("d.json", ""), ("d.json", "[]"), ("d.csv", "instruction,output\n"),
    ("d.txt", "\n"), ("d.jsonl", "\ufeff"),
])
def test_empty_files(tmp_path, name, content):
    f = _write(tmp_path / name, content)
    assert _error(f) == f"{f} is empty: it contains no records."


def test_empty_parquet(tmp_path):
    f = str(tmp_path / "d.parquet")
    pq.write_table(pa.table({"instruction": pa.array([], pa.string())}), f)
    assert _error(f) == f"{f} is empty: it contains no records."


def test_missing_file(tmp_path):
    f = str(tmp_path / "nope.jsonl")
    assert _error(f) == f"Dataset file {f} does not exist."


def test_unsupported_extension(tmp_path):
    f = _write(tmp_path / "d.xlsx", "x")
    assert _error(f) == (f"{f} has an unsupported file type (.xlsx); "
                         "supported: .json, .jsonl, .csv, .parquet, .arrow, .txt.")


def test_truncated_json_array(tmp_path):
    text = json.dumps(ROWS, indent=1)[:-30]
    f = _write(tmp_path / "d.json", text)
    last = text.count("\n") + 1
    assert _error(f).startswith(f"{f}:{last}: invalid JSON: the file ends before the JSON is complete")
    assert _error(f).endswith("it looks truncated.")


def test_broken_json_array(tmp_path):
    f = _write(tmp_path / "d.json", '[\n {"a": 1}\n {"a": 2}\n]')
    assert _error(f) == f"{f}:3: invalid JSON: Expecting ',' delimiter at line 3, column 2."


def test_single_json_object_file(tmp_path):
    f = _write(tmp_path / "d.json", '{\n "data": []\n}')
    assert _error(f).startswith(f"{f} holds a single JSON object, not a list of records")


def test_truncated_parquet(tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), str(good))
    f = _write(tmp_path / "d.parquet", good.read_bytes()[:-20])
    message = _error(f)
    assert message.startswith(f"{f} cannot be read as Parquet (")
    assert message.endswith("it may be truncated or not a Parquet file.")


def test_not_an_arrow_file(tmp_path):
    f = _write(tmp_path / "d.arrow", b"this is not arrow data")
    assert _error(f).startswith(f"{f} cannot be read as Arrow (")


def test_folder_problems(tmp_path):
    (tmp_path / "empty").mkdir()
    assert _error(str(tmp_path / "empty")).startswith(f"Folder {tmp_path / 'empty'} has no data files")
    (tmp_path / "dd").mkdir()
    _write(tmp_path / "dd" / "dataset_dict.json", '{"splits": ["train"]}')
    assert "holds several splits" in _error(str(tmp_path / "dd"))
