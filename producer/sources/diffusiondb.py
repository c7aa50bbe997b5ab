"""DiffusionDB 2M / Large: ``metadata.parquet`` / ``metadata-large.parquet``, or the per-part JSON.

The metadata table has 13 columns: ``image_name`` string, ``prompt`` string, ``part_id``
uint16, ``seed`` uint32, ``step`` uint16, ``cfg`` float32, ``sampler`` uint8 (1 ddim,
2 plms, 3 k_euler, 4 k_euler_ancestral, 5 k_heun, 6 k_dpm_2, 7 k_dpm_2_ancestral, 8 k_lms,
9 others), ``width`` uint16, ``height`` uint16, ``user_name`` string, ``timestamp``
timestamp (UTC), ``image_nsfw`` float32 (2.0: already blurred), ``prompt_nsfw`` float32.
It is streamed by row group, reading only the columns needed, so memory does not grow
with the number of rows.

The per-part format is a folder of ``part-XXXXXX.json`` (or the ``part-XXXXXX.zip``
archives they come in, read without extracting the images), each
``{"<uuid>.png": {"p": prompt, "se": seed, "c": cfg, "st": steps, "sa": sampler}}``.

Each prompt keeps the source's seed by default (``--seeds source``), so an output pairs
with the original DiffusionDB image (with ``--seeds derived`` the source's seed is carried
as ``source_seed``); the source's own settings are carried as ``source_*`` fields.
Generation uses the job's steps and guidance (the model preset's, or the flags), never
the source's.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fewstep import UserError
from fewstep.contract import FIELD_TYPES
from fewstep.settings import load_config
from producer.sources import PromptSource
from producer.sources.fields import select_columns
from producer.sources.formats import BATCH_ROWS, open_parquet, parquet_batches, parse_json
from producer.sources.location import base_name, display_name, list_folder, open_seekable, read_bytes

#: DiffusionDB's metadata table, as published.
METADATA_SCHEMA = pa.schema(
    [
        ("image_name", pa.string()),
        ("prompt", pa.string()),
        ("part_id", pa.uint16()),
        ("seed", pa.uint32()),
        ("step", pa.uint16()),
        ("cfg", pa.float32()),
        ("sampler", pa.uint8()),
        ("width", pa.uint16()),
        ("height", pa.uint16()),
        ("user_name", pa.string()),
        ("timestamp", pa.timestamp("us", tz="UTC")),
        ("image_nsfw", pa.float32()),
        ("prompt_nsfw", pa.float32()),
    ]
)
SAMPLERS = ["ddim", "plms", "k_euler", "k_euler_ancestral", "k_heun", "k_dpm_2", "k_dpm_2_ancestral", "k_lms"]
SAMPLERS += ["others"]
# Code → name: index 0 and codes past 9 have no name. (Built where used: pa.array at import
# time would import pandas into every producer command.)
_SAMPLER_NAMES = [None, *SAMPLERS]

# Metadata columns carried, with their field types; user_name only when asked (--carry), and
# seed only with --seeds derived (otherwise the job's seed column is the source's seed).
METADATA_FIELDS = {
    "image_name": "string",
    "part_id": "int64",
    "seed": "int64",
    "step": "int64",
    "cfg": "float32",
    "sampler": "string",
    "width": "int64",
    "height": "int64",
    "user_name": "string",
    "timestamp": "timestamp",
    "image_nsfw": "float32",
    "prompt_nsfw": "float32",
}
DEFAULT_CARRY = tuple(c for c in METADATA_FIELDS if c != "user_name")
# The per-part JSON's keys.
PART_FIELDS = {"image_name": "string", "part_id": "int64", "seed": "int64", "step": "int64", "cfg": "float32"}
PART_FIELDS["sampler"] = "string"
_PART = re.compile(r"part-(\d+)\.(json|zip)$")

_KINDS = {
    "prompt": ("text", pa.types.is_string),
    "image_name": ("text", pa.types.is_string),
    "user_name": ("text", pa.types.is_string),
    "part_id": ("an integer", pa.types.is_integer),
    "seed": ("an integer", pa.types.is_integer),
    "step": ("an integer", pa.types.is_integer),
    "width": ("an integer", pa.types.is_integer),
    "height": ("an integer", pa.types.is_integer),
    "sampler": ("an integer code or text", lambda t: pa.types.is_integer(t) or pa.types.is_string(t)),
    "cfg": ("a number", pa.types.is_floating),
    "image_nsfw": ("a number", pa.types.is_floating),
    "prompt_nsfw": ("a number", pa.types.is_floating),
    "timestamp": ("a timestamp", pa.types.is_timestamp),
}


def default_location(subset: str) -> str:
    """The subset's metadata table on the Hugging Face Hub (``config/datasets.toml``)."""
    config = load_config("datasets")["diffusiondb"]
    repo, revision = config["repo"], config.get("revision")
    at = f"@{revision}" if revision else ""
    return f"hf://datasets/{repo}{at}/{config['subsets'][subset]['file']}"


