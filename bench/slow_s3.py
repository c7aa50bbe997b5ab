"""A byte-forwarding HTTP proxy in front of S3 that holds chosen requests: slow storage.

Workers use ``http://127.0.0.1:<port>`` as their S3 endpoint. Every request is forwarded to
the upstream server byte for byte (SigV4 signs the Host the client used, and the proxy does
not change it), one request per connection: the proxy adds ``Connection: close`` to the
forwarded request (an unsigned header, which the server does not check) and to the final
response head, then relays bytes both ways until the server closes.

While :meth:`SlowStorage.slow_down` is active, a request of the kinds a slow or throttling
S3 makes late is held ``hold`` seconds before it is sent on: commit markers (PUT of
``metadata/part-N.parquet``), multipart part uploads (PUT with ``partNumber``) and LISTs
(GET of a bucket). A client whose read timeout is shorter gives up and retries while the
held request still reaches the server afterwards, as a response lost on the way would.
With the upstream down the proxy closes the client's connection (a connection error).
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from urllib.parse import parse_qs, urlsplit

_MARKER = re.compile(r"/metadata/part-\d+\.parquet$")
_HEAD_END = b"\r\n\r\n"
_MAX_HEAD = 64 * 1024


def request_kind(method: str, target: str) -> str | None:
    """Which held kind a request is ("marker", "part", "list"), or None."""
    parts = urlsplit(target)
    query = parse_qs(parts.query, keep_blank_values=True)
    if upload_step(method, target) == "part":
        return "part"
    if method == "PUT" and _MARKER.search(parts.path):
        return "marker"
    if (
        method == "GET"
        and parts.path.strip("/").count("/") == 0
        and ("list-type" in query or "prefix" in query)
    ):
        return "list"
    return None


def upload_step(method: str, target: str) -> str | None:
    """Which step of a multipart upload a request is ("create", "part", "complete", "abort"), or None."""
    query = parse_qs(urlsplit(target).query, keep_blank_values=True)
    if method == "POST" and "uploads" in query:
        return "create"
    if method == "PUT" and "partNumber" in query:
        return "part"
    if method == "POST" and "uploadId" in query:
        return "complete"
    if method == "DELETE" and "uploadId" in query:
        return "abort"
    return None


def _read_head(sock: socket.socket, buffered: bytes = b"") -> tuple[bytes, bytes]:
    """(the head up to and including the blank line, bytes read past it); (b"", ...) at EOF."""
    data = buffered
    while _HEAD_END not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return b"", data
        data += chunk
        if len(data) > _MAX_HEAD:
            raise ValueError("HTTP head too large")
    end = data.index(_HEAD_END) + len(_HEAD_END)
    return data[:end], data[end:]


def _with_close(head: bytes) -> bytes:
    lines = head[: -len(_HEAD_END)].split(b"\r\n")
    kept = [line for line in lines if not line.lower().startswith(b"connection:")]
    return b"\r\n".join([*kept, b"Connection: close"]) + _HEAD_END


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        for sock, how in ((sink, socket.SHUT_WR), (source, socket.SHUT_RD)):
            with contextlib.suppress(OSError):
                sock.shutdown(how)


class SlowStorage:
    """``with SlowStorage(upstream_port) as proxy:`` serves on ``proxy.url`` until the block ends."""

    def __init__(self, upstream_port: int, port: int = 0):
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", port), backlog=256)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._slow_until = 0.0
        self._hold = 0.0
        self._closed = False
        #: Requests held, by kind, over the proxy's life.
        self.held: dict[str, int] = {"marker": 0, "part": 0, "list": 0}
        self.forwarded = 0
        #: Multipart upload requests forwarded to the server, by step (see :func:`upload_step`).
        self.uploads: dict[str, int] = {"create": 0, "part": 0, "complete": 0, "abort": 0}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def slow_down(self, seconds: float, hold: float) -> None:
        """Hold marker PUTs, part uploads and LISTs ``hold`` seconds each for the next ``seconds``."""
        with self._lock:
            self._slow_until = time.monotonic() + seconds
            self._hold = hold

    def normal(self) -> None:
        """Stop holding requests (those already held are sent when their hold ends)."""
        with self._lock:
            self._slow_until = 0.0

    def _current_hold(self) -> float:
        with self._lock:
            return self._hold if time.monotonic() < self._slow_until else 0.0

    def __enter__(self) -> SlowStorage:
        threading.Thread(target=self._serve, name="slow-s3", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._closed = True
        self._listener.close()

    def _serve(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        upstream = None
        try:
            head, rest = _read_head(client)
            if not head:
                return
            method, target = (x.decode("ascii", "replace") for x in head.split(b" ", 2)[:2])
            kind = request_kind(method, target)
            hold = self._current_hold() if kind else 0.0
            if hold:
                with self._lock:
                    self.held[kind] += 1
                time.sleep(hold)
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
            except OSError:
                return  # storage down: the client sees its connection closed
            upstream.settimeout(None)
            upstream.sendall(_with_close(head) + rest)
            step = upload_step(method, target)
            with self._lock:
                self.forwarded += 1
                if step:
                    self.uploads[step] += 1
            threading.Thread(target=_pipe, args=(client, upstream), daemon=True).start()
            buffered = b""
            while True:  # 1xx heads (100 Continue) pass as they are; the final one closes
                response, buffered = _read_head(upstream, buffered)
                if not response:
                    return
                status = response.split(b" ", 2)[1]
                if status.startswith(b"1"):
                    client.sendall(response)
                    continue
                client.sendall(_with_close(response) + buffered)
                break
            _pipe(upstream, client)
        except (OSError, ValueError, IndexError):
            pass
        finally:
            for sock in (client, upstream):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()
