"""Committed images read back, whatever the job's layout.

Every metadata row says where its image lies: its own object (``files``), a span of a tar
(``webdataset``: ``image_key``, ``image_offset``, ``bytes``; one ranged GET fetches it) or
a row of a parquet (``parquet``: ``image_key``, ``image_row``).
"""

from __future__ import annotations

import io
import tarfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fewstep.jpegxl  # noqa: F401  (Pillow reads a --format jxl job's images)
from fewstep.contract import IMAGE_COLUMN, LAYOUT_FILES, LAYOUT_WEBDATASET
from fewstep.storage import Store, read_table

#: A tar with more rows wanted than this is read whole (one GET), else one ranged GET per image.
_WHOLE_TAR_ROWS = 8


def tar_members(data: bytes) -> dict[str, tuple[int, bytes]]:
    """Each member of a tar: name → (offset of its data, its data); :class:`tarfile.TarError`
    if the tar is unreadable."""
    members = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            if info.isfile():
                members[info.name] = (info.offset_data, data[info.offset_data : info.offset_data + info.size])
    return members


def parquet_images(store: Store, key: str) -> list[bytes]:
    """The image bytes of a parquet-layout object, by row."""
    column = read_table(store, key, [IMAGE_COLUMN]).column(IMAGE_COLUMN)
    return [image["bytes"] for image in column.to_pylist()]


def read_images(store: Store, rows: list[dict[str, Any]], layout: str, threads: int = 16) -> list[bytes]:
    """The image of each metadata row (``image_key``, ``bytes`` and ``image_offset`` or
    ``image_row``), in the rows' order; raises :class:`~fewstep.storage.KeyMissing` if one is gone."""
    if layout == LAYOUT_FILES:
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(lambda row: store.get(row["image_key"]), rows))
    by_key: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_key[row["image_key"]].append(i)
    images: list[bytes] = [b""] * len(rows)

    def read(key: str) -> None:
        wanted = by_key[key]
        if layout == LAYOUT_WEBDATASET and len(wanted) <= _WHOLE_TAR_ROWS:
            for i in wanted:
                images[i] = store.get_range(key, rows[i]["image_offset"], rows[i]["bytes"])
        elif layout == LAYOUT_WEBDATASET:
            data = store.get(key)
            for i in wanted:
                offset = rows[i]["image_offset"]
                images[i] = data[offset : offset + rows[i]["bytes"]]
        else:
            stored = parquet_images(store, key)
            for i in wanted:
                images[i] = stored[rows[i]["image_row"]]

    with ThreadPoolExecutor(min(threads, max(1, len(by_key)))) as pool:
        list(pool.map(read, by_key))
    return images
