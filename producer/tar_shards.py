"""WebDataset tar shards: one tar per committed part, for streaming training loaders.

WebDataset's conventions: a sample is the files sharing a key (the name up to the first
dot), stored next to each other. Here the key is the global row id, so a sample is
``000000000042.png`` (the image as generated), ``000000000042.json`` (its metadata row)
and ``000000000042.txt`` (its prompt). Members are written in row order with fixed owner,
mode and the row's creation time, so the same part always gives the same tar bytes.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

from fewstep import UserError
from fewstep.contract import LAYOUT_FILES, TAR_END, webdataset_sample
from fewstep.storage import Store
from producer.images import read_images


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
    return b"".join(webdataset_sample(row, data) for row, data in zip(rows, images, strict=True)) + TAR_END
