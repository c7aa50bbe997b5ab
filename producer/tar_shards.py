"""WebDataset tar shards: one tar per committed part, for streaming training loaders.

WebDataset's conventions: a sample is the files sharing a key (the name up to the first
dot), stored next to each other. Here the key is the global row id, so a sample is
``000000000042.png`` (the image as generated), ``000000000042.json`` (its metadata row)
and ``000000000042.txt`` (its prompt). Members are written in row order with fixed owner,
mode and the row's creation time, so the same part always gives the same tar bytes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import tarfile
from typing import Any

import pyarrow as pa

from fewstep import UserError
from fewstep.contract import LAYOUT_FILES
from fewstep.storage import Store
from producer.images import read_images


def _json_value(value: Any) -> Any:
    return value.isoformat() if isinstance(value, dt.datetime) else value


def _member(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def part_tar(job_store: Store, table: pa.Table, layout: str = LAYOUT_FILES, threads: int = 16) -> bytes:
    """The tar of one part's rows (images read from the job's ``layout``); every image is
    checked against its sha256 and size."""
    rows = table.to_pylist()
    images = read_images(job_store, rows, layout, threads)
    for row, data in zip(rows, images, strict=True):
        if len(data) != row["bytes"] or hashlib.sha256(data).hexdigest() != row["sha256"]:
            raise UserError(
                f"image {row['image_name']} in {row['image_key']} does not match its metadata (size or "
                "sha256): run `producer verify` on this job"
            )
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for row, data in zip(rows, images, strict=True):
            key, ext = row["image_name"].split(".", 1)
            created = row.get("created_at")
            mtime = created.timestamp() if isinstance(created, dt.datetime) else 0
            meta = json.dumps({k: _json_value(v) for k, v in row.items()}, ensure_ascii=False)
            _member(tar, f"{key}.{ext}", data, mtime)
            _member(tar, f"{key}.json", meta.encode(), mtime)
            _member(tar, f"{key}.txt", row["prompt"].encode(), mtime)
    return out.getvalue()
