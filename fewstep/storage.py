"""Object storage: S3-compatible buckets (AWS, MinIO, SeaweedFS) or a local directory.

A :class:`Store` is rooted at a URL (``s3://bucket/prefix`` or a local path) and
addresses objects by keys relative to that root. S3 is configured by boto3's
standard variables (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``); error
messages name the endpoint and bucket, never the credentials.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import logging
import os
import random
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

import boto3
import botocore.exceptions as bex
from botocore.config import Config

from fewstep import UserError
from fewstep.settings import defaults

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("fewstep.storage")

T = TypeVar("T")

# Error codes S3-compatible servers use to say "slow down": retried like 5xx.
_THROTTLING = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestTimeout"}
)
# Backoff between whole-call retries (botocore's own retries come first, within each call).
_FIRST_WAIT = 0.5
_MAX_WAIT = 8.0
# Set when retrying is pointless (a worker's shutdown grace is over): calls fail at once.
_stop_retrying = threading.Event()
# Backends (endpoint and bucket) whose last call used up its whole retry window and failed:
# until a call to one succeeds, calls to it are tried once and not retried. A worker serves
# many jobs one task at a time; without this, every delivery of a shard whose storage is down
# would hold the task thread for ``retry_seconds`` per call, and the shards of jobs on other
# storage would wait behind it for the whole outage.
_unavailable: set[str] = set()
_unavailable_lock = threading.Lock()


def stop_retrying() -> None:
    """Make every storage call of this process give up instead of waiting to retry, from now on.

    A worker whose shutdown grace is over must not sit out a storage outage: what it could
    not write is left to the next attempt (and to ``producer reconcile``).
    """
    _stop_retrying.set()


class KeyMissing(KeyError):
    """The object does not exist."""


class StorageError(RuntimeError):
    """Storage refused or failed an operation."""


class StorageUnavailable(StorageError):
    """Storage stayed unreachable, failing (5xx), throttling or timing out through bounded retries."""


class StorageAccessError(UserError):
    """Storage refuses this client: no or wrong credentials, or TLS failure. A configuration error."""


class ConditionalWritesIgnored(StorageAccessError):
    """The backend does not honour ``If-None-Match: *``: two racing attempts could both commit.

    A configuration error like a refused credential: a worker stops rather than fail (and
    so drain) every shard, and ``producer enqueue`` queues nothing.
    """


def _check_key(key: str) -> str:
    # Keys come from ids, never from data; this guards the invariant.
    if not key or key.startswith("/") or "\x00" in key or ".." in key.split("/"):
        raise ValueError(f"refusing unsafe storage key {key!r}")
    if len(key.encode()) > 900:
        raise ValueError("storage key longer than 900 bytes")
    return key


def join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


class Store:
    """Objects under one root URL."""

    url: str

    @property
    def backend(self) -> str:
        """Where the objects live, for messages and per-backend caches (never credentials)."""
        raise NotImplementedError

    def child(self, name: str) -> Store:
        """The store rooted at ``{url}/{name}``."""
        raise NotImplementedError

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Write an object; with ``if_absent``, only if no object has that key.

        Returns False when ``if_absent`` and the key already existed (nothing written).
        """
        raise NotImplementedError

    def get(self, key: str) -> bytes:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """(key, size) of every object under ``prefix``, keys relative to the root."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def folders(self) -> Iterator[str]:
        """Names of the folders directly under the root (one listing level, not every key)."""
        raise NotImplementedError

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes of the object from offset ``start`` (one image inside a tar)."""
        raise NotImplementedError

    def size(self, key: str) -> int:
        """The object's size in bytes (:class:`KeyMissing` if absent)."""
        raise NotImplementedError

    def upload(self, key: str, part_bytes: int) -> Upload:
        """A streamed write of ``key``: the object appears only when :meth:`Upload.finish` returns."""
        raise NotImplementedError

    def delete_many(self, keys: list[str]) -> int:
        """Delete these objects (S3: ``DeleteObjects``, up to 1,000 keys a request); how many."""
        for key in keys:
            self.delete(key)
        return len(keys)

    def pending_uploads(self, prefix: str = "") -> Iterator[PendingUpload]:
        """Unfinished streamed writes under ``prefix``: S3 multipart uploads, or a local
        directory's temporary files. Which of them may be aborted is the caller's proof to make."""
        raise NotImplementedError

    def abort_upload(self, upload: PendingUpload) -> bool:
        """Abort one unfinished upload; False when it is gone already (finished or aborted)."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise :class:`UserError` when the store is unreachable or unusable."""
        raise NotImplementedError

    def url_of(self, key: str) -> str:
        return f"{self.url.rstrip('/')}/{key}"


