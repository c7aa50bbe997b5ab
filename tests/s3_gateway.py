"""Real S3 endpoints that misbehave in one chosen way: an HTTP gateway in front of SeaweedFS.

Some S3-compatible backends and gateways accept a conditional PUT and store it
unconditionally (``ignore``); some refuse the header outright (``reject``, 501); and S3 itself
answers ``409 ConditionalRequestConflict`` to a conditional write while a conflicting one is in
progress, asking the client to retry (``conflict``). The gateway listens on 127.0.0.1, forwards
every other request to the session's SeaweedFS and relays the answer. It records every request
that reaches it (:attr:`S3Gateway.requests`): a count of what a client sent, taken where the
requests arrive, for tests and ``bench/pipeline.py --count-requests``.

boto3 signs ``If-None-Match`` (SigV4 signs every header but a short list such as
``User-Agent``), and the upstream address differs from the one the client signed for, so
the client's signature cannot be forwarded. The gateway therefore checks nothing and signs
each forwarded request itself with the same credentials, as a gateway holding its own
access to the store would. Everything else is untouched: method, path, query, body and the
remaining headers (checksums included) reach SeaweedFS, whose answers come back verbatim.
"""

from __future__ import annotations

import http.client
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

# Headers the gateway drops (re-signed, hop-by-hop, or recomputed by http.client) ...
_REQUEST_DROP = frozenset(
    {"authorization", "x-amz-date", "x-amz-content-sha256", "host", "expect", "connection",
     "content-length", "transfer-encoding"}
)  # fmt: skip
# ... and the conditional-write header it plays with.
CONDITIONAL_HEADER = "if-none-match"
_RESPONSE_DROP = frozenset({"connection", "transfer-encoding", "content-length", "date", "server"})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and "100 Continue" for boto3's Expect header
    server: _Server

    def log_message(self, *args) -> None:  # quiet: the test reads the gateway's own counters
        pass

    def _forward(self) -> None:
        self.server.gateway.record(self.command, self.path)
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            self.send_error(501, "chunked request bodies are not supported by this test gateway")
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        gateway = self.server.gateway
        conditional = self.headers.get(CONDITIONAL_HEADER) is not None
        key = urlsplit(self.path).path
        if gateway.slow_parts and "partNumber=" in urlsplit(self.path).query:
            time.sleep(gateway.slow_parts)
        if conditional and gateway.reject:
            gateway.ignored += 1
            self._not_implemented()
            return
        if conditional and self.command == "PUT" and gateway.take_conflict(key):
            gateway.conditional_puts.append((key, 409))
            self._conflict(key)
            return
        if conditional and self.command == "PUT" and not gateway.wait_if_held(key):
            gateway.conditional_puts.append((key, 503))
            self._slow_down()
            return
        if conditional and gateway.ignore:
            gateway.ignored += 1
        dropped = _REQUEST_DROP | ({CONDITIONAL_HEADER} if gateway.ignore else set())
        headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
        request = AWSRequest(
            method=self.command, url=gateway.upstream + self.path, data=body, headers=headers
        )
        S3SigV4Auth(gateway.credentials, "s3", gateway.region).add_auth(request)
        target = urlsplit(gateway.upstream)
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
        try:
            conn.request(self.command, self.path, body=body or None, headers=dict(request.headers.items()))
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        if conditional and self.command == "PUT":
            gateway.conditional_puts.append((key, response.status))
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in _RESPONSE_DROP:
                self.send_header(key, value)
        length = response.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", length)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _conflict(self, key: str) -> None:
        # S3's answer, as documented for conditional writes racing on one key.
        request_id = uuid.uuid4().hex[:16].upper()
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ConditionalRequestConflict</Code>'
            "<Message>A conflicting conditional operation is currently in progress against this "
            f"resource. Please try again.</Message><Key>{key.lstrip('/')}</Key>"
            f"<RequestId>{request_id}</RequestId><HostId>fewstep-test-gateway</HostId></Error>"
        ).encode()
        self.send_response(409)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", request_id)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _slow_down(self) -> None:
        self._error(503, "SlowDown", "Please reduce your request rate.")

    def _not_implemented(self) -> None:
        message = "A header you provided implies functionality that is not implemented"
        self._error(501, "NotImplemented", message)

    def _error(self, status: int, code: str, message: str) -> None:
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            f"<Message>{message}</Message></Error>"
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _forward


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    gateway: S3Gateway


class S3Gateway:
    """``with S3Gateway(endpoint, key, secret, ...) as gw:`` serves at ``gw.url`` until the block ends.

    ``ignore``: drop ``If-None-Match`` and store unconditionally (a backend that ignores
    conditional writes). ``reject``: answer a request carrying the header 501 NotImplemented.
    ``conflict``: answer the first ``conflicts`` conditional PUTs to a path ending with it
    ``409 ConditionalRequestConflict``, without forwarding them. ``hold``: hold every
    conditional PUT to a path ending with it until :meth:`release` (a storage that is slow to
    take one write); one held longer than ``hold_seconds`` is answered ``503 SlowDown``, which
    the client retries, so no client times out while the test holds it. ``slow_parts``: wait
    this many seconds before forwarding each multipart part (a slow link to the storage).
    """

    def __init__(
        self,
        upstream: str,
        access_key: str,
        secret_key: str,
        region: str = "us-east-1",
        *,
        ignore: bool = False,
        reject: bool = False,
        conflict: str | None = None,
        conflicts: int = 1,
        hold: str | None = None,
        hold_seconds: float = 30.0,
        slow_parts: float = 0.0,
    ):
        self.upstream = upstream.rstrip("/")
        self.ignore = ignore
        self.reject = reject
        self.conflict = conflict
        self.credentials = Credentials(access_key, secret_key)
        self.region = region
        #: How many requests carried the header this gateway dropped or refused.
        self.ignored = 0
        #: Every conditional PUT that reached the gateway: (path, status answered), in order.
        self.conditional_puts: list[tuple[str, int]] = []
        #: Every request that reached the gateway, in order of arrival: (method, path, query).
        self.requests: list[tuple[str, str, str]] = []
        self._conflicts_left = conflicts if conflict else 0
        self.hold = hold
        self.hold_seconds = hold_seconds
        self.slow_parts = slow_parts
        #: Set when a held PUT first arrives; set ``_released`` to let held PUTs through.
        self.holding = threading.Event()
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.gateway = self

    def record(self, method: str, target: str) -> None:
        """Note one request as it arrives (before it is answered or forwarded)."""
        parts = urlsplit(target)
        with self._lock:
            self.requests.append((method, parts.path, parts.query))

    def take_conflict(self, path: str) -> bool:
        """Whether this conditional PUT to ``path`` is answered 409 (counted)."""
        with self._lock:
            if self._conflicts_left and self.conflict and path.endswith(self.conflict):
                self._conflicts_left -= 1
                return True
            return False

    def wait_if_held(self, path: str) -> bool:
        """Whether this conditional PUT to ``path`` may be forwarded now; a held one waits for
        :meth:`release` at most ``hold_seconds`` (False: it is still held)."""
        if not (self.hold and path.endswith(self.hold)):
            return True
        self.holding.set()
        return self._released.wait(self.hold_seconds)

    def release(self) -> None:
        """Forward held PUTs from now on."""
        self._released.set()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> S3Gateway:
        threading.Thread(target=self._server.serve_forever, name="s3-gateway", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
