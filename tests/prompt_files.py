"""Small prompt files in the exact schemas of the real datasets, quirks included, written by tests."""

from __future__ import annotations

import datetime as dt
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from producer.sources.diffusiondb import METADATA_SCHEMA

DIFFUSIONDB_ROWS = [
    # image_name, prompt, part_id, seed, step, cfg, sampler, width, height, user_name, timestamp, nsfw x2
    ("3bfcd9cf-26ea-4303-bbe1-b095853f5360.png", "geodesic landscape, john chamberlain, 4 k, ", 1,
     38753269, 50, 12.0, 8, 512, 512, "a" * 64, dt.datetime(2022, 8, 7, 12, 0, tzinfo=dt.UTC), 0.1, 0.05),
    ("5f47c66c-51d4-4f2c-a872-a68518f44adb.png", "a cat in a hat", 1, 4294967295, 30, 7.5, 1, 768, 512,
     None, None, 2.0, 0.9),
    ("66b428b9-55dc-4907-b116-55aaa887de30.png", "   ", 1, 7, 50, 7.0, 3, 512, 512, None, None, 0.0, 0.0),
    ("../../etc/passwd", "line one\nline two", 2, 0, 150, 15.0, 9, 512, 640, "b" * 64,
     dt.datetime(2022, 8, 19, tzinfo=dt.UTC), 0.3, 0.15),
    ("f3501e05-aef7-4225-a9e9-f516527408ac.png", "A  CAT in a hat", 2, 12345, 50, 7.5, 4, 512, 512,
     None, dt.datetime(2022, 8, 8, tzinfo=dt.UTC), 0.2, 0.1),
]  # fmt: skip


def write_diffusiondb(path: Path, rows: list[tuple] = DIFFUSIONDB_ROWS, row_group_size: int = 2) -> Path:
    """A DiffusionDB metadata.parquet (nulls in user_name and timestamp, several row groups)."""
    columns = list(zip(*rows, strict=True))
    table = pa.table(
        {f.name: pa.array(list(c), f.type) for f, c in zip(METADATA_SCHEMA, columns, strict=True)},
        schema=METADATA_SCHEMA,
    )
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_diffusiondb_parts(folder: Path, nested: bool = False) -> Path:
    """DiffusionDB's per-part JSON: ``part-000001.json`` … (in ``part-00000N/`` folders when ``nested``)."""
    parts = {
        1: {
            "3bfcd9cf-26ea-4303-bbe1-b095853f5360.png": {
                "p": "geodesic landscape, john chamberlain, 4 k, ", "se": 38753269, "c": 12.0, "st": 50,
                "sa": "k_lms",
            },
            "5f47c66c-51d4-4f2c-a872-a68518f44adb.png": {"p": "a cat", "se": 1, "c": 7.5, "st": 30,
                                                         "sa": "ddim"},
        },
        2: {
            "66b428b9-55dc-4907-b116-55aaa887de30.png": {"p": "", "se": 7, "c": 7.0, "st": 50, "sa": "plms"},
            "f3501e05-aef7-4225-a9e9-f516527408ac.png": {"p": "a dog", "se": 99, "c": 9.0, "st": 20,
                                                         "sa": "k_euler"},
        },
    }  # fmt: skip
    for part, entries in parts.items():
        where = folder / f"part-{part:06d}" if nested else folder
        where.mkdir(parents=True, exist_ok=True)
        (where / f"part-{part:06d}.json").write_text(json.dumps(entries, indent=2))
    return folder


JOURNEYDB_RECORDS = [
    {
        "img_path": "./000/0001.jpg",
        "prompt": "a castle on a hill, matte painting --ar 16:9 --v 5",
        "Task1": {"Style": ["matte painting"], "Content": ["castle", "hill"], "Atmosphere": [], "Others": []},
        "Task2": {"Caption": "A castle stands on a green hill."},
    },
    {
        "img_path": "./000/0002.jpg",
        "prompt": "portrait of a fox, watercolor",
        "Task1": {
            "Style": ["watercolor"],
            "Content": ["fox"],
            "Atmosphere": ["calm"],
            "Others": ["portrait"],
        },
        "Task2": {"Caption": "A watercolor portrait of a red fox."},
    },
    {
        "img_path": "./001/0003.jpg",
        "prompt": "neon city at night",
        "Task1": {"Style": [], "Content": ["city"], "Atmosphere": ["moody", "dark"], "Others": []},
        "Task2": {"Caption": "A city street lit by neon signs at night."},
    },
]


def journeydb_lines(records: list[dict] = JOURNEYDB_RECORDS) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def write_journeydb(path: Path, records: list[dict] = JOURNEYDB_RECORDS) -> Path:
    """JourneyDB's annotation JSON Lines; a ``.tgz`` path holds it as its one member."""
    data = journeydb_lines(records)
    if path.name.endswith((".tgz", ".tar.gz")):
        with tarfile.open(path, "w:gz") as tar:
            info = tarfile.TarInfo("data/train/train_anno_realease_repath.jsonl")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    else:
        path.write_bytes(data)
    return path
