"""Parsing PartiPrompts: tabs only, no quoting convention, prompts byte-exact."""

from __future__ import annotations

import csv
import io

import pytest

from fewstep import UserError
from producer.sources.partiprompts import PartiPrompts, parse


def test_whole_real_file_parses_exactly(parti_path):
    data = parti_path.read_bytes()
    columns = parse(data, "PartiPrompts.tsv")
    # Reference: split on newlines and tabs only.
    lines = data.decode("utf-8").split("\n")[1:-1]
    assert len(columns["prompt"]) == len(lines) == 1632
    assert columns["prompt"] == [line.split("\t")[0] for line in lines]
    assert len(set(columns["category"])) == 12
    assert len(set(columns["challenge"])) == 11
    assert columns["source_row"] == list(range(1632))
    assert sum('"' in line for line in lines) == 28
    assert sum(p.startswith('"') for p in columns["prompt"]) == 1
    # The trap this parser avoids: csv's default quoting corrupts those rows.
    naive = [row[0] for row in csv.reader(io.StringIO(data.decode("utf-8")), delimiter="\t")][1:]
    assert naive != columns["prompt"]
    assert any(p != p.strip() for p in columns["prompt"])  # surrounding spaces kept


def test_source_yields_one_batch_with_declared_fields(parti_path):
    source = PartiPrompts(str(parti_path))
    (batch,) = list(source.batches())
    assert batch.num_rows == 1632
    assert batch.schema.names == ["source_row", "prompt", "category", "challenge", "note"]
    assert source.describe()["fields"] == {"category": "string", "challenge": "string", "note": "string"}


def test_crlf_line_endings_do_not_leak_into_fields():
    data = b'Prompt\tCategory\tChallenge\tNote\r\n"quoted" start\tArts\tBasic\tn\r\nb \tArts \tBasic\t\r\n'
    columns = parse(data, "x.tsv")
    assert columns["prompt"] == ['"quoted" start', "b "]
    assert columns["category"] == ["Arts", "Arts "]
    assert columns["note"] == ["n", ""]


def test_columns_found_by_name_in_any_order():
    columns = parse(b"Note\tPrompt\tChallenge\tCategory\nn\tp\tc\tk\n", "x.tsv")
    assert (columns["prompt"], columns["category"], columns["note"]) == (["p"], ["k"], ["n"])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"Prompt\tCategory\nx\ty\n", "missing column(s) Challenge, Note"),
        (b"Prompt\tCategory\tChallenge\tNote\na\tb\tc\n", "line 2 has 3 tab-separated fields, expected 4"),
        (b"Prompt\tCategory\tChallenge\tNote\na\tb\tc\td\n\xff\tb\tc\td\n", "line 3 is not valid UTF-8"),
        (b"", "empty file"),
    ],
)
def test_malformed_files_name_the_problem(data, message):
    with pytest.raises(UserError, match="x.tsv: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        parse(data, "x.tsv")
