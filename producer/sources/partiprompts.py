"""PartiPrompts: a TSV with header ``Prompt	Category	Challenge	Note``.

Tab-separated with no quoting convention: one prompt starts with ``"`` and 28 contain
quotes, so the file is split on tabs and newlines only (``csv`` would corrupt them).
Prompts are kept byte-exact: no strip, no normalisation.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from fewstep import UserError
from fewstep.settings import load_config, redact_url
from producer.sources import PromptSource
from producer.sources.location import is_url, read_bytes

COLUMNS = {"Prompt": "prompt", "Category": "category", "Challenge": "challenge", "Note": "note"}


def parse(data: bytes, name: str) -> dict[str, list]:
    """Columns of a PartiPrompts file: source_row, prompt, category, challenge, note."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{name}: line {line} is not valid UTF-8") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    # A CRLF file: the "\r" is part of the line ending, not of the last column.
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    if not lines:
        raise UserError(f"{name}: empty file, expected a header Prompt<TAB>Category<TAB>Challenge<TAB>Note")
    header = lines[0].split("\t")
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise UserError(
            f"{name}: missing column(s) {', '.join(missing)} in header (found {', '.join(header)}); "
            "expected tab-separated Prompt, Category, Challenge, Note"
        )
    index = {COLUMNS[c]: header.index(c) for c in COLUMNS}
    columns: dict[str, list] = {"source_row": [], **{v: [] for v in COLUMNS.values()}}
    for number, line in enumerate(lines[1:], start=2):
        cells = line.split("\t")
        if len(cells) != len(header):
            raise UserError(
                f"{name}: line {number} has {len(cells)} tab-separated fields, expected {len(header)}"
            )
        columns["source_row"].append(number - 2)
        for key, i in index.items():
            columns[key].append(cells[i])
    return columns


class PartiPrompts(PromptSource):
    name = "partiprompts"

    def __init__(self, path: str | None = None):
        super().__init__()
        self.location = path or load_config("datasets")["partiprompts"]["url"]
        self.fields = {"category": "string", "challenge": "string", "note": "string"}

    def batches(self) -> Iterator[pa.RecordBatch]:
        label = redact_url(self.location) if is_url(self.location) else self.location
        columns = parse(read_bytes(self.location, what="PartiPrompts"), label)
        yield pa.RecordBatch.from_pydict(
            columns,
            schema=pa.schema(
                [("source_row", pa.int64()), ("prompt", pa.string())]
                + [(f, pa.string()) for f in self.fields]
            ),
        )

    def describe(self) -> dict[str, Any]:
        location = redact_url(self.location) if is_url(self.location) else os.path.abspath(self.location)
        return {"name": self.name, "path": location, "fields": self.fields}
