"""Source columns carried into the metadata as fields: their names and types.

Names: a column keeps its name when it is a plain identifier the metadata does not use;
a nested JSON field or parquet struct member is addressed by its dot path
(``Task2.Caption``); other characters become ``_``; a name the metadata already uses
(``seed``, ``width``, ``prompt`` …) gets a ``source_`` prefix. Types are those of
``fewstep.contract.FIELD_TYPES``: text, integers, floats, booleans, timestamps and lists
of text keep their type; any other value (a list of numbers, a list of objects, a map)
is carried as its JSON text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from fewstep import UserError
from fewstep.contract import FIELD_TYPES, RESERVED_NAMES

#: Carried as a string column holding the value's JSON text.
JSON = "json"
MAX_FIELDS = 256


class Skips:
    """Rows (or values) left out, counted, with the first few reasons for the report."""

    def __init__(self) -> None:
        self.count = 0
        self.examples: list[str] = []

    def add(self, reason: str, n: int = 1) -> None:
        self.count += n
        if len(self.examples) < 5:
            self.examples.append(reason)


def field_names(columns: Iterable[str]) -> dict[str, str]:
    """Metadata field names for source columns (column → field), unique and safe in a schema."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for column in columns:
        name = re.sub(r"[^A-Za-z0-9_.]", "_", column)[:120] or "_"
        if not re.match(r"[A-Za-z_]", name):
            name = "_" + name
        if name in RESERVED_NAMES:
            name = "source_" + name
        base, i = name, 2
        while name in taken or name in RESERVED_NAMES:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        names[column] = name
    if len(names) > MAX_FIELDS:
        raise UserError(
            f"the source has {len(names)} columns besides the prompt; at most {MAX_FIELDS} can be "
            "carried: choose them with --carry"
        )
    return names


def select_columns(available: list[str], carry: tuple[str, ...] | None, label: str) -> list[str]:
    """The columns to carry: all of ``available``, or those named by ``--carry`` (checked)."""
    if carry is None:
        return available
    missing = [c for c in carry if c not in available]
    if missing:
        raise UserError(
            f"{label}: --carry names unknown column(s) {', '.join(missing)} "
            f"(columns: {', '.join(available) or 'none'})"
        )
    return [c for c in available if c in carry]


def declared(kinds: dict[str, str]) -> dict[str, str]:
    """The declared field types (JSON text is a string column)."""
    return {name: "string" if kind == JSON else kind for name, kind in kinds.items()}


# --- Arrow columns (parquet) ------------------------------------------------------------------


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def arrow_kind(t: pa.DataType) -> str | None:
    """How an Arrow column is carried (a FIELD_TYPES name or JSON), or None when it is not."""
    if pa.types.is_dictionary(t):
        return arrow_kind(t.value_type)
    if _is_text(t):
        return "string"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_integer(t):
        return "int64"
    if pa.types.is_float16(t) or pa.types.is_float32(t):
        return "float32"
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "float64"
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return "timestamp"
    if (pa.types.is_list(t) or pa.types.is_large_list(t)) and _is_text(t.value_type):
        return "list<string>"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return None
    if pa.types.is_null(t):
        return None
    return JSON


def arrow_field(array: pa.Array | pa.ChunkedArray, kind: str) -> pa.Array:
    """An Arrow column converted to how it is carried."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if kind == JSON:
        return pa.array([None if v is None else json.dumps(v, default=str) for v in array.to_pylist()])
    if kind == "timestamp" and pa.types.is_timestamp(array.type) and array.type.tz is None:
        array = pc.cast(array, pa.timestamp("us"))  # naive times are taken as UTC
    return pc.cast(array, FIELD_TYPES[kind])


# --- JSON values (json, jsonl) ----------------------------------------------------------------


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested objects become dot paths: ``{"Task2": {"Caption": c}}`` → ``{"Task2.Caption": c}``."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def json_kind(value: Any) -> str | None:
    """The kind of one JSON value; None for null."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int64" if -(2**63) <= value < 2**63 else JSON
    if isinstance(value, float):
        return "float64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "list<string>"
    return JSON


def merge_kinds(a: str | None, b: str | None) -> str | None:
    """The kind that holds values of kinds ``a`` and ``b``."""
    if a is None or a == b:
        return b
    if b is None:
        return a
    if {a, b} == {"int64", "float64"}:
        return "float64"
    if "string" in (a, b):
        return "string"  # text stays text; the odd other value is carried as its JSON
    return JSON


def _convert(value: Any, kind: str) -> tuple[Any, bool]:
    """The value as ``kind`` and whether it fit (a value that does not fit becomes null)."""
    if value is None:
        return None, True
    if kind == JSON:
        return json.dumps(value, ensure_ascii=False), True
    if kind == "string":
        return (value, True) if isinstance(value, str) else (json.dumps(value, ensure_ascii=False), True)
    if isinstance(value, bool):
        return (value, True) if kind == "bool" else (None, False)
    if kind == "int64":
        if isinstance(value, int) and -(2**63) <= value < 2**63:
            return value, True
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
            return int(value), True
        return None, False
    if kind == "float64":
        return (float(value), True) if isinstance(value, int | float) else (None, False)
    if kind == "list<string>":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return (value, True) if ok else (None, False)
    return None, False


def json_field(values: list[Any], kind: str, on_misfit) -> pa.Array:
    """One field's values as an Arrow array; ``on_misfit(i)`` is told of each value left null."""
    if kind == "string":
        try:  # the common case, all text: Arrow converts it without a Python loop
            return pa.array(values, pa.string())
        except (pa.ArrowTypeError, pa.ArrowInvalid):
            pass  # some value is not text: it becomes its JSON below
    out = []
    for i, value in enumerate(values):
        converted, fits = _convert(value, kind)
        if not fits:
            on_misfit(i)
        out.append(converted)
    return pa.array(out, type=FIELD_TYPES["string" if kind == JSON else kind])
