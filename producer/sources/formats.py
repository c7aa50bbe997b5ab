"""Prompt files in common formats, read as a stream of Arrow batches.

=========  ==========================================  ==========================================
format     the prompt                                  the other columns (carried as fields)
=========  ==========================================  ==========================================
txt        one prompt a line (LF or CRLF)              none
csv        a column; RFC 4180 quoting: commas,         every other column, as text
           quotes and newlines inside quoted fields
tsv        a column; tabs separate, no quoting         every other column, as text
json       a list of strings, or of objects            object fields; nested objects as dot paths
jsonl      one string or object a line                 as json
parquet    a text column                               typed; struct members as dot paths
=========  ==========================================  ==========================================

Compressed files (``.gz``, ``.bz2``, ``.zst``) are decompressed as they are read; a tar
archive (``.tar``, ``.tgz``, ``.tar.gz``, ``.tar.bz2``, ``.tar.xz``) is read member by
member, without extracting anything to disk. Prompts are kept byte-exact. Every batch
has ``source_row`` (the row's position in the file: the line for txt and jsonl, the
item for json, the data row for csv, tsv and parquet), ``prompt`` and the fields.
JSON fields are those seen in the first 1,000 records. A JSON list is parsed whole (twice:
once for its fields); large sets belong in JSON Lines, which streams.
"""

from __future__ import annotations

import json
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from fewstep import UserError
from fewstep.contract import FIELD_TYPES
from producer.image_refs import VALUES_COLUMN
from producer.sources import PromptSource
from producer.sources.fields import (
    JSON,
    arrow_field,
    arrow_kind,
    declared,
    field_names,
    flatten,
    json_field,
    json_kind,
    merge_kinds,
    select_columns,
)
from producer.sources.location import PIECE, base_name, display_name, is_remote, open_binary, open_seekable