@dataclass(frozen=True)
class PendingUpload:
    """An unfinished upload of ``key``, started at ``initiated`` (the storage's own clock)."""

    key: str
    handle: str  # S3's UploadId, or the temporary file's path
    initiated: dt.datetime


class Upload:
    """An object written as a stream, at most ``part_bytes`` held in memory.

    Bytes are buffered up to one part; each full part is sent (S3 multipart upload). An
    object smaller than one part is written with one PUT by :meth:`finish`. Until
    :meth:`finish` returns nothing is visible at the key: a writer killed midway leaves an
    unfinished multipart upload (or a temporary file), never a partial object.
    """

    def __init__(self, key: str, part_bytes: int):
        self.key = key
        self.part_bytes = part_bytes
        self.requests = 0  # storage requests made so far
        self._buffer = bytearray()
        self._written = 0
        self.closed = False

    def write(self, data: bytes) -> int:
        """Append ``data``; sends every part that fills up."""
        self._buffer += data
        self._written += len(data)
        while len(self._buffer) >= self.part_bytes:
            self.send_part(bytes(self._buffer[: self.part_bytes]))
            del self._buffer[: self.part_bytes]
        return len(data)

    def tell(self) -> int:
        """Bytes written so far: the offset the next write starts at."""
        return self._written

    def flush(self) -> None:
        """Nothing to do: parts are sent when full (a file-like object's method)."""

    def close(self) -> None:
        """Mark closed; what was written becomes the object only with :meth:`finish`."""
        self.closed = True

    @property
    def started(self) -> bool:
        """Whether a part was sent already (the upload is under way in storage)."""
        raise NotImplementedError

    def finish(self) -> int:
        """Send what is left and make the object; returns its size."""
        raise NotImplementedError

    def abort(self) -> None:
        """Drop the upload: no object is made."""
        raise NotImplementedError

    def send_part(self, part: bytes) -> None:
        """Send one part now (the first one starts the upload); :meth:`write` calls it as parts
        fill, and a writer that sends parts from a thread of its own calls it directly."""
        raise NotImplementedError


def read_table(store: Store, key: str, columns: list[str] | None = None) -> pa.Table:
    """The parquet object ``key`` as a table (only ``columns`` when given); :class:`KeyMissing` if absent."""
    import pyarrow.parquet as pq  # here: most users of storage never read parquet

    return pq.read_table(io.BytesIO(store.get(key)), columns=columns)


# --- S3 ------------------------------------------------------------------------


def _s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


@cache
def _s3_client(endpoint: str | None, region: str, max_attempts: int, credentials: tuple[str, str] | None):
    cfg = defaults()["storage"]
    config = Config(
        retries={"max_attempts": max_attempts, "mode": "standard"},
        connect_timeout=cfg["connect_timeout"],
        read_timeout=cfg["read_timeout"],
        max_pool_connections=32,
        # Self-hosted servers (MinIO, SeaweedFS) want path-style addressing.
        s3={"addressing_style": "path" if endpoint else "auto"},
        signature_version="s3v4",
    )
    keys = (
        {"aws_access_key_id": credentials[0], "aws_secret_access_key": credentials[1]} if credentials else {}
    )
    session = boto3.session.Session()
    client = session.client("s3", endpoint_url=endpoint, region_name=region, config=config, **keys)
    client.meta.events.register("before-send.s3", _count_request)
    return client


