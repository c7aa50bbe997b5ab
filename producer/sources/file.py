"""Any prompt file: ``producer enqueue file PATH [--format F] [--column NAME]``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from fewstep import UserError
from producer.sources import PromptSource
from producer.sources.formats import FORMATS, archive_mode, infer_format, open_reader
from producer.sources.location import base_name, display_name


class PromptFile(PromptSource):
    """A txt, csv, tsv, json, jsonl or parquet file; the format comes from the name unless given."""

    name = "file"

    def __init__(
        self,
        path: str,
        fmt: str | None = None,
        column: str | None = None,
        carry: tuple[str, ...] | None = None,
    ):
        super().__init__()
        self.path = path
        self.format = fmt or (None if archive_mode(path) else infer_format(path))
        if self.format is None:
            raise UserError(
                f"cannot tell the format of {base_name(path) or path} from its name: "
                f"pass --format ({'|'.join(FORMATS)})"
            )
        self.reader = open_reader(path, self.format, column=column, carry=carry)
        self.fields = self.reader.fields
        self.invalid = self.reader.invalid
        self.misfits = self.reader.misfits
        self.total_rows = self.reader.total_rows

    def batches(self) -> Iterator[pa.RecordBatch]:
        return self.reader.batches()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": display_name(self.path),
            "format": self.format,
            **self.reader.describe(),
        }
