"""Where a source's bytes come from: a local path, ``s3://``, ``hf://`` or ``https://``.

Every location opens as a binary file object. Local files, S3 objects, Hugging Face
files and https servers that answer range requests are seekable: streams are read in
pieces of 8 MiB, parquet asks for exactly the column chunk pieces it needs (unbuffered);
an https server without range support is read as one stream. S3 uses the storage credentials (``AWS_*``, see
``fewstep.storage``); the Hub is reached only through ``huggingface_hub``.
"""

from __future__ import annotations

import io
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from fewstep import UserError
from fewstep.settings import redact_url
from fewstep.storage import KeyMissing, RangedFile, S3Store, StorageError

PIECE = 8 << 20
_TIMEOUT = 30


def is_url(location: str) -> bool:
    """An ``http://`` or ``https://`` location."""
    return location.startswith(("http://", "https://"))


def is_remote(location: str) -> bool:
    """A location that is not a local path."""
    return is_url(location) or location.startswith(("s3://", "hf://"))


def display_name(location: str) -> str:
    """The location as it may appear in messages and job specs: absolute, no credentials."""
    if is_url(location):
        return redact_url(location)
    if is_remote(location):
        return location
    return os.path.abspath(os.path.expanduser(location))


def base_name(location: str) -> str:
    """The last path segment (``metadata.parquet``), for messages."""
    return (
        urlsplit(location).path.rstrip("/").rsplit("/", 1)[-1] if is_remote(location) else Path(location).name
    )


def _buffered(raw: io.RawIOBase, buffered: bool) -> BinaryIO:
    return io.BufferedReader(raw, buffer_size=PIECE) if buffered else raw


# --- local -------------------------------------------------------------------------


def _open_local(location: str, what: str) -> BinaryIO:
    path = Path(location.removeprefix("file://")).expanduser()
    try:
        return open(path, "rb")  # the caller closes it
    except FileNotFoundError:
        raise UserError(f"{what} file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{what} path is a directory, expected a file: {path}") from None
    except PermissionError:
        raise UserError(f"{what} file is not readable (permission denied): {path}") from None
    except OSError as e:
        raise UserError(f"cannot read {what} file {path}: {e.strerror}") from None


# --- S3 ------------------------------------------------------------------------------


def _s3_parts(location: str) -> tuple[S3Store, str]:
    parts = urlsplit(location)
    key = parts.path.lstrip("/")
    if not parts.netloc:
        raise UserError(f"invalid S3 location {location!r}: expected s3://BUCKET/KEY")
    return S3Store(parts.netloc), key


def _open_s3(location: str, what: str, buffered: bool) -> BinaryIO:
    store, key = _s3_parts(location)
    try:
        size = store.size(key)
    except KeyMissing:
        raise UserError(f"{what} not found: {location}") from None
    except (StorageError, ValueError) as e:
        raise UserError(f"cannot read {what} {location}: {e}") from None
    return _buffered(RangedFile(size, lambda start, n: store.get_range(key, start, n), location), buffered)


# --- Hugging Face Hub ------------------------------------------------------------------


def hub_offline_hint(location: str) -> str:
    """The one line for a Hub location that cannot be reached: it names ``--path``."""
    return (
        f"cannot reach the Hugging Face Hub for {location} "
        f"({'HF_HUB_OFFLINE is set' if _hub_offline() else 'offline?'}): "
        "download the file and pass --path with the local copy"
    )


def _hub_offline() -> bool:
    from huggingface_hub import is_offline_mode

    return is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _hub_fs():
    from huggingface_hub import HfFileSystem

    return HfFileSystem()


def _open_hf(location: str, what: str) -> BinaryIO:
    if _hub_offline():
        raise UserError(hub_offline_hint(location))
    try:
        return _hub_fs().open(location.removeprefix("hf://"), "rb", block_size=PIECE)
    except FileNotFoundError:
        raise UserError(f"{what} not found on the Hugging Face Hub: {location}") from None
    except Exception as e:  # httpx, hub and fsspec errors all mean "cannot read it"
        if type(e).__name__ in ("EntryNotFoundError", "RepositoryNotFoundError", "RevisionNotFoundError"):
            raise UserError(f"{what} not found on the Hugging Face Hub: {location}") from None
        raise UserError(f"{hub_offline_hint(location)} ({type(e).__name__})") from None