class _Requests:
    """HTTP requests this process sent to S3 (retries included), for per-shard stats."""

    count = 0
    lock = threading.Lock()


def _count_request(**_kwargs) -> None:
    with _Requests.lock:
        _Requests.count += 1


def requests_sent() -> int:
    """How many requests this process has sent to S3 so far."""
    return _Requests.count


def s3_client(max_attempts: int | None = None):
    """A shared, thread-safe boto3 S3 client configured from the environment."""
    cfg = defaults()["storage"]
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or cfg["region"]
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    # Keyed by the credentials too, so a changed environment gets a new client; without
    # them in the environment boto3 finds its own (profiles, instance roles).
    credentials = (key, secret) if key and secret else None
    return _s3_client(_s3_endpoint(), region, max_attempts or int(cfg["max_attempts"]), credentials)


def _status(e: bex.ClientError) -> int | None:
    return e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


class S3Store(Store):
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        max_attempts: int | None = None,
        retry_seconds: float | None = None,
    ):
        if len(bucket) < 3:
            raise UserError(f"invalid bucket name {bucket!r}: bucket names have 3 or more characters")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._max_attempts = max_attempts
        self._retry_seconds = (
            float(defaults()["storage"]["retry_seconds"]) if retry_seconds is None else retry_seconds
        )
        self._client = s3_client(max_attempts)
        self.endpoint = self._client.meta.endpoint_url

    @property
    def backend(self) -> str:
        return f"S3 at {self.endpoint} (bucket {self.bucket!r})"

    def child(self, name: str) -> S3Store:
        return S3Store(
            self.bucket,
            join(self.prefix, name),
            max_attempts=self._max_attempts,
            retry_seconds=self._retry_seconds,
        )

    def _key(self, key: str) -> str:
        return join(self.prefix, _check_key(key))

    @contextlib.contextmanager
    def _errors(self, what: str):
        where = f"{self.endpoint} (bucket {self.bucket!r})"
        try:
            yield
        except bex.NoCredentialsError:
            raise StorageAccessError(
                f"no S3 credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ) from None
        except bex.SSLError as e:
            raise StorageAccessError(f"TLS to S3 at {self.endpoint} failed while {what}: {e}") from None
        except (bex.EndpointConnectionError, bex.ConnectTimeoutError) as e:
            raise StorageUnavailable(f"cannot reach S3 at {self.endpoint} while {what}: {e}") from None
        except (bex.ReadTimeoutError, bex.ConnectionClosedError) as e:
            raise StorageUnavailable(f"S3 at {self.endpoint} timed out while {what}: {e}") from None
        except (bex.ConnectionError, bex.HTTPClientError, bex.IncompleteReadError) as e:
            # Resets and truncated bodies, also while streaming a body (outside botocore's retries).
            raise StorageUnavailable(
                f"S3 at {self.endpoint} dropped the connection while {what}: {e}"
            ) from None
        except bex.ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            status = _status(e)
            if code in ("NoSuchBucket",) or (status == 404 and what == "checking the bucket"):
                raise UserError(f"bucket {self.bucket!r} does not exist at {self.endpoint}") from None
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
                raise StorageAccessError(
                    f"S3 at {self.endpoint} rejected the credentials for bucket "
                    f"{self.bucket!r} ({code or status})"
                ) from None
            # 501 Not Implemented is a permanent answer (e.g. an unsupported header), not an outage.
            if (status and status >= 500 and status != 501) or status == 429 or code in _THROTTLING:
                raise StorageUnavailable(f"S3 at {where} failed while {what}: {code} ({status})") from None
            raise StorageError(f"S3 at {where} refused {what}: {code} ({status})") from None

    def _call(self, what: str, operation: Callable[[], T]) -> T:
        """``operation`` with bounded retries while storage is unavailable.

        botocore's standard mode retries 5xx, throttling, timeouts and resets, but within
        about a second (50 ms base backoff) and not while a response body streams; a
        restarting server or a short outage needs longer. Past ``retry_seconds`` the
        :class:`StorageUnavailable` propagates: the worker then retries the task later. From
        then on until a call succeeds, calls to this backend are tried once (see
        ``_unavailable``): an outage costs a worker one retry window, not one per call.
        """
        deadline = time.monotonic() + (0 if self.backend in _unavailable else self._retry_seconds)
        wait = _FIRST_WAIT
        while True:
            try:
                with self._errors(what):
                    result = operation()
            except StorageUnavailable as e:
                # Another call may have used up its window meanwhile: the outage is known, stop.
                known = self.backend in _unavailable
                if _stop_retrying.is_set() or known or time.monotonic() + wait > deadline:
                    if self._retry_seconds > 0:  # a whole window failed (single tries prove nothing)
                        with _unavailable_lock:
                            _unavailable.add(self.backend)
                    raise
                log.info("%s; retrying in %.1fs", e, wait)
                _stop_retrying.wait(wait * (0.5 + random.random() / 2))
                wait = min(wait * 2, _MAX_WAIT)
            else:
                if self.backend in _unavailable:
                    with _unavailable_lock:
                        _unavailable.discard(self.backend)
                    log.info("%s is reachable again", self.backend)
                return result

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        kwargs = {"IfNoneMatch": "*"} if if_absent else {}
        full = self._key(key)

        def write() -> bool:
            try:
                self._client.put_object(Bucket=self.bucket, Key=full, Body=data, **kwargs)
            except bex.ClientError as e:
                if if_absent and _status(e) == 412:
                    return False  # the key exists: another writer owns it
                if if_absent and _status(e) == 409:
                    # A concurrent conditional write to this key is in progress; it may yet
                    # fail, so this is not an answer: ask again.
                    raise StorageUnavailable(f"conditional write of {key} in progress elsewhere") from None
                raise
            return True

        return self._call(f"writing {key}", write)

    def get(self, key: str) -> bytes:
        full = self._key(key)

        def read() -> bytes:
            try:
                return self._client.get_object(Bucket=self.bucket, Key=full)["Body"].read()
            except bex.ClientError as e:
                if _status(e) == 404:
                    raise KeyMissing(self.url_of(key)) from None
                raise

        return self._call(f"reading {key}", read)

    def size(self, key: str) -> int:
        """The object's size in bytes (:class:`KeyMissing` if absent)."""
        full = self._key(key)

        def head() -> int:
            try:
                return int(self._client.head_object(Bucket=self.bucket, Key=full)["ContentLength"])
            except bex.ClientError as e:
                if _status(e) == 404:
                    raise KeyMissing(self.url_of(key)) from None
                raise

        return self._call(f"looking up {key}", head)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes of the object from offset ``start``: reading large sources in pieces."""
        full, span = self._key(key), f"bytes={start}-{start + length - 1}"
        return self._call(
            f"reading {key}",
            lambda: self._client.get_object(Bucket=self.bucket, Key=full, Range=span)["Body"].read(),
        )

    def upload(self, key: str, part_bytes: int) -> S3Upload:
        return S3Upload(self, key, part_bytes)

    def exists(self, key: str) -> bool:
        full = self._key(key)

        def head() -> bool:
            try:
                self._client.head_object(Bucket=self.bucket, Key=full)
            except bex.ClientError as e:
                if _status(e) == 404:
                    return False
                raise
            return True

        return self._call(f"looking up {key}", head)

    def _pages(self, what: str, prefix: str, **args: str) -> Iterator[dict]:
        """The pages of ``list_objects_v2`` under ``prefix`` (a full key), each with bounded retries."""
        token: str | None = None
        while True:
            page_args = {
                "Bucket": self.bucket,
                "Prefix": prefix,
                **args,
                **({"ContinuationToken": token} if token else {}),
            }
            page = self._call(what, lambda a=page_args: self._client.list_objects_v2(**a))
            yield page
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        root = f"{self.prefix}/" if self.prefix else ""
        full = root + prefix if prefix else root
        for page in self._pages(f"listing {prefix or '/'}", full):
            for obj in page.get("Contents", []):
                yield obj["Key"][len(root) :], int(obj["Size"])

    def delete(self, key: str) -> None:
        full = self._key(key)
        self._call(f"deleting {key}", lambda: self._client.delete_object(Bucket=self.bucket, Key=full))

    def delete_many(self, keys: list[str]) -> int:
        for start in range(0, len(keys), 1000):
            batch = {"Objects": [{"Key": self._key(k)} for k in keys[start : start + 1000]], "Quiet": True}
            answer = self._call(
                f"deleting {len(batch['Objects'])} objects",
                lambda b=batch: self._client.delete_objects(Bucket=self.bucket, Delete=b),
            )
            if answer.get("Errors"):
                first = answer["Errors"][0]
                raise StorageUnavailable(
                    f"{len(answer['Errors'])} of {len(batch['Objects'])} deletions refused "
                    f"(first: {first.get('Key')}: {first.get('Code')})"
                )
        return len(keys)

    def pending_uploads(self, prefix: str = "") -> Iterator[PendingUpload]:
        root = f"{self.prefix}/" if self.prefix else ""
        markers: dict[str, str] = {}
        while True:
            args = {"Bucket": self.bucket, "Prefix": root + prefix, **markers}
            page = self._call(
                "listing multipart uploads", lambda a=args: self._client.list_multipart_uploads(**a)
            )
            for upload in page.get("Uploads", []):
                yield PendingUpload(upload["Key"][len(root) :], upload["UploadId"], upload["Initiated"])
            if not page.get("IsTruncated"):
                return
            markers = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}

    def abort_upload(self, upload: PendingUpload) -> bool:
        target = {"Bucket": self.bucket, "Key": self._key(upload.key), "UploadId": upload.handle}

        def abort() -> bool:
            try:
                self._client.abort_multipart_upload(**target)
            except bex.ClientError as e:
                if _status(e) == 404:  # NoSuchUpload: completed or aborted meanwhile
                    return False
                raise
            return True

        return self._call(f"aborting the upload of {upload.key}", abort)

    def folders(self) -> Iterator[str]:
        root = f"{self.prefix}/" if self.prefix else ""
        for page in self._pages("listing folders", root, Delimiter="/"):
            for common in page.get("CommonPrefixes", []):
                yield common["Prefix"][len(root) :].rstrip("/")

    def check(self) -> None:
        try:
            with self._errors("checking the bucket"):
                self._client.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
        except StorageError as e:
            raise UserError(str(e)) from None


class S3Upload(Upload):
    """A multipart upload, begun with the first full part; a single PUT if there is none."""

    def __init__(self, store: S3Store, key: str, part_bytes: int):
        super().__init__(key, part_bytes)
        self._store = store
        self._full = store._key(key)
        self._upload_id: str | None = None
        self._parts: list[dict] = []

    @property
    def started(self) -> bool:
        return self._upload_id is not None

    def send_part(self, part: bytes) -> None:
        store, client = self._store, self._store._client
        if self._upload_id is None:
            created = store._call(
                f"starting the upload of {self.key}",
                lambda: client.create_multipart_upload(Bucket=store.bucket, Key=self._full),
            )
            self._upload_id = created["UploadId"]
            self.requests += 1
        number = len(self._parts) + 1
        sent = store._call(
            f"writing part {number} of {self.key}",
            lambda: client.upload_part(
                Bucket=store.bucket, Key=self._full, UploadId=self._upload_id, PartNumber=number, Body=part
            ),
        )
        self._parts.append({"ETag": sent["ETag"], "PartNumber": number})
        self.requests += 1

    def finish(self) -> int:
        store = self._store
        if self._upload_id is None:
            store.put(self.key, bytes(self._buffer))
        else:
            if self._buffer:
                self.send_part(bytes(self._buffer))
            store._call(
                f"completing the upload of {self.key}",
                lambda: store._client.complete_multipart_upload(
                    Bucket=store.bucket,
                    Key=self._full,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts},
                ),
            )
        self.requests += 1
        self._buffer = bytearray()
        return self._written

    def abort(self) -> None:
        self._buffer = bytearray()
        if self._upload_id is not None:
            store, upload_id, self._upload_id = self._store, self._upload_id, None
            store._call(
                f"aborting the upload of {self.key}",
                lambda: store._client.abort_multipart_upload(
                    Bucket=store.bucket, Key=self._full, UploadId=upload_id
                ),
            )


# --- local directory ---------------------------------------------------------------


def _tmp_prefix(path: Path) -> str:
    """Temporary files are named after their key (``.tmp-<name>.<random>``): one left by a
    killed writer can be attributed to its attempt (:meth:`LocalStore.pending_uploads`)."""
    return f".tmp-{path.name}."


class LocalStore(Store):
    """A directory used like a bucket: atomic writes by rename, conditional writes by link."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.url = self.root.as_uri()
        self._lock = threading.Lock()

    @property
    def backend(self) -> str:
        return f"output directory {self.root}"

    def child(self, name: str) -> LocalStore:
        return LocalStore(self.root / _check_key(name))

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            if not if_absent:
                os.replace(tmp, path)
                return True
            try:
                os.link(tmp, path)  # fails if path exists: an atomic create-if-absent
            except FileExistsError:
                return False
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise KeyMissing(self.url_of(key)) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def get_range(self, key: str, start: int, length: int) -> bytes:
        try:
            with self._path(key).open("rb") as f:
                f.seek(start)
                return f.read(length)
        except FileNotFoundError:
            raise KeyMissing(self.url_of(key)) from None

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise KeyMissing(self.url_of(key)) from None

    def upload(self, key: str, part_bytes: int) -> LocalUpload:
        return LocalUpload(self._path(key), key, part_bytes)

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        # Walk only the folder the prefix names (a shard's images, not the whole job), and
        # of its subfolders only those the prefix's last part can match ("metadata" walks
        # metadata/, not images/).
        folder, _, start = prefix.rpartition("/")
        top = self.root / _check_key(folder) if "/" in prefix else self.root
        if not top.is_dir():
            return
        for dirpath, dirs, files in os.walk(top):
            if start and dirpath == str(top):
                dirs[:] = [d for d in dirs if d.startswith(start)]
            for name in sorted(files):
                if name.startswith(".tmp-"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, name), self.root).replace(os.sep, "/")
                if rel.startswith(prefix):
                    yield rel, os.path.getsize(os.path.join(dirpath, name))

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def folders(self) -> Iterator[str]:
        if self.root.is_dir():
            yield from sorted(e.name for e in os.scandir(self.root) if e.is_dir())

    def pending_uploads(self, prefix: str = "") -> Iterator[PendingUpload]:
        # A writer killed between writing its temporary file and renaming it leaves the file:
        # ``.tmp-<name>.<random>`` beside the key ``<name>`` it was to become.
        if not self.root.is_dir():
            return
        for path in sorted(self.root.rglob(".tmp-*")):
            rel = path.relative_to(self.root).parent.as_posix()
            name = path.name[len(".tmp-") :].rpartition(".")[0]
            key = f"{rel}/{name}" if rel != "." else name
            if not name or not key.startswith(prefix):
                continue
            with contextlib.suppress(FileNotFoundError):
                initiated = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC)
                yield PendingUpload(key, str(path), initiated)

    def abort_upload(self, upload: PendingUpload) -> bool:
        try:
            Path(upload.handle).unlink()
        except FileNotFoundError:
            return False
        return True

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot use output directory {self.root}: {e.strerror}") from None
        if not os.access(self.root, os.W_OK):
            raise UserError(f"output directory {self.root} is not writable")


