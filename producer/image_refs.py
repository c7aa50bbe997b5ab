"""Conditioning images named by a source's rows: resolved to the manifest's references
(:data:`fewstep.contract.CONDITION_MANIFEST`) and checked before anything is enqueued.

What a row's image value may be, and what it becomes (``cond_ref``):

- an absolute local path, or ``file:///abs/path``: ``file:///abs/path`` (the worker must see the
  same path: same machine or a shared mount; use S3 otherwise);
- a relative path: joined to ``--image-root`` (a local folder or an ``s3://bucket/prefix/``),
  else to the folder of the prompt file itself (the spec's ``conditioning.image_root`` records
  which). A relative path may not climb out of its root (``../``): such a row is refused;
- an ``s3://bucket/key`` URL: itself;
- image bytes in a parquet column (plain binary, or HF datasets' ``{"bytes", "path"}`` struct;
  a struct with no bytes but a path is read as that path): written once per shard beside the
  manifest (:func:`fewstep.contract.condition_images_key`), ``cond_row`` its row there, and
  ``cond_sha256`` their sha256. A manifest never holds image bytes.

Every image is checked by a thread pool, without decoding pixels: it exists (stat, or S3
HEAD); its header parses (PIL ``Image.open`` on its first bytes: the format is known and the
size is sane); and it is not cut short: a PNG must end with its IEND chunk, a JPEG with its
end-of-image marker (within the last KiB), a GIF with its trailer, a WebP must be as long as
its RIFF header says. That is two or three small reads per image (ranged GETs on S3), so
checking a million images does not read a million images. Rows that fail are counted as
``missing_images`` or ``unreadable_images``; without ``--skip-missing-images`` the first one
stops the enqueue with a line naming its row and its path.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
from PIL import Image

import fewstep.jpegxl  # noqa: F401  (Pillow reads JPEG XL headers: a jxl job's images as conditioning)
from fewstep import UserError
from fewstep.contract import CONDITION_MANIFEST, IMAGE_STRUCT
from fewstep.settings import defaults
from fewstep.storage import KeyMissing, S3Store, StorageAccessError, StorageError

#: The manifest's reference columns, in order.
REF_COLUMNS = tuple(f.name for f in CONDITION_MANIFEST)
REF_SCHEMA = pa.schema(list(CONDITION_MANIFEST))
#: Batch column (inside the producer only) with the image bytes a source held, until the shard
#: writer puts them in the shard's sidecar.
BYTES_COLUMN = "__cond_image__"
#: Batch column (inside the producer only) with a parquet image column's raw values.
VALUES_COLUMN = "__image_values__"
MISSING, UNREADABLE = "missing_images", "unreadable_images"
_TAIL = 1024


@dataclass
class Found:
    """One row's image: where it is, and what the check found (``problem``: None when fine)."""

    ref: str | None = None
    offset: int | None = None
    length: int | None = None
    row: int | None = None
    sha256: str | None = None
    source: str | None = None
    data: bytes | None = None
    problem: str | None = None
    reason: str = ""

    def refs(self) -> tuple:
        return self.ref, self.offset, self.length, self.row, self.sha256, self.source

    def where(self) -> str:
        if self.ref and self.ref.startswith("file://"):
            place = self.ref.removeprefix("file://")
        else:
            place = self.ref or self.source or "(no image named)"
        if self.offset is not None:
            place += f" (bytes {self.offset:,} to {self.offset + (self.length or 0) - 1:,})"
        if self.row is not None:
            place += f" (row {self.row})"
        return place


def image_base(root: str | None, location: str | None) -> str | None:
    """Where relative image paths start: ``--image-root`` (``root``), else the folder of the
    prompt file at ``location`` (local or S3); None when neither is known. Local folders are
    absolute, S3 prefixes end with ``/``."""
    if root is None:
        if location and location.startswith("s3://"):
            root = location.rsplit("/", 1)[0]
        elif location and "://" not in location and not location.startswith("hf:"):
            root = os.path.dirname(os.path.abspath(os.path.expanduser(location)))
        else:
            return None  # https or the Hub: no folder to read images from
    if root.startswith("s3://"):
        if not urlsplit(root).netloc:
            raise UserError(f"invalid --image-root {root!r}: expected s3://BUCKET/PREFIX")
        return root.rstrip("/") + "/"
    if "://" in root:
        raise UserError(f"--image-root {root!r}: use a local folder or s3://BUCKET/PREFIX")
    folder = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(folder):
        raise UserError(f"--image-root {root}: no such folder")
    return folder


