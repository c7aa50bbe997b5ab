"""Reading prompt files: each format with its quirks, byte-exact prompts, clear errors."""

from __future__ import annotations

import gzip
import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fewstep import UserError
from fewstep.contract import check_fields
from producer.sources.formats import open_file
from tests.prompt_files import JOURNEYDB_RECORDS, journeydb_lines


def rows(source) -> list[dict]:
    return pa.Table.from_batches(list(source.batches())).to_pylist()


def test_txt_lines_end_at_lf_or_crlf_and_the_last_needs_no_newline(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"\xef\xbb\xbfa cat\r\n\r\n  two  spaces kept \nlast line")
    got = rows(open_file(str(path)))
    assert [r["prompt"] for r in got] == ["a cat", "", "  two  spaces kept ", "last line"]
    assert [r["source_row"] for r in got] == [0, 1, 2, 3]
    path.write_bytes(b"one\ntwo\n")
    assert [r["prompt"] for r in rows(open_file(str(path)))] == ["one", "two"]  # no phantom last line


def test_txt_keeps_other_unicode_line_separators_inside_prompts(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a\u2028b\x0bc\nnext\n", encoding="utf-8")
    assert [r["prompt"] for r in rows(open_file(str(path)))] == ["a\u2028b\x0bc", "next"]


def test_csv_quoted_fields_with_commas_quotes_and_newlines_stay_byte_exact(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(
        b'prompt,score,note\r\n"a, ""quoted""\r\nprompt",0.5," x "\r\nplain,2,\r\n"  spaced  ",3,n\r\n'
    )
    source = open_file(str(path))
    assert source.fields == {"score": "string", "note": "string"}
    got = rows(source)
    assert [r["prompt"] for r in got] == ['a, "quoted"\r\nprompt', "plain", "  spaced  "]
    assert [r["note"] for r in got] == [" x ", "", "n"]
    assert [r["source_row"] for r in got] == [0, 1, 2]


def test_csv_row_with_wrong_cell_count_is_skipped_and_counted(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,a\nok,1\nbad,1,2\nfine,3\n")
    source = open_file(str(path))
    assert [r["prompt"] for r in rows(source)] == ["ok", "fine"]
    assert source.invalid.count == 1
    assert "p.csv" in source.invalid.examples[0] and "3 fields, expected 2" in source.invalid.examples[0]


def test_tsv_has_no_quoting_convention(tmp_path):
    path = tmp_path / "p.tsv"
    path.write_bytes(b'Prompt\tCategory\n"quoted" start\tArts \nsay "hi"\tPeople\n')
    got = rows(open_file(str(path)))
    assert [r["prompt"] for r in got] == ['"quoted" start', 'say "hi"']
    assert [r["Category"] for r in got] == ["Arts ", "People"]


def test_json_list_of_strings(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(["a cat", "", "a dog"]))
    got = rows(open_file(str(path)))
    assert [(r["source_row"], r["prompt"]) for r in got] == [(0, "a cat"), (1, ""), (2, "a dog")]


def test_jsonl_nested_fields_by_dot_path(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_bytes(journeydb_lines())
    source = open_file(str(path), column="Task2.Caption")
    assert source.fields == {
        "img_path": "string",
        "source_prompt": "string",  # "prompt" is a metadata column: the source's is prefixed
        "Task1.Style": "list<string>",
        "Task1.Content": "list<string>",
        "Task1.Atmosphere": "list<string>",
        "Task1.Others": "list<string>",
    }
    check_fields(source.fields)
    got = rows(source)
    assert [r["prompt"] for r in got] == [r["Task2"]["Caption"] for r in JOURNEYDB_RECORDS]
    assert got[1]["Task1.Atmosphere"] == ["calm"] and got[0]["source_prompt"].startswith("a castle")


def test_jsonl_odd_values_are_carried_as_json_and_bad_rows_counted(tmp_path):
    path = tmp_path / "j.jsonl"
    lines = [
        {"prompt": "a", "scores": [1, 2], "meta": {"k": [{"x": 1}]}, "n": 1},
        {"prompt": "b", "scores": [3], "meta": {"k": []}, "n": 2.5},
        {"prompt": 7, "n": 1},
        ["not", "an", "object"],
        {"prompt": "c", "n": "many"},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    source = open_file(str(path))
    assert source.fields == {"scores": "string", "meta.k": "string", "n": "string"}
    got = rows(source)
    assert [r["prompt"] for r in got] == ["a", "b", "c"]
    assert [r["scores"] for r in got] == ["[1, 2]", "[3]", None]
    assert [r["meta.k"] for r in got] == ['[{"x": 1}]', "[]", None]
    assert [r["n"] for r in got] == ["1", "2.5", "many"]  # text stays text, the numbers become JSON
    assert source.invalid.count == 2  # a number prompt, a list record
    assert any("line 3" in e for e in source.invalid.examples)


def test_jsonl_fields_are_typed_from_the_first_records_later_misfits_left_null(tmp_path):
    path = tmp_path / "j.jsonl"
    lines = [{"prompt": f"p{i}", "n": i} for i in range(1000)]
    lines += [{"prompt": "late", "n": "many", "new": 1}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    source = open_file(str(path))
    assert source.fields == {"n": "int64"}
    got = rows(source)
    assert got[-1] == {"source_row": 1000, "prompt": "late", "n": None}
    assert source.misfits.count == 2
    notes = " | ".join(source.misfits.examples)
    assert "j.jsonl: line 1001: field 'n' does not fit type int64; left null" in notes
    assert "field 'new' first appears after the first 1,000 records" in notes


def test_parquet_struct_members_by_dot_path_and_only_needed_columns(tmp_path):
    path = tmp_path / "p.parquet"
    table = pa.table(
        {
            "text": ["a", "b"],
            "info": pa.array([{"score": 1.5, "tags": ["x"]}, {"score": None, "tags": []}]),
            "blob": pa.array([b"\x00", b"\x01"]),
            "seed": pa.array([1, 2], pa.int32()),
        }
    )
    pq.write_table(table, path)
    source = open_file(str(path), column="text")
    assert source.fields == {"info.score": "float64", "info.tags": "list<string>", "source_seed": "int64"}
    assert source.describe()["not_carried"] == ["blob"]
    got = rows(source)
    assert [(r["prompt"], r["info.score"], r["source_seed"]) for r in got] == [("a", 1.5, 1), ("b", None, 2)]
    assert rows(open_file(str(path), column="text", carry=("info.tags",)))[0].keys() == {
        "source_row", "prompt", "info.tags",
    }  # fmt: skip


def test_compressed_and_archived_files_are_read_without_unpacking(tmp_path):
    gz = tmp_path / "p.jsonl.gz"
    gz.write_bytes(gzip.compress(journeydb_lines()))
    assert len(rows(open_file(str(gz)))) == 3
    archive = tmp_path / "p.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in [("a/one.txt", b"x\ny\n"), ("._one.txt", b"junk"), ("b/two.txt", b"z")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    got = rows(open_file(str(archive), "txt"))
    assert [(r["source_row"], r["prompt"]) for r in got] == [(0, "x"), (1, "y"), (2, "z")]


def test_names_that_clash_or_are_not_identifiers_are_made_safe(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,seed,width,../x,a b,1st\nhello,1,2,3,4,5\n")
    source = open_file(str(path))
    assert list(source.fields) == ["source_seed", "source_width", "_.._x", "a_b", "_1st"]
    check_fields(source.fields)
    assert source.describe()["renamed"]["../x"] == "_.._x"


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("p.jsonl", b'{"prompt": "a"}\n{"prompt": "b",}\n', r"p\.jsonl: line 2 is not valid JSON"),
        ("p.txt", b"ok\nfine\nbad \xff byte\n", r"p\.txt: line 3 is not valid UTF-8"),
        ("p.jsonl", b'{"prompt": "a"}\n{"prompt": "\xe9"}\n', r"p\.jsonl: line 2 is not valid UTF-8"),
        ("p.csv", b"prompt,x\nok,1\nbad\xff,2\n", r"p\.csv: data row 2, column 'prompt', is not valid UTF-8"),
        ("p.csv", b"text,x\na,1\n", r"p\.csv: which column holds the prompts\? pass --column"),
        ("p.json", b'{"prompt": "a"}', r"p\.json: expected a JSON list"),
        ("p.parquet", b"PAR1 this is not parquet", r"p\.parquet: not a readable parquet file"),
        ("p.dat", b"x", r"cannot tell the format of p\.dat from its name: pass --format"),
    ],
)
def test_bad_files_give_one_line_naming_file_and_line(tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(UserError, match=message) as error:
        list(open_file(str(path)).batches())
    assert "\n" not in str(error.value)


def test_truncated_parquet_names_the_file(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"prompt": [f"prompt {i}" * 20 for i in range(5000)]}), path, row_group_size=1000)
    path.write_bytes(path.read_bytes()[:-3000])
    with pytest.raises(UserError, match=r"t\.parquet: not a readable parquet file"):
        open_file(str(path))


def test_damaged_parquet_data_names_the_rows(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(
        pa.table({"prompt": [f"prompt {i} " * 5 for i in range(20_000)]}), path, row_group_size=5000
    )
    offset = pq.ParquetFile(path).metadata.row_group(2).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset + 50 : offset + 2000] = b"\xff" * 1950
    path.write_bytes(bytes(data))
    with pytest.raises(
        UserError, match=r"d\.parquet: rows 0 to 65,535 are unreadable \(damaged\?\)"
    ) as error:
        list(open_file(str(path)).batches())
    assert "\n" not in str(error.value)


def test_a_prompt_column_that_is_not_text_is_refused(tmp_path):
    path = tmp_path / "n.parquet"
    pq.write_table(pa.table({"prompt": [1, 2]}), path)
    with pytest.raises(UserError, match=r"n\.parquet: column 'prompt' has type int64, expected text"):
        open_file(str(path))