class LocalUpload(Upload):
    """A temporary file in the target's folder, renamed to the key when finished."""

    def __init__(self, path: Path, key: str, part_bytes: int):
        super().__init__(key, part_bytes)
        self._path = path
        self._tmp: str | None = None

    @property
    def started(self) -> bool:
        return self._tmp is not None

    def send_part(self, part: bytes) -> None:
        if self._tmp is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            fd, self._tmp = tempfile.mkstemp(dir=self._path.parent, prefix=_tmp_prefix(self._path))
            os.close(fd)
        with open(self._tmp, "ab") as f:
            f.write(part)

    def finish(self) -> int:
        self.send_part(bytes(self._buffer))
        self._buffer = bytearray()
        os.replace(self._tmp, self._path)
        self._tmp = None
        return self._written

    def abort(self) -> None:
        self._buffer = bytearray()
        if self._tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)
            self._tmp = None


# --- conditional writes -----------------------------------------------------------

#: The conditional-write probe's key under the store it checks (deleted after): a file at the
#: top, so a local directory keeps no folder of it.
PROBE_PREFIX = ".fewstep-probe-"

_verified: set[str] = set()
_probe_locks: dict[str, threading.Lock] = {}
_probe_locks_guard = threading.Lock()


def check_conditional_writes(store: Store) -> None:
    """Raise :class:`ConditionalWritesIgnored` unless ``store``'s backend honours ``If-None-Match: *``.

    The commit protocol (and the job spec's create-if-absent) rely on a second
    ``put(..., if_absent=True)`` of a key being refused; a backend that ignores the header
    lets two racing attempts both "commit". The probe writes a unique key under ``store``
    twice and deletes it. A backend passes once per process (cached by
    :attr:`Store.backend`; threads checking the same backend wait for one probe); a failed
    check is not cached, so a fixed backend passes on the next try.
    """
    backend = store.backend
    if backend in _verified:
        return
    with _probe_locks_guard:
        lock = _probe_locks.setdefault(backend, threading.Lock())
    with lock:
        if backend in _verified:
            return
        _probe(store)
        _verified.add(backend)
        log.debug("%s honours conditional writes", backend)


