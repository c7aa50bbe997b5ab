"""Prompt sets. Each source yields Arrow record batches with the columns ``source_row``
(int64, the row's position in the source), ``prompt`` (string), the source's own fields
declared in :attr:`PromptSource.fields`, and, when the source's own seeds are kept, a
``seed`` column (uint32; null where the source has none).

One module per source: ``partiprompts``, ``diffusiondb``, ``journeydb`` and ``file`` (any
txt, csv, tsv, json, jsonl or parquet file, read by ``formats``), all reading through
``location`` (local paths, ``s3://``, ``hf://``, ``https://``).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from typing import Any

import pyarrow as pa

from fewstep import UserError
from producer.sources.fields import Skips


class PromptSource:
    """A prompt set the producer can shard."""

    #: Registered name, used in the CLI (``producer enqueue NAME``) and the metadata.
    name: str = ""
    #: Source fields carried into the metadata: column name → type name (contract.FIELD_TYPES).
    fields: dict[str, str]
    #: Rows known up front (parquet metadata), for the progress display; None when unknown.
    total_rows: int | None = None

    def __init__(self) -> None:
        self.fields = {}

    @cached_property
    def invalid(self) -> Skips:
        """Rows the source could not use (counted as skipped_invalid), with example reasons."""
        return Skips()

    @cached_property
    def misfits(self) -> Skips:
        """Field values left null because they did not fit the field's type."""
        return Skips()

    def batches(self) -> Iterator[pa.RecordBatch]:
        """The prompts, in source order, as record batches."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What goes into the job spec's ``source`` block (no credentials)."""
        raise NotImplementedError

    def image_values(self, column: str) -> str:
        """The batch column holding the conditioning image named by source column ``column``
        (``--image-column``): a text field (a path or URL per row; it is carried as a field
        too). A :class:`UserError` when the source has no such column."""
        renames = getattr(self, "renames", {})
        name = column if column in self.fields else renames.get(column, column)
        if self.fields.get(name) != "string":
            text = sorted(n for n, kind in self.fields.items() if kind == "string")
            raise UserError(
                f"--image-column {column!r}: the source has no text column of that name "
                f"(text columns: {', '.join(text) or 'none'})"
            )
        return name