class _Objects:
    """Sizes and byte ranges of ``file://`` and ``s3://`` objects, from any thread."""

    def __init__(self) -> None:
        self._stores: dict[str, S3Store] = {}
        self._lock = threading.Lock()

    def _s3(self, url: str) -> tuple[S3Store, str]:
        parts = urlsplit(url)
        with self._lock:
            store = self._stores.get(parts.netloc)
            if store is None:
                store = self._stores[parts.netloc] = S3Store(parts.netloc)
        return store, parts.path.lstrip("/")

    def size(self, ref: str) -> int:
        if ref.startswith("s3://"):
            store, key = self._s3(ref)
            return store.size(key)
        return os.stat(ref.removeprefix("file://")).st_size

    def read(self, ref: str, start: int, length: int) -> bytes:
        if ref.startswith("s3://"):
            store, key = self._s3(ref)
            return store.get_range(key, start, length)
        with open(ref.removeprefix("file://"), "rb") as f:
            f.seek(start)
            return f.read(length)


def _magic(head: bytes) -> str | None:
    """The format an image's first bytes announce, for the formats with an end marker."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8"):
        return "JPEG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def cut_short(head: bytes, tail: bytes, size: int) -> str | None:
    """Why an image whose first bytes are ``head`` and last ``tail`` (of ``size``) is
    incomplete, or None when its format's end marker is there (or the format has none)."""
    image_format = _magic(head)
    if image_format == "PNG" and b"IEND" not in tail[-64:]:
        return "cut short: no PNG end chunk"
    if image_format == "JPEG" and b"\xff\xd9" not in tail:
        return "cut short: no JPEG end-of-image marker"
    if image_format == "GIF" and not tail.rstrip(b"\0\r\n ").endswith(b";"):
        return "cut short: no GIF trailer"
    if image_format == "WEBP" and int.from_bytes(head[4:8], "little") + 8 > size:
        return "cut short: shorter than its RIFF header says"
    return None


