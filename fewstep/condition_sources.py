"""Reading an image-conditioned row's image by the manifest's reference columns
(:data:`fewstep.contract.CONDITION_MANIFEST`): the worker's conditioning stage and
``producer gallery`` (a job's conditioning images) read them the same way.

``cond_ref`` is ``file:///path``, ``s3://bucket/key`` or a key relative to the job root (the
sidecar of bytes the source held). ``cond_offset``/``cond_length`` ask for a ranged read (one
image in another job's tar); ``cond_row`` for a row of a parquet's ``image`` column (the
sidecar, or another job's parquet layout), read one row group at a time through ranged
reads, never the whole file. No torch, no decoding: bytes only.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from fewstep.storage import LocalStore, RangedFile, Store, open_store


class ConditionSources:
    """Reads conditioning bytes by reference, for one job (its store resolves relative keys).

    Stores are opened once per bucket or folder; the parquet files rows are read from keep
    their footer, and the last row group read is kept (rows of one group come together).
    """

    def __init__(self, job_store: Store):
        self.job_store = job_store
        self._stores: dict[str, Store] = {}
        self._lock = threading.Lock()
        self._parquets: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._group: tuple[tuple[str, str, int], list] | None = None

    def locate(self, ref: str) -> tuple[Store, str]:
        """The store and key ``cond_ref`` names."""
        parts = urlsplit(ref)
        if parts.scheme == "file" or ref.startswith("/"):  # file:///abs/path, or a bare absolute path
            path = Path(unquote(parts.path) if parts.scheme else ref)
            return self._store(str(path.parent), lambda: LocalStore(path.parent)), path.name
        if parts.scheme == "s3":
            bucket = parts.netloc
            return self._store(f"s3://{bucket}", lambda: open_store(f"s3://{bucket}")), parts.path.lstrip("/")
        if parts.scheme:
            raise ValueError(f"unsupported reference {ref!r}")
        return self.job_store, ref

    def _store(self, name: str, make) -> Store:
        with self._lock:
            if name not in self._stores:
                self._stores[name] = make()
            return self._stores[name]

    def read(self, row: dict[str, Any]) -> bytes:
        """The image bytes a manifest row names."""
        store, key = self.locate(row["cond_ref"])
        if row.get("cond_row") is not None:
            return self._parquet_image(store, key, int(row["cond_row"]))
        if row.get("cond_offset") is not None:
            data = store.get_range(key, int(row["cond_offset"]), int(row["cond_length"]))
            if len(data) != int(row["cond_length"]):
                raise ValueError(
                    f"{len(data)} bytes at offset {row['cond_offset']}, not {row['cond_length']}"
                )
            return data
        return store.get(key)

    def _parquet_image(self, store: Store, key: str, index: int) -> bytes:
        import pyarrow.parquet as pq

        name = (store.url, key)
        with self._lock:  # a parquet file object reads from one position at a time
            parquet = self._parquets.get(name)
            if parquet is None:
                parquet = self._parquets[name] = pq.ParquetFile(
                    RangedFile(
                        store.size(key), lambda start, n, s=store, k=key: s.get_range(k, start, n), key
                    )
                )
                while len(self._parquets) > 4:
                    self._parquets.popitem(last=False)
            start = 0
            for group in range(parquet.metadata.num_row_groups):
                rows = parquet.metadata.row_group(group).num_rows
                if index < start + rows:
                    break
                start += rows
            else:
                raise ValueError(f"row {index} is beyond the {start} rows of the parquet")
            if self._group is None or self._group[0] != (*name, group):
                images = parquet.read_row_group(group, columns=["image"]).column("image").to_pylist()
                self._group = ((*name, group), images)
            image = self._group[1][index - start]
        if not image or image.get("bytes") is None:
            raise ValueError(f"row {index} of the parquet holds no image bytes")
        return image["bytes"]
