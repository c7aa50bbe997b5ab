"""Prompt sets. Each source yields Arrow record batches with the columns
``source_row`` (int64, the row's position in the source), ``prompt`` (string) and the
source's own fields, declared in :attr:`PromptSource.fields`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa


class PromptSource:
    """A prompt set the producer can shard."""

    #: Registered name, used in the CLI (``producer enqueue NAME``) and the metadata.
    name: str = ""
    #: Source fields carried into the metadata: column name → type name (contract.FIELD_TYPES).
    fields: dict[str, str] = {}  # noqa: RUF012 - overridden per instance

    def batches(self) -> Iterator[pa.RecordBatch]:
        """The prompts, in source order, as record batches."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What goes into the job spec's ``source`` block (no credentials)."""
        raise NotImplementedError