def _header(data: bytes) -> None:
    """Parse an image's header with PIL (its first bytes); raises when PIL reads none."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # decompression-bomb warnings: the worker's pixel limit decides
        with Image.open(io.BytesIO(data)) as image:
            if image.width < 1 or image.height < 1:
                raise ValueError("zero-sized image")


class ImageRefs:
    """Resolves and checks the conditioning image of each row of selected batches.

    ``column``: the batch column holding each row's image value (a path, URL, bytes or HF
    image struct), or None when the batches already carry the reference columns (another
    job's images, ``producer enqueue job``). ``base``: where relative paths start.
    """

    def __init__(self, column: str | None, base: str | None, *, skip: bool, label: str = "image"):
        config = defaults()["conditioning"]
        self.column = column
        self.base = base
        self.skip = skip
        self.label = label
        self.header_bytes = int(config["header_bytes"])
        self.counts = {MISSING: 0, UNREADABLE: 0}
        self.examples: list[str] = []
        self._objects = _Objects()
        self._pool = ThreadPoolExecutor(int(config["check_threads"]), thread_name_prefix="image-check")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ImageRefs:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- resolving ----------------------------------------------------------------------

    def resolve(self, value: Any, source_row: int) -> Found:
        """Where a row's image value points (not yet checked)."""
        if isinstance(value, dict):  # HF datasets' Image: {"bytes", "path"}
            if value.get("bytes") is not None:
                return Found(
                    source=value.get("path") or f"{self.label} of source row {source_row}",
                    data=value["bytes"],
                )
            value = value.get("path")
        if isinstance(value, bytes):
            return Found(source=f"{self.label} of source row {source_row}", data=value)
        if value is None or not str(value).strip():
            return Found(problem=MISSING, reason="no image named")
        text = str(value)
        if text.startswith("s3://"):
            return Found(ref=text, source=text)
        if text.startswith("file://"):
            path = text.removeprefix("file://")
        elif "://" in text:
            return Found(source=text, problem=UNREADABLE, reason="not a local path or an s3:// URL")
        elif os.path.isabs(text):
            path = text
        else:
            relative = posixpath.normpath(text.replace(os.sep, "/"))
            if relative == ".." or relative.startswith("../"):
                return Found(
                    source=text,
                    problem=UNREADABLE,
                    reason="the relative path climbs out of its root with '..'",
                )
            if self.base is None:
                raise UserError(
                    f"source row {source_row}: image path {text!r} is relative and this source has no "
                    "folder to start from: pass --image-root DIR|s3://BUCKET/PREFIX"
                )
            if self.base.startswith("s3://"):
                return Found(ref=self.base + relative, source=text)
            path = os.path.join(self.base, relative)
        return Found(ref="file://" + os.path.normpath(path), source=text)

    # --- checking -----------------------------------------------------------------------

    def check(self, found: Found) -> Found:
        """``found`` with ``problem`` set when its image is missing or unreadable."""
        if found.problem:
            return found
        try:
            problem = self._probe(found)
        except (FileNotFoundError, NotADirectoryError, KeyMissing):
            found.problem, found.reason = MISSING, "not found"
            return found
        except (StorageAccessError, PermissionError):
            problem = "access denied"
        except IsADirectoryError:
            problem = "is a directory"
        except StorageError as e:
            raise UserError(f"cannot check conditioning image {found.where()}: {e}") from None
        except OSError as e:
            problem = f"cannot read it ({e.strerror or e})"
        except ValueError as e:  # an S3 key storage refuses (``..`` segments, too long)
            problem = str(e)
        if problem:
            found.problem, found.reason = UNREADABLE, problem
        return found

    def _probe(self, found: Found) -> str | None:
        if found.data is not None:
            data = found.data
            found.sha256 = hashlib.sha256(data).hexdigest()
            return self._image_problem(data[: self.header_bytes], data[-_TAIL:], len(data), lambda: data)
        ref = found.ref
        assert ref is not None
        size = self._objects.size(ref)
        if (
            found.row is not None
        ):  # a row of another job's parquet: the object exists, the worker checks the sha256
            return None
        start, length = (found.offset, found.length) if found.offset is not None else (0, size)
        if length is None or start + length > size:
            return f"the object has {size:,} bytes, too few for the span named"
        if length == 0:
            return "empty file"
        head = self._objects.read(ref, start, min(length, self.header_bytes))
        tail = (
            head[-_TAIL:] if length <= len(head) else self._objects.read(ref, start + length - _TAIL, _TAIL)
        )
        return self._image_problem(head, tail, length, lambda: self._objects.read(ref, start, length))

    def _image_problem(self, head: bytes, tail: bytes, size: int, whole) -> str | None:
        cut = cut_short(head, tail, size)
        if cut:
            return cut
        try:
            _header(head)
        except Image.DecompressionBombError:
            return "more pixels than PIL's decompression-bomb limit"
        except Exception:  # PIL raises many kinds on bad headers
            if size <= len(head):
                return "not an image PIL can read"
            try:  # a header longer than the first piece (large EXIF or ICC blocks; WebP reads all)
                _header(whole())
            except Exception:
                return "not an image PIL can read"
        return None

    # --- batches ------------------------------------------------------------------------

    def attach(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """``batch`` with the reference columns (and the bytes the source held), less the rows
        whose image is missing or unreadable when skipping them (else a :class:`UserError`)."""
        if batch.num_rows == 0:
            return batch
        rows = batch.column("source_row").to_pylist()
        if self.column is None:
            refs = zip(*(batch.column(c).to_pylist() for c in REF_COLUMNS), strict=True)
            found = [Found(*values) for values in refs]
        else:
            found = [
                self.resolve(v, r) for v, r in zip(batch.column(self.column).to_pylist(), rows, strict=True)
            ]
        found = list(self._pool.map(self.check, found))
        keep = []
        for f, row in zip(found, rows, strict=True):
            keep.append(f.problem is None)
            if f.problem is None:
                continue
            self.counts[f.problem] += 1
            what = "missing" if f.problem == MISSING else f"unreadable ({f.reason})"
            line = f"source row {row}: conditioning image {what}: {f.where()}"
            if len(self.examples) < 5:
                self.examples.append(line)
            if not self.skip:
                raise UserError(
                    f"{line}; pass --skip-missing-images to skip rows whose image is missing or unreadable"
                )
        names = [n for n in batch.schema.names if n not in REF_COLUMNS and n != BYTES_COLUMN]
        kept = [f for f, k in zip(found, keep, strict=True) if k]
        refs = pa.Table.from_pylist(
            [dict(zip(REF_COLUMNS, f.refs(), strict=True)) for f in kept], schema=REF_SCHEMA
        )
        images = pa.array(
            [None if f.data is None else {"bytes": f.data, "path": f.source} for f in kept], IMAGE_STRUCT
        )
        mask = pa.array(keep)
        columns = [batch.column(n).filter(mask) for n in names]
        columns += [refs.column(c).combine_chunks() for c in REF_COLUMNS] + [images]
        return pa.RecordBatch.from_arrays(columns, names=[*names, *REF_COLUMNS, BYTES_COLUMN])
