"""WebDataset tar members, byte for byte: the worker's tars and ``producer finalize --webdataset``'s."""

from __future__ import annotations

import datetime as dt
import json
import tarfile
from typing import Any

from fewstep.contract.heartbeat import parse_time
from fewstep.contract.keys import control_name

# WebDataset samples: per row, ``<row>.<ext>`` (the image), ``<row>.json`` (its metadata row)
# and ``<row>.txt`` (the prompt, UTF-8), in that order, in the worker's tars (webdataset
# layout) and in those ``producer finalize --webdataset`` writes.
TAR_BLOCK = 512
TAR_END = bytes(2 * TAR_BLOCK)  # the end-of-archive marker


def _tar_member(name: str, data: bytes, mtime: float) -> bytes:
    # Fixed owner and mode, so the same rows always give the same tar bytes.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(mtime), 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    return header + data + bytes(-len(data) % TAR_BLOCK)


def webdataset_sample(row: dict[str, Any], image: bytes, control: bytes | None = None) -> bytes:
    """The tar members of one metadata row's sample; the image's data starts
    :data:`TAR_BLOCK` bytes in (a member name of up to 100 bytes has a one-block header).
    ``control``: the row's control map (``--save-control``), a member right after the image
    (:func:`control_name`), its data at :func:`tar_control_offset`."""
    stem = row["image_name"].split(".", 1)[0]
    created = row.get("created_at")
    if isinstance(created, str):
        created = parse_time(created)
    mtime = created.timestamp() if isinstance(created, dt.datetime) else 0
    values = {k: v.isoformat() if isinstance(v, dt.datetime) else v for k, v in row.items()}
    meta = json.dumps(values, ensure_ascii=False).encode()
    return (
        _tar_member(row["image_name"], image, mtime)
        + (_tar_member(control_name(row["row_id"]), control, mtime) if control is not None else b"")
        + _tar_member(f"{stem}.json", meta, mtime)
        + _tar_member(f"{stem}.txt", row["prompt"].encode(), mtime)
    )


def tar_control_offset(image_offset: int, image_bytes: int) -> int:
    """Where a control map's data lies in a webdataset tar: its member (one header block)
    follows the image member, whose data starts at ``image_offset`` and is padded to blocks."""
    return image_offset + image_bytes + (-image_bytes % TAR_BLOCK) + TAR_BLOCK