def _probe(store: Store) -> None:
    key = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
    refused = (
        f"{store.backend} does not honour conditional writes (If-None-Match: *), so two racing "
        "attempts could both commit a shard; use a backend that does (AWS S3 and SeaweedFS do)"
    )
    try:
        try:
            first = store.put(key, b"probe 1", if_absent=True)
            second = store.put(key, b"probe 2", if_absent=True)
        except StorageUnavailable:
            raise
        except StorageError as e:  # the backend rejects the header itself (400, 501, ...)
            raise ConditionalWritesIgnored(f"{refused}: {e}") from None
    finally:
        with contextlib.suppress(StorageError, StorageAccessError):
            store.delete(key)
    if not first:
        raise ConditionalWritesIgnored(f"{refused}: a write of a new key was refused as if it existed")
    if second:
        raise ConditionalWritesIgnored(f"{refused}: a second write of one key was accepted")


def open_store(url: str, *, max_attempts: int | None = None, retry_seconds: float | None = None) -> Store:
    """The store for ``s3://bucket/prefix``, ``file:///path`` or a plain local path."""
    parts = urlsplit(url)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise UserError(f"invalid S3 URL {url!r}: expected s3://BUCKET/PREFIX")
        return S3Store(parts.netloc, parts.path, max_attempts=max_attempts, retry_seconds=retry_seconds)
    if parts.scheme == "file":
        return LocalStore(parts.path)
    if parts.scheme in ("", None) or len(parts.scheme) == 1:  # a path (or a Windows drive)
        return LocalStore(url)
    raise UserError(f"unsupported output URL {url!r}: use s3://BUCKET/PREFIX or a local directory")


class RangedFile(io.RawIOBase):
    """A read-only, seekable file over a ``fetch(start, length)`` function (S3, https ranges)."""

    def __init__(self, size: int, fetch: Callable[[int, int], bytes], name: str):
        self.size = size
        self.name = name
        self._fetch = fetch
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        length = min(len(buffer), self.size - self._pos)
        if length <= 0:
            return 0
        data = self._fetch(self._pos, length)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)
