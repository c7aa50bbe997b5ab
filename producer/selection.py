"""Which rows of a prompt set become the job's prompts.

Steps, in this order, each counted in the enqueue summary and the job spec:

1. **empty** prompts (null, empty or only whitespace) are skipped → ``skipped_empty``;
2. **unusable** prompts, longer than ``producer.max_prompt_chars`` in
   ``config/defaults.toml`` (no prompt is that long; a file without line ends is), are
   skipped → ``skipped_invalid`` (with the rows a source could not read at all, such as
   a CSV row with too many cells). Any other text is a prompt, kept byte-exact: NUL,
   newlines, ``../`` are data, and never reach a storage key;
3. **filters**: ``--category``/``--challenge`` (PartiPrompts; surrounding spaces and
   case ignored), ``--where`` (numeric comparisons on source fields), ``--min-chars``/
   ``--max-chars`` → ``skipped_filtered``;
4. ``--dedupe``: prompts equal after case folding and whitespace collapsing keep their
   first occurrence in source order → ``duplicates``; each dropped row and the row kept
   for it go to ``duplicates.parquet`` in the job folder;
5. ``--sample N --sample-seed S``: the N rows whose key ``mix64(S, source_row)`` is
   smallest, in source order. The sample depends only on (S, the rows that reach this
   step), never on batch sizes, and a sample of N is a subset of a sample of N + k.
   Memory grows with N, not with the source;
6. ``--limit N``: the first N rows left (reading stops there). Rows left out by 5 and 6
   are counted as ``not_selected``.

Everything streams batch by batch: 14M rows are never Python objects, except one short
key per row with ``--dedupe`` (16 bytes a unique prompt).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fewstep import UserError
from fewstep.contract import mix64
from producer.sources.fields import Skips

_WHERE = re.compile(
    r"\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(<=|>=|==|!=|<|>|=)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*"
)
_COMPARE = {
    "<": pc.less,
    "<=": pc.less_equal,
    ">": pc.greater,
    ">=": pc.greater_equal,
    "=": pc.equal,
    "==": pc.equal,
    "!=": pc.not_equal,
}
_NUMBER = r"^\s*[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\s*$"
_SAMPLE_SALT = 0x73616D706C65  # "sample": sample keys never line up with derived seeds
NUMERIC_KINDS = ("int64", "float32", "float64", "bool", "string")
COUNTS = ("rows_read", "skipped_empty", "skipped_invalid", "skipped_filtered", "duplicates", "not_selected")


@dataclass(frozen=True)
class Selection:
    """What the user asked for (None or empty: no such step)."""

    limit: int | None = None
    sample: int | None = None
    sample_seed: int = 0
    dedupe: bool = False
    where: tuple[str, ...] = ()
    #: Field → accepted values (PartiPrompts' category and challenge).
    match: dict[str, tuple[str, ...]] = field(default_factory=dict)
    min_chars: int | None = None
    max_chars: int | None = None


@dataclass(frozen=True)
class Condition:
    """One ``--where``: a source field compared with a number."""

    field: str
    op: str
    value: float
    text: bool  # the field is text that may hold numbers (CSV, TSV cells have no type)
    #: For a text field: how many values so far were numbers and how many other text.
    seen: dict[str, int] = field(default_factory=lambda: {"numbers": 0, "text": 0}, compare=False)

    def __str__(self) -> str:
        return f"{self.field}{'==' if self.op == '=' else self.op}{self.value:g}"

    def mask(self, batch: pa.RecordBatch) -> pa.Array:
        column = batch.column(self.field)
        if self.text:
            numeric = pc.match_substring_regex(column, _NUMBER)
            self._check_holds_numbers(column, numeric)
            column = pc.cast(pc.if_else(numeric, pc.utf8_trim_whitespace(column), None), pa.float64())
        elif pa.types.is_boolean(column.type):
            column = pc.cast(column, pa.float64())
        return pc.fill_null(_COMPARE[self.op](column, self.value), False)

    def _check_holds_numbers(self, column: pa.Array, numeric: pa.Array) -> None:
        """Refuse a text field that holds words, not numbers (PartiPrompts' ``category``): one
        whose values so far, from the first batch on, include text and not a single number. A
        numeric column with an odd ``N/A`` still compares (that row is removed, like a null)."""
        numbers = pc.sum(pc.cast(pc.fill_null(numeric, False), pa.int64())).as_py() or 0
        blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(column), ""), True)
        words = pc.and_(pc.invert(blank), pc.invert(pc.fill_null(numeric, False)))
        count = pc.sum(pc.cast(words, pa.int64())).as_py() or 0
        self.seen["numbers"] += numbers
        self.seen["text"] += count
        if self.seen["text"] and not self.seen["numbers"]:
            example = pc.filter(column, words)[0].as_py()
            raise UserError(
                f"--where {self}: field {self.field!r} is text ({example[:40]!r} is not a number); "
                "--where compares numbers"
            )


def parse_where(text: str, fields: dict[str, str], what: str = "source field") -> Condition:
    """``prompt_nsfw<0.2`` → a Condition on a source field (``source_`` prefix optional);
    ``fields`` are the columns it may name (name → type name), ``what`` says what they are."""
    m = _WHERE.fullmatch(text)
    if not m:
        raise UserError(
            f"--where {text!r}: expected FIELD OP NUMBER, e.g. 'prompt_nsfw<0.2' (OP: < <= > >= == !=)"
        )
    name, op, value = m.groups()
    columns = {**fields, "source_row": "int64"}
    resolved = name if name in columns else f"source_{name}" if f"source_{name}" in columns else None
    if resolved is None:
        numeric = sorted(n for n, k in columns.items() if k in NUMERIC_KINDS and k != "string")
        texts = sorted(n for n, k in columns.items() if k == "string")
        also = f"; text ones, compared where they hold numbers: {', '.join(texts)}" if texts else ""
        raise UserError(f"--where {text!r}: no {what} {name!r} (numeric ones: {', '.join(numeric)}{also})")
    kind = columns[resolved]
    if kind not in NUMERIC_KINDS:
        raise UserError(f"--where {text!r}: field {resolved!r} is {kind}; --where compares numbers")
    return Condition(resolved, op, float(value), text=kind == "string")


def _sliced(batches: Iterator[pa.RecordBatch], need: Callable[[], int]) -> Iterator[pa.RecordBatch]:
    """``batches`` in slices of ``need()`` rows at most, asked again before each slice."""
    for batch in batches:
        start = 0
        while start < batch.num_rows:
            piece = batch.slice(start, need())
            start += piece.num_rows
            yield piece


def prompt_keys(prompts: pa.Array, chunk: int = 8192) -> np.ndarray:
    """A 64-bit key per prompt, equal for prompts equal after case folding and collapsing whitespace.

    BLAKE2b, so keys are the same in every run and on every machine. Prompts become Python
    strings a few thousand at a time, never a whole batch at once.
    """
    blake = hashlib.blake2b
    keys = np.empty(len(prompts), dtype=np.uint64)
    for lo in range(0, len(prompts), chunk):
        texts = prompts.slice(lo, chunk).to_pylist()
        keys[lo : lo + len(texts)] = np.fromiter(
            (
                int.from_bytes(
                    blake(" ".join(p.casefold().split()).encode(), digest_size=8).digest(), "little"
                )
                for p in texts
            ),
            dtype=np.uint64,
            count=len(texts),
        )
    return keys


class SeenPrompts:
    """Prompt keys seen so far with the source row kept for each: sorted runs, merged as they grow."""

    def __init__(self) -> None:
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []

    def kept_rows(self, keys: np.ndarray) -> np.ndarray:
        """For each key, the source row kept for it, or -1 when it is new."""
        kept = np.full(len(keys), -1, dtype=np.int64)
        for run_keys, run_rows in self.runs:
            at = np.minimum(np.searchsorted(run_keys, keys), len(run_keys) - 1)
            hit = run_keys[at] == keys
            kept[hit] = run_rows[at[hit]]
        return kept

    def add(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Add new, distinct keys (sorted) and the rows they were first seen in."""
        if not len(keys):
            return
        self.runs.append((keys, rows))
        while len(self.runs) > 1 and len(self.runs[-2][0]) <= 2 * len(self.runs[-1][0]):
            (k1, r1), (k2, r2) = self.runs.pop(), self.runs.pop()
            k, r = np.concatenate([k2, k1]), np.concatenate([r2, r1])
            order = np.argsort(k, kind="stable")
            self.runs.append((k[order], r[order]))


class BottomSample:
    """The ``size`` rows with the smallest sample keys, kept as batches (memory ~ 2 × size rows)."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = mix64(_SAMPLE_SALT, [seed & 0xFFFFFFFFFFFFFFFF])[0].item()
        self.batches: list[pa.RecordBatch] = []
        self.keys: list[np.ndarray] = []
        self.held = 0
        self.seen = 0
        self.threshold: int | None = None

    def add(self, batch: pa.RecordBatch) -> None:
        self.seen += batch.num_rows
        keys = mix64(self.seed, batch.column("source_row").to_numpy())
        if self.threshold is not None:
            below = keys < np.uint64(self.threshold)
            batch, keys = batch.filter(pa.array(below)), keys[below]
        if batch.num_rows:
            self.batches.append(batch)
            self.keys.append(keys)
            self.held += batch.num_rows
        if self.held > 2 * self.size + 65_536:
            self._compact()

    def _compact(self) -> None:
        if not self.batches:
            return
        keys = np.concatenate(self.keys)
        table = pa.Table.from_batches(self.batches)
        if len(keys) > self.size:
            keep = np.argpartition(keys, self.size - 1)[: self.size]
            table, keys = table.take(pa.array(keep)), keys[keep]
            self.threshold = int(keys.max())
        self.batches, self.keys, self.held = table.combine_chunks().to_batches(), [keys], len(keys)

    def result(self) -> Iterator[pa.RecordBatch]:
        """The sample, in source order."""
        self._compact()
        if self.batches:
            yield from pa.Table.from_batches(self.batches).sort_by("source_row").to_batches(65_536)


class DuplicateLog:
    """Each dropped duplicate's source row and the row kept for it, as parquet (duplicates.parquet)."""

    schema = pa.schema([("source_row", pa.int64()), ("duplicate_of", pa.int64())])

    def __init__(self) -> None:
        self.sink = pa.BufferOutputStream()
        self.writer = pq.ParquetWriter(self.sink, self.schema, compression="zstd")

    def add(self, rows: np.ndarray, kept: np.ndarray) -> None:
        if len(rows):
            self.writer.write_batch(
                pa.RecordBatch.from_arrays([pa.array(rows), pa.array(kept)], schema=self.schema)
            )

    def close(self) -> bytes:
        self.writer.close()
        return self.sink.getvalue().to_pybytes()


class Selector:
    """Applies a :class:`Selection` to a stream of source batches, counting what it leaves out."""

    def __init__(
        self, selection: Selection, fields: dict[str, str], *, max_prompt_chars: int, log_duplicates: bool
    ):
        self.selection = selection
        self.max_prompt_chars = max_prompt_chars
        self.conditions = sorted((parse_where(w, fields) for w in selection.where), key=str)
        for name in selection.match:
            if name not in fields:
                raise UserError(f"--{name} needs a source with a {name!r} field (this one has none)")
        self.wanted = {name: {_norm(v) for v in values} for name, values in selection.match.items() if values}
        self.found: dict[str, set[str]] = {name: set() for name in self.wanted}
        self.counts = dict.fromkeys(COUNTS, 0)
        self.eligible = 0  # rows that reach --sample and --limit
        self.invalid = Skips()
        self.seen = SeenPrompts() if selection.dedupe else None
        self.duplicate_log = DuplicateLog() if selection.dedupe and log_duplicates else None

    def describe(self) -> dict[str, Any]:
        """The selection as recorded in the job spec: part of the job's identity."""
        s = self.selection
        out: dict[str, Any] = {"max_prompt_chars": self.max_prompt_chars}
        if s.limit is not None:
            out["limit"] = s.limit
        if s.sample is not None:
            out.update(sample=s.sample, sample_seed=s.sample_seed)
        if s.dedupe:
            out["dedupe"] = "first occurrence, case folded, whitespace collapsed"
        if self.conditions:
            out["where"] = [str(c) for c in self.conditions]
        for name, values in sorted(self.wanted.items()):
            out[name] = sorted(values)
        if s.min_chars is not None:
            out["min_chars"] = s.min_chars
        if s.max_chars is not None:
            out["max_chars"] = s.max_chars
        return out

    def select(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        """The selected rows, in source order."""
        s = self.selection
        sample = BottomSample(s.sample, s.sample_seed) if s.sample is not None else None
        left = s.limit
        # With --limit and no --sample, the source's batches are taken in slices no larger than
        # what the limit still needs (so reading, and rows_read, stop at the limit's row), or,
        # when filters drop rows, at least a chunk, so a sparse filter does not crawl row by row.
        floor = (
            1
            if not (self.conditions or self.wanted or self.seen is not None or s.min_chars or s.max_chars)
            else 1024
        )
        need = (lambda: max(left, floor)) if left is not None and sample is None else None
        kept = self._filtered(batches, need)
        if sample is not None:
            for batch in kept:
                sample.add(batch)
            kept = sample.result()
        passed = 0
        for batch in kept if left is None or left > 0 else ():
            if left is not None:
                batch = batch.slice(0, left)
                left -= batch.num_rows
            passed += batch.num_rows
            yield batch
            if left is not None and left <= 0:
                break
        kept.close()  # stops reading the source when the limit is reached
        self.counts["not_selected"] = self.eligible - passed
        self._check_matches()

    def _filtered(
        self, batches: Iterator[pa.RecordBatch], need: Callable[[], int] | None = None
    ) -> Iterator[pa.RecordBatch]:
        for batch in _sliced(batches, need) if need else batches:
            self.counts["rows_read"] += batch.num_rows
            batch = self._usable(batch)
            batch = self._keep(batch, self._filter_mask(batch), "skipped_filtered")
            if self.seen is not None:
                batch = self._dedupe(batch)
            self.eligible += batch.num_rows
            if batch.num_rows:
                yield batch

    def _keep(self, batch: pa.RecordBatch, mask: pa.Array | None, count: str) -> pa.RecordBatch:
        if mask is None:
            return batch
        kept = batch.filter(mask)
        self.counts[count] += batch.num_rows - kept.num_rows
        return kept

    def _usable(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        # Cheap tests first (byte lengths from the offsets; whitespace stops at the first
        # other character): at DiffusionDB scale, trimming every prompt would dominate.
        prompt = batch.column("prompt")
        size = pc.binary_length(prompt)
        blank = pc.fill_null(pc.or_(pc.equal(size, 0), pc.utf8_is_space(prompt)), True)
        if pc.any(blank).as_py():
            batch = self._keep(batch, pc.invert(blank), "skipped_empty")
            prompt, size = batch.column("prompt"), pc.binary_length(batch.column("prompt"))
        if not pc.any(pc.greater(size, self.max_prompt_chars)).as_py():  # bytes ≥ characters
            return batch
        too_long = pc.greater(pc.utf8_length(prompt), self.max_prompt_chars)
        rows = batch.column("source_row").filter(too_long)
        for row in rows[:5].to_pylist():
            self.invalid.add(f"source row {row}: prompt has over {self.max_prompt_chars:,} characters")
        self.counts["skipped_invalid"] += len(rows)
        return batch.filter(pc.invert(too_long))

    def _filter_mask(self, batch: pa.RecordBatch) -> pa.Array | None:
        s = self.selection
        masks = [c.mask(batch) for c in self.conditions]
        for name, wanted in self.wanted.items():
            values = pc.utf8_lower(pc.utf8_trim_whitespace(batch.column(name)))
            masks.append(
                pc.fill_null(pc.is_in(values, value_set=pa.array(sorted(wanted), pa.string())), False)
            )
            if len(self.found[name]) < 1000:
                self.found[name].update(v for v in pc.unique(values).to_pylist() if v is not None)
        if s.min_chars is not None or s.max_chars is not None:
            length = pc.utf8_length(batch.column("prompt"))
            if s.min_chars is not None:
                masks.append(pc.greater_equal(length, s.min_chars))
            if s.max_chars is not None:
                masks.append(pc.less_equal(length, s.max_chars))
        if not masks:
            return None
        mask = masks[0]
        for m in masks[1:]:
            mask = pc.and_(mask, m)
        return mask

    def _dedupe(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        assert self.seen is not None
        if not batch.num_rows:
            return batch
        keys = prompt_keys(batch.column("prompt"))
        rows = batch.column("source_row").to_numpy()
        unique, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        earlier = self.seen.kept_rows(unique)
        kept_for = np.where(earlier >= 0, earlier, rows[first])[inverse]
        duplicate = kept_for != rows
        new = earlier < 0
        self.seen.add(unique[new], rows[first][new])
        if self.duplicate_log is not None:
            self.duplicate_log.add(rows[duplicate], kept_for[duplicate])
        return self._keep(batch, pa.array(~duplicate), "duplicates")

    def _check_matches(self) -> None:
        for name, wanted in self.wanted.items():
            missing = sorted(wanted - self.found[name])
            if missing and self.counts["rows_read"] and self.selection.limit is None:
                have = ", ".join(sorted(self.found[name])[:20])
                raise UserError(
                    f"--{name} {', '.join(map(repr, missing))} matches no row (the source has: {have})"
                )


def _norm(value: str) -> str:
    return value.strip().lower()