# --- https ---------------------------------------------------------------------------------


def _http_error(location: str, what: str, e: Exception) -> UserError:
    if isinstance(e, urllib.error.HTTPError) and e.code == 404:
        return UserError(f"{what} not found: {redact_url(location)} (HTTP 404)")
    reason = getattr(e, "reason", e)
    return UserError(
        f"cannot fetch {what} from {redact_url(location)}: {reason} (offline? pass --path with a local copy)"
    )


def _open_https(location: str, what: str, buffered: bool) -> BinaryIO:
    try:
        with urllib.request.urlopen(urllib.request.Request(location, method="HEAD"), timeout=_TIMEOUT) as r:
            size = r.headers.get("Content-Length")
            ranges = r.headers.get("Accept-Ranges", "").lower() == "bytes"
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise _http_error(location, what, e) from None
    if ranges and size and size.isdigit():

        def fetch(start: int, length: int) -> bytes:
            request = urllib.request.Request(
                location, headers={"Range": f"bytes={start}-{start + length - 1}"}
            )
            try:
                with urllib.request.urlopen(request, timeout=_TIMEOUT) as response:
                    if response.status != 206:
                        raise UserError(f"{redact_url(location)} ignored a range request")
                    return response.read()
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                raise _http_error(location, what, e) from None

        return _buffered(RangedFile(int(size), fetch, redact_url(location)), buffered)
    try:
        return urllib.request.urlopen(location, timeout=_TIMEOUT)
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise _http_error(location, what, e) from None


# --- public ------------------------------------------------------------------------------


def open_binary(location: str, *, what: str = "source", buffered: bool = True) -> BinaryIO:
    """A binary file object for a local path, ``s3://``, ``hf://`` or ``http(s)://`` location.

    ``buffered=False``: each read of a remote file is one request for exactly those bytes.
    """
    if is_url(location):
        return _open_https(location, what, buffered)
    if location.startswith("s3://"):
        return _open_s3(location, what, buffered)
    if location.startswith("hf://"):
        return _open_hf(location, what)
    return _open_local(location, what)


def open_seekable(location: str, *, what: str = "source", buffered: bool = True) -> BinaryIO:
    """Like :func:`open_binary`, but always seekable: a one-way stream is spooled to a temporary file."""
    stream = open_binary(location, what=what, buffered=buffered)
    if stream.seekable():
        return stream
    spool = tempfile.TemporaryFile()  # noqa: SIM115 - returned to the caller
    with stream:
        while chunk := stream.read(PIECE):
            spool.write(chunk)
    spool.seek(0)
    return spool


def read_bytes(location: str, *, what: str = "source") -> bytes:
    """The whole content of a location (small files: PartiPrompts, one JSON part)."""
    with open_binary(location, what=what) as f:
        try:
            return f.read()
        except OSError as e:
            raise UserError(f"cannot read {what} {display_name(location)}: {e}") from None


def list_folder(location: str, suffixes: tuple[str, ...], *, what: str = "source") -> list[str]:
    """The files under a folder (local, ``s3://`` prefix or ``hf://`` folder) ending in ``suffixes``,
    as locations, sorted by path."""
    if location.startswith("s3://"):
        store, prefix = _s3_parts(location)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        try:
            keys = [key for key, _size in store.list(prefix)]
        except StorageError as e:
            raise UserError(f"cannot list {what} {location}: {e}") from None
        return sorted(f"s3://{store.bucket}/{k}" for k in keys if k.endswith(suffixes))
    if location.startswith("hf://"):
        if _hub_offline():
            raise UserError(hub_offline_hint(location))
        try:
            found = _hub_fs().find(location.removeprefix("hf://"))
        except Exception as e:  # see _open_hf
            raise UserError(f"{hub_offline_hint(location)} ({type(e).__name__})") from None
        return sorted(f"hf://{p}" for p in found if p.endswith(suffixes))
    if is_url(location):
        raise UserError(f"cannot list a folder over http(s): {redact_url(location)}; pass a file")
    root = Path(location).expanduser()
    if not root.is_dir():
        raise UserError(f"{what} folder not found: {root}")
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and p.name.endswith(suffixes))