def sampler_names(codes: pa.Array) -> pa.Array:
    """DiffusionDB's sampler codes (uint8) as names; unknown codes become null."""
    if pa.types.is_string(codes.type):
        return codes
    index = pc.fill_null(codes, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    index[(index < 0) | (index >= len(_SAMPLER_NAMES))] = 0
    return pa.array(_SAMPLER_NAMES, pa.string()).take(pa.array(index))


class DiffusionDB(PromptSource):
    """DiffusionDB's metadata table or per-part JSON; the subset's table on the Hub by default."""

    name = "diffusiondb"

    def __init__(
        self,
        path: str | None = None,
        subset: str = "2m",
        seeds: str = "source",
        carry: tuple[str, ...] | None = None,
    ):
        super().__init__()
        self.subset = None if path else subset  # with --path, the file says which subset it is
        self.location = path or default_location(subset)
        self.seeds = seeds
        self.label = base_name(self.location) or self.location
        self.layout = "metadata" if self.label.lower().endswith((".parquet", ".pq")) else "parts"
        available = list(METADATA_FIELDS if self.layout == "metadata" else PART_FIELDS)
        if carry is None:
            carry = tuple(c for c in DEFAULT_CARRY if c in available and (c != "seed" or seeds == "derived"))
        self.carried = select_columns(available, tuple(c.removeprefix("source_") for c in carry), self.label)
        self.fields = {f"source_{c}": METADATA_FIELDS[c] for c in self.carried}
        self.columns: list[str] = []
        self._file = None
        if self.layout == "metadata":
            self._file = open_parquet(self.location, self.label)
            self.total_rows = self._file.metadata.num_rows
            self._check_columns()

    def _check_columns(self) -> None:
        assert self._file is not None
        schema = self._file.schema_arrow
        needed = ["prompt", *self.carried]
        if self.seeds == "source" and "seed" not in needed:
            needed.append("seed")
        missing = [c for c in needed if c not in schema.names]
        if missing:
            raise UserError(
                f"{self.label}: missing column(s) {', '.join(missing)} (found: {', '.join(schema.names)}); "
                "expected DiffusionDB's metadata table"
            )
        for name in needed:
            t = schema.field(name).type
            what, ok = _KINDS[name]
            if not ok(t) and not (what == "text" and pa.types.is_large_string(t)):
                raise UserError(f"{self.label}: column {name!r} has type {t}, expected {what}")
        self.columns = needed

    def batches(self) -> Iterator[pa.RecordBatch]:
        if self.layout == "metadata":
            return self._metadata_batches()
        return self._part_batches()

    # --- metadata.parquet -----------------------------------------------------------------

    def _metadata_batches(self) -> Iterator[pa.RecordBatch]:
        assert self._file is not None
        rows = 0
        for batch in parquet_batches(self._file, self.columns, self.label):
            n = batch.num_rows
            columns = {"source_row": pa.array(np.arange(rows, rows + n, dtype=np.int64))}
            columns["prompt"] = batch.column("prompt").cast(pa.string())
            if self.seeds == "source":
                columns["seed"] = self._seeds(batch.column("seed"), rows)
            for name in self.carried:
                columns[f"source_{name}"] = self._field(name, batch.column(name))
            rows += n
            yield pa.RecordBatch.from_pydict(columns)

    def _seeds(self, seed: pa.Array, first_row: int) -> pa.Array:
        try:
            return seed.cast(pa.uint32())
        except pa.ArrowInvalid:
            values = seed.to_numpy(zero_copy_only=False)
            bad = int(np.argmax((values < 0) | (values > 0xFFFFFFFF)))
            raise UserError(
                f"{self.label}: row {first_row + bad}: seed {values[bad]} is outside 0..4294967295"
            ) from None

    @staticmethod
    def _field(name: str, array: pa.Array) -> pa.Array:
        if name == "sampler":
            return sampler_names(array)
        if name == "timestamp":
            return pc.cast(array, FIELD_TYPES["timestamp"], safe=False)
        return pc.cast(array, FIELD_TYPES[METADATA_FIELDS[name]])

    # --- per-part JSON -------------------------------------------------------------------

    def _parts(self) -> list[tuple[int, str]]:
        if _PART.search(base_name(self.location)):
            found = [self.location]
        else:
            found = list_folder(self.location, (".json", ".zip"), what="DiffusionDB parts")
        parts: dict[int, str] = {}
        for location in found:
            m = _PART.search(base_name(location))
            if m and (int(m.group(1)) not in parts or m.group(2) == "json"):
                parts[int(m.group(1))] = location
        if not parts:
            raise UserError(
                f"{self.label}: no part-XXXXXX.json (or .zip) files found; expected DiffusionDB's "
                "metadata.parquet or a folder of its parts"
            )
        return sorted(parts.items())

    def _part_entries(self, location: str) -> dict[str, Any]:
        name = base_name(location)
        if name.endswith(".zip"):
            member = name[: -len(".zip")] + ".json"
            try:
                with zipfile.ZipFile(open_seekable(location, what="DiffusionDB part")) as archive:
                    data = archive.read(member)
            except KeyError:
                raise UserError(f"{name}: the archive holds no {member}") from None
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise UserError(f"{name}: damaged zip archive ({e})") from None
            name = f"{name}:{member}"
        else:
            data = read_bytes(location, what="DiffusionDB part")
        entries = parse_json(data, name)
        if not isinstance(entries, dict):
            raise UserError(f"{name}: expected an object mapping image names to prompts and settings")
        return entries

    def _part_batches(self) -> Iterator[pa.RecordBatch]:
        columns: dict[str, list] = {k: [] for k in ("source_row", "prompt", "seed", *PART_FIELDS)}
        row = 0
        for part, location in self._parts():
            for image, entry in self._part_entries(location).items():
                if not isinstance(entry, dict) or not isinstance(entry.get("p"), str | None):
                    self.invalid.add(f"{base_name(location)}: {image!r} has no text prompt 'p'")
                    row += 1
                    continue
                seed = entry.get("se")
                seed = seed if isinstance(seed, int) and 0 <= seed <= 0xFFFFFFFF else None
                values = {"image_name": image, "part_id": part, "seed": seed, "step": entry.get("st")}
                values.update(cfg=entry.get("c"), sampler=entry.get("sa"))
                columns["source_row"].append(row)
                columns["prompt"].append(entry.get("p"))
                for key, value in values.items():
                    columns[key].append(value)
                row += 1
            if len(columns["source_row"]) >= BATCH_ROWS:
                yield self._part_batch(columns)
                columns = {k: [] for k in columns}
        if columns["source_row"]:
            yield self._part_batch(columns)

    def _part_batch(self, columns: dict[str, list]) -> pa.RecordBatch:
        out = {
            "source_row": pa.array(columns["source_row"], pa.int64()),
            "prompt": pa.array(columns["prompt"], pa.string()),
        }
        if self.seeds == "source":
            out["seed"] = pa.array(columns["seed"], pa.uint32())
        for name in self.carried:
            out[f"source_{name}"] = _json_array(columns[name], name)
        return pa.RecordBatch.from_pydict(out)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            **({"subset": self.subset} if self.subset else {}),
            "path": display_name(self.location),
            "layout": self.layout,
            "seeds": self.seeds,
            "fields": self.fields,
        }


def _json_array(values: list, name: str) -> pa.Array:
    """A per-part column; a value of the wrong kind (a text step, say) becomes null."""
    kind = PART_FIELDS[name]
    ok = {"string": str, "int64": int, "float32": int | float}[kind]
    clean = [v if isinstance(v, ok) and not isinstance(v, bool) else None for v in values]
    return pa.array(clean, FIELD_TYPES[kind])