FORMATS = ("txt", "csv", "tsv", "json", "jsonl", "parquet")
EXTENSIONS = {
    ".txt": "txt",
    ".text": "txt",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd"}
ARCHIVES = {".tar": "r|", ".tgz": "r|gz", ".tar.gz": "r|gz", ".tar.bz2": "r|bz2", ".tar.xz": "r|xz"}
BATCH_ROWS = 65_536
# Rows per batch of a parquet whose image column holds the images themselves.
IMAGE_BATCH_ROWS = 256
# Each column chunk is read in pieces this large: memory stays flat whatever the row group size.
PARQUET_PIECE = 2 << 20
SAMPLE_RECORDS = 1_000
_READ_ERRORS = (OSError, EOFError, tarfile.TarError, zlib.error)


def _suffix(name: str, table: dict[str, str]) -> tuple[str, str] | None:
    for suffix in sorted(table, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix, table[suffix]
    return None


def archive_mode(location: str) -> str | None:
    """The tarfile mode for an archive location, None for a plain file."""
    found = _suffix(base_name(location).lower(), ARCHIVES)
    return found[1] if found else None


def infer_format(location: str) -> str | None:
    """The format a file name says (``prompts.csv.gz`` → csv), None when it says none."""
    name = base_name(location).lower()
    compressed = _suffix(name, COMPRESSIONS)
    if compressed:
        name = name[: -len(compressed[0])]
    found = _suffix(name, EXTENSIONS)
    return found[1] if found else None


def _decompressed(stream: BinaryIO, name: str) -> BinaryIO:
    compressed = _suffix(name.lower(), COMPRESSIONS)
    return pa.CompressedInputStream(stream, compressed[1]) if compressed else stream


@contextmanager
def _members(location: str, fmt: str, label: str):
    """(label, stream) of each file of format ``fmt``: the file itself or an archive's members."""
    mode = archive_mode(location)
    with open_binary(location) as raw:
        if mode is None:
            yield iter([(label, _decompressed(raw, base_name(location)))])
            return
        try:
            with tarfile.open(fileobj=raw, mode=mode) as tar:
                yield _archive_members(tar, fmt, label)
        except _READ_ERRORS as e:
            raise UserError(f"{label}: damaged archive ({one_line(e)})") from None


def _archive_members(tar: tarfile.TarFile, fmt: str, label: str):
    found = False
    for member in tar:
        name = member.name.rsplit("/", 1)[-1]
        if not member.isfile() or name.startswith(".") or infer_format(name) != fmt:
            continue
        found = True
        yield f"{label}:{member.name}", _decompressed(tar.extractfile(member), name)
    if not found:
        raise UserError(f"{label}: the archive holds no .{fmt} file")


def one_line(error: Exception) -> str:
    """An error's message on one line (Arrow's can span several)."""
    return " ".join(str(error).split())


def _read(stream: BinaryIO, label: str, size: int = PIECE) -> bytes:
    try:
        return stream.read(size)
    except _READ_ERRORS as e:
        raise UserError(f"{label}: cannot read ({one_line(e)})") from None


def _decode(block: bytes, label: str, first_line: int) -> str:
    try:
        return block.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + block[: e.start].count(b"\n") + 1
        raise UserError(f"{label}: line {line} is not valid UTF-8 (byte {block[e.start]:#04x})") from None


def text_lines(stream: BinaryIO, label: str) -> Iterator[tuple[int, list[str]]]:
    """The lines of a UTF-8 text stream in blocks: (index of the block's first line, lines).

    Lines end at LF or CRLF; a last line without a newline counts; a leading BOM is dropped.
    """
    line, rest, first = 0, b"", True
    while chunk := _read(stream, label):
        data = rest + chunk
        if first:
            data, first = data.removeprefix(b"\xef\xbb\xbf"), False
        cut = data.rfind(b"\n")
        if cut < 0:
            rest = data
            continue
        block, rest = data[:cut], data[cut + 1 :]
        text = _decode(block, label, line)
        lines = text.split("\n")
        if "\r" in text:
            lines = [s[:-1] if s.endswith("\r") else s for s in lines]
        yield line, lines
        line += len(lines)
    if rest:
        yield line, [_decode(rest, label, line).removesuffix("\r")]


def _numbered_lines(location: str, fmt: str, label: str) -> Iterator[tuple[str, int, int, list[str]]]:
    """The lines of a text file, or of each of an archive's members, in blocks: (the member's
    label, the source row of the block's first line, its index in the member, the lines).
    Source rows run on from one member to the next."""
    offset = 0
    with _members(location, fmt, label) as members:
        for member, stream in members:
            count = 0
            for first, lines in text_lines(stream, member):
                yield member, offset + first, first, lines
                count = first + len(lines)
            offset += count


class Reader(PromptSource):
    """One prompt file in one format: ``producer enqueue file``.

    ``invalid`` counts rows the reader could not use (a CSV row with the wrong number of
    cells, a JSON value of the wrong kind); ``misfits`` values left null because they did
    not fit their field's type.
    """

    name = "file"

    def __init__(self, location: str, label: str, fmt: str):
        super().__init__()
        self.location = location
        self.label = label
        self.format = fmt

    def describe(self) -> dict[str, Any]:
        where = {"name": self.name, "path": display_name(self.location), "format": self.format}
        return {**where, **self._read_as()}

    def _read_as(self) -> dict[str, Any]:
        """How the file is read: the prompt column, renamed and JSON fields, the fields."""
        return {"fields": self.fields}

    def _schema(self) -> pa.Schema:
        return pa.schema(
            [("source_row", pa.int64()), ("prompt", pa.string())]
            + [(name, FIELD_TYPES[kind]) for name, kind in self.fields.items()]
        )


def _choose_prompt(columns: list[str], column: str | None, label: str) -> str:
    """The prompt column: the one named, else one called ``prompt`` (any case), else the only one."""
    if column is not None:
        if column not in columns:
            raise UserError(f"{label}: no column {column!r} (columns: {', '.join(columns) or 'none'})")
        return column
    for name in columns:
        if name.lower() == "prompt":
            return name
    if len(columns) == 1:
        return columns[0]
    raise UserError(
        f"{label}: which column holds the prompts? pass --column (columns: {', '.join(columns) or 'none'})"
    )


# --- txt ----------------------------------------------------------------------------------------


class TxtReader(Reader):
    """One prompt a line."""

    def __init__(self, location: str, label: str, column: str | None, carry: tuple[str, ...] | None):
        super().__init__(location, label, "txt")
        if column is not None or carry:
            raise UserError(f"{label}: a txt file has one prompt a line and no columns (no --column/--carry)")

    def batches(self) -> Iterator[pa.RecordBatch]:
        for _member, row, _first, lines in _numbered_lines(self.location, "txt", self.label):
            rows = np.arange(row, row + len(lines), dtype=np.int64)
            yield pa.RecordBatch.from_arrays(
                [pa.array(rows), pa.array(lines, pa.string())], schema=self._schema()
            )


# --- csv, tsv -----------------------------------------------------------------------------------


class CsvReader(Reader):
    """CSV (RFC 4180 quoting) or TSV (tabs, no quoting); a header row names the columns."""

    def __init__(
        self, location: str, label: str, column: str | None, carry: tuple[str, ...] | None, fmt: str
    ):
        super().__init__(location, label, fmt)
        self.tsv = fmt == "tsv"
        with _members(location, fmt, label) as members:
            _member, stream = next(members)
            names = self._open(stream, None, count_bad=False).schema.names
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise UserError(f"{label}: column name(s) {', '.join(map(repr, twice))} appear more than once")
        self.column = _choose_prompt(names, column, label)
        carried = select_columns([n for n in names if n != self.column], carry, label)
        self.renames = field_names(carried)
        self.fields = {name: "string" for name in self.renames.values()}
        self.names = names

    def _open(self, stream: BinaryIO, names: list[str] | None, count_bad: bool = True):
        parse = pcsv.ParseOptions(
            delimiter="\t" if self.tsv else ",",
            quote_char=False if self.tsv else '"',
            newlines_in_values=not self.tsv,
            invalid_row_handler=self._bad_row if count_bad else (lambda _row: "skip"),
        )
        convert = pcsv.ConvertOptions(
            column_types={n: pa.string() for n in names or []},
            include_columns=[self.column, *self.renames] if names else None,
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
            check_utf8=False,  # checked per column below, to name the row
        )
        try:
            return pcsv.open_csv(
                stream, read_options=pcsv.ReadOptions(block_size=1 << 22), parse_options=parse,
                convert_options=convert,
            )  # fmt: skip
        except pa.ArrowInvalid as e:
            raise UserError(f"{self.label}: {one_line(e)}") from None
        except StopIteration:
            raise UserError(f"{self.label}: empty file, expected a header row") from None

    def _bad_row(self, row) -> str:
        text = row.text if len(row.text) <= 60 else row.text[:57] + "..."
        where = f"line {row.number}" if row.number else "a row"
        count = f"{row.actual_columns} fields, expected {row.expected_columns}"
        self.invalid.add(f"{self.label}: {where} has {count}: {text!r}")
        return "skip"

    def batches(self) -> Iterator[pa.RecordBatch]:
        rows = 0
        with _members(self.location, self.format, self.label) as members:
            for label, stream in members:
                reader = self._open(stream, self.names)
                while True:
                    try:
                        batch = reader.read_next_batch()
                    except StopIteration:
                        break
                    except (pa.ArrowInvalid, *_READ_ERRORS) as e:
                        raise UserError(f"{label}: {one_line(e)}") from None
                    columns = [batch.column(self.column), *(batch.column(c) for c in self.renames)]
                    for name, array in zip([self.column, *self.renames], columns, strict=True):
                        _check_utf8(array, label, name, rows)
                    source_row = pa.array(np.arange(rows, rows + batch.num_rows, dtype=np.int64))
                    rows += batch.num_rows
                    yield pa.RecordBatch.from_arrays([source_row, *columns], schema=self._schema())

    def _read_as(self) -> dict[str, Any]:
        return {"column": self.column, **_renamed(self.renames), **super()._read_as()}


def _check_utf8(array: pa.Array, label: str, column: str, first_row: int) -> None:
    try:
        array.validate(full=True)
    except pa.ArrowInvalid:
        for i, value in enumerate(array.cast(pa.binary()).to_pylist()):
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(
                    f"{label}: data row {first_row + i + 1}, column {column!r}, is not valid UTF-8"
                ) from None
        raise


def _renamed(renames: dict[str, str]) -> dict[str, Any]:
    changed = {column: name for column, name in renames.items() if column != name}
    return {"renamed": changed} if changed else {}


# --- json, jsonl --------------------------------------------------------------------------------


class JsonReader(Reader):
    """JSON Lines (one string or object a line) or a JSON list; nested objects as dot paths."""

    def __init__(
        self, location: str, label: str, column: str | None, carry: tuple[str, ...] | None, fmt: str
    ):
        super().__init__(location, label, fmt)
        kinds: dict[str, str | None] = {}
        strings = 0
        for _row, _at, value in self._sample():
            if isinstance(value, dict):
                for key, v in flatten(value).items():
                    kinds[key] = merge_kinds(kinds.get(key), json_kind(v))
            elif isinstance(value, str):
                strings += 1
        if column is None and not kinds and strings:
            self.column = None  # bare strings: the value is the prompt
        elif column is None and not kinds:
            raise UserError(f"{label}: no records found (expected strings or objects)")
        else:
            self.column = _choose_prompt(list(kinds), column, label)
        carried = select_columns([k for k in kinds if k != self.column], carry, label)
        self.renames = field_names(carried)
        self.kinds = {self.renames[c]: kinds[c] or "string" for c in carried}
        self.fields = declared(self.kinds)
        self._unknown: set[str] = set()

    def _sample(self) -> Iterator[tuple[int, tuple, Any]]:
        records = self._records()
        try:
            for _ in range(SAMPLE_RECORDS):
                yield next(records)
        except StopIteration:
            return
        finally:
            records.close()

    def _records(self) -> Iterator[tuple[int, tuple, Any]]:
        """(source row, where it is, value) of every record; see :func:`_where`."""
        if self.format == "json":
            with _members(self.location, self.format, self.label) as members:
                yield from self._list(members)
            return
        for label, row, first, lines in _numbered_lines(self.location, self.format, self.label):
            for i, line in enumerate(lines):
                if not line.strip():
                    continue  # a blank line holds no record
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(
                        f"{label}: line {first + i + 1} is not valid JSON: {e.msg} (column {e.colno})"
                    ) from None
                yield row + i, (label, "line", first + i + 1), value

    def _list(self, members) -> Iterator[tuple[int, tuple, Any]]:
        for label, stream in members:
            chunks = []
            while chunk := _read(stream, label):
                chunks.append(chunk)
            items = parse_json(b"".join(chunks), label)
            if not isinstance(items, list):
                raise UserError(f"{label}: expected a JSON list of strings or objects, found {_kind(items)}")
            for i, value in enumerate(items):
                yield i, (label, "item", i + 1), value

    def batches(self) -> Iterator[pa.RecordBatch]:
        chunk: list[tuple[int, tuple, Any]] = []
        for record in self._records():
            chunk.append(record)
            if len(chunk) == BATCH_ROWS // 4:
                yield self._batch(chunk)
                chunk = []
        if chunk:
            yield self._batch(chunk)

    def _batch(self, chunk: list[tuple[int, tuple, Any]]) -> pa.RecordBatch:
        rows, prompts, records, where = [], [], [], []
        known = set(self.renames) | {self.column}
        for source_row, at, value in chunk:
            if isinstance(value, str) and self.column is None:
                prompt, record = value, {}
            elif isinstance(value, dict) and self.column is not None:
                record = flatten(value)
                prompt = record.get(self.column)
                if len(self._unknown) < 20:
                    self._note_unknown(record.keys() - known, at)
            else:
                expected = "an object" if self.column is not None else "a string"
                self.invalid.add(f"{_where(at)}: {_kind(value)}, expected {expected}")
                continue
            if prompt is not None and not isinstance(prompt, str):
                self.invalid.add(f"{_where(at)}: {self.column} is {_kind(prompt)}, expected text")
                continue
            rows.append(source_row)
            prompts.append(prompt)
            records.append(record)
            where.append(at)
        columns = [pa.array(rows, pa.int64()), pa.array(prompts, pa.string())]
        for column, name in self.renames.items():
            kind = self.kinds[name]

            def misfit(i: int, column=column, kind=kind) -> None:
                self.misfits.add(f"{_where(where[i])}: field {column!r} does not fit type {kind}; left null")

            columns.append(json_field([r.get(column) for r in records], kind, misfit))
        return pa.RecordBatch.from_arrays(columns, schema=self._schema())

    def _note_unknown(self, keys: set[str], at: tuple) -> None:
        for key in keys - self._unknown:
            self._unknown.add(key)
            self.misfits.add(
                f"{_where(at)}: field {key!r} first appears after the first {SAMPLE_RECORDS:,} records; "
                "not carried"
            )

    def _read_as(self) -> dict[str, Any]:
        json_fields = sorted(n for n, k in self.kinds.items() if k == JSON)
        extra = {"json_fields": json_fields} if json_fields else {}
        return {"column": self.column, **_renamed(self.renames), **extra, **super()._read_as()}


def parse_json(data: bytes, label: str) -> Any:
    """A whole JSON document; not UTF-8 or not JSON is a UserError naming ``label``."""
    try:
        return json.loads(data)
    except UnicodeDecodeError as e:
        raise UserError(f"{label}: not valid UTF-8 at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{label}: not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None


def _where(at: tuple) -> str:
    """``p.jsonl: line 3`` from (label, "line", 3): messages are built only when needed."""
    label, unit, number = at
    return f"{label}: {unit} {number}"


def _kind(value: Any) -> str:
    names = {
        dict: "an object",
        list: "a list",
        str: "text",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }
    return "null" if value is None else names.get(type(value), type(value).__name__)


# --- parquet --------------------------------------------------------------------------------------


def open_parquet(location: str, label: str) -> pq.ParquetFile:
    """A parquet file read in pieces (column chunks streamed, never the whole file in memory)."""
    source = open_seekable(location, what=label, buffered=False) if is_remote(location) else location
    try:
        return pq.ParquetFile(source, buffer_size=PARQUET_PIECE, pre_buffer=False)
    except FileNotFoundError:
        raise UserError(f"{label}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{label}: is a directory, expected a parquet file") from None
    except (pa.ArrowException, OSError) as e:
        raise UserError(
            f"{label}: not a readable parquet file (truncated or damaged?): {one_line(e)}"
        ) from None


def parquet_batches(
    file: pq.ParquetFile, columns: list[str], label: str, batch_rows: int = BATCH_ROWS
) -> Iterator[pa.RecordBatch]:
    """The file's batches, reading only ``columns``; a damaged part is an error naming its rows."""
    done = 0
    batches = file.iter_batches(batch_size=batch_rows, columns=columns, use_threads=True)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as e:
            rows = f"rows {done:,} to {done + batch_rows - 1:,}"
            raise UserError(f"{label}: {rows} are unreadable (damaged?): {one_line(e)}") from None
        done += batch.num_rows
        yield batch


def _leaves(schema: pa.Schema) -> dict[str, pa.DataType]:
    """Columns by dot path, struct members expanded."""
    out: dict[str, pa.DataType] = {}

    def visit(name: str, t: pa.DataType) -> None:
        if pa.types.is_struct(t) and t.num_fields:
            for child in t:
                visit(f"{name}.{child.name}", child.type)
        else:
            out[name] = t

    for field in schema:
        visit(field.name, field.type)
    return out


class ParquetReader(Reader):
    """A parquet file, streamed by row group; struct members addressed by dot paths."""

    def __init__(self, location: str, label: str, column: str | None, carry: tuple[str, ...] | None):
        super().__init__(location, label, "parquet")
        self.file = open_parquet(location, label)
        self.total_rows = self.file.metadata.num_rows
        leaves = _leaves(self.file.schema_arrow)
        self.column = _choose_prompt(list(leaves), column, label)
        if arrow_kind(leaves[self.column]) != "string":
            raise UserError(f"{label}: column {self.column!r} has type {leaves[self.column]}, expected text")
        others = [c for c in leaves if c != self.column]
        self.skipped_columns = sorted(c for c in others if arrow_kind(leaves[c]) is None)
        carried = select_columns([c for c in others if c not in self.skipped_columns], carry, label)
        self.renames = field_names(carried)
        self.kinds = {self.renames[c]: arrow_kind(leaves[c]) for c in carried}
        self.fields = declared(self.kinds)
        needed = [self.column, *carried]
        self.roots = [f.name for f in self.file.schema_arrow if any(_under(c, f.name) for c in needed)]

    def image_values(self, column: str) -> str:
        """A binary column, or HF datasets' Image struct ``{"bytes", "path"}``, holds the images
        themselves: read as they are (in small batches: they are large), not as a field."""
        found = self.file.schema_arrow.field(column) if column in self.file.schema_arrow.names else None
        kind = found.type if found is not None else None
        is_bytes = kind is not None and (pa.types.is_binary(kind) or pa.types.is_large_binary(kind))
        if kind is not None and pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
            is_bytes = True
        if not is_bytes:
            return super().image_values(column)
        self.image_column = column
        if column not in self.roots:
            self.roots.append(column)
        return VALUES_COLUMN

    def batches(self) -> Iterator[pa.RecordBatch]:
        rows = 0
        image = getattr(self, "image_column", None)
        for batch in parquet_batches(
            self.file, self.roots, self.label, IMAGE_BATCH_ROWS if image else BATCH_ROWS
        ):
            values = batch.column(image) if image else None
            table = pa.Table.from_batches([batch])
            while any(pa.types.is_struct(f.type) for f in table.schema):
                table = table.flatten()
            n = table.num_rows
            columns = [
                pa.array(np.arange(rows, rows + n, dtype=np.int64)),
                arrow_field(table[self.column], "string"),
            ]
            columns += [arrow_field(table[c], self.kinds[name]) for c, name in self.renames.items()]
            rows += n
            batch = pa.RecordBatch.from_arrays(columns, schema=self._schema())
            yield batch if values is None else batch.append_column(VALUES_COLUMN, values)

    def _read_as(self) -> dict[str, Any]:
        json_fields = sorted(n for n, k in self.kinds.items() if k == JSON)
        extra = {"json_fields": json_fields} if json_fields else {}
        if self.skipped_columns:
            extra["not_carried"] = self.skipped_columns
        return {"column": self.column, **_renamed(self.renames), **extra, **super()._read_as()}


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + ".")


def open_file(
    location: str, fmt: str | None = None, *, column: str | None = None, carry: tuple[str, ...] | None = None
) -> Reader:
    """The reader for a prompt file; its format (one of :data:`FORMATS`) from its name unless given."""
    label = base_name(location) or location
    fmt = fmt or (None if archive_mode(location) else infer_format(location))
    if fmt is None:
        formats = "|".join(FORMATS)
        raise UserError(f"cannot tell the format of {label} from its name: pass --format ({formats})")
    if fmt == "txt":
        return TxtReader(location, label, column, carry)
    if fmt in ("csv", "tsv"):
        return CsvReader(location, label, column, carry, fmt)
    if fmt in ("json", "jsonl"):
        return JsonReader(location, label, column, carry, fmt)
    if fmt == "parquet":
        if archive_mode(location):
            raise UserError(f"{label}: parquet files cannot be read from inside an archive")
        return ParquetReader(location, label, column, carry)
    raise UserError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
