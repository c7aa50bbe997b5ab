"""A real S3 endpoint that ignores ``If-None-Match``: an HTTP gateway in front of SeaweedFS.

Some S3-compatible backends and gateways accept a conditional PUT and store it
unconditionally. This gateway behaves so: it listens on 127.0.0.1, forwards every request
to the session's SeaweedFS with the ``If-None-Match`` header removed, and relays the answer.

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
# ... and the one it ignores on purpose.
IGNORED_HEADER = "if-none-match"
_RESPONSE_DROP = frozenset({"connection", "transfer-encoding", "content-length", "date", "server"})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and "100 Continue" for boto3's Expect header
    server: _Server

    def log_message(self, *args) -> None:  # quiet: the test reads the gateway's own counters
        pass

    def _forward(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            self.send_error(501, "chunked request bodies are not supported by this test gateway")
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        gateway = self.server.gateway
        if self.headers.get(IGNORED_HEADER) is not None:
            gateway.ignored += 1
            if gateway.reject:
                self._not_implemented()
                return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _REQUEST_DROP | {IGNORED_HEADER}}
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
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in _RESPONSE_DROP:
                self.send_header(key, value)
        length = response.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", length)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _not_implemented(self) -> None:
        body = (
            b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NotImplemented</Code>'
            b"<Message>A header you provided implies functionality that is not implemented</Message></Error>"
        )
        self.send_response(501)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _forward


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    gateway: IgnoringGateway


class IgnoringGateway:
    """``with IgnoringGateway(endpoint, key, secret) as gw:`` serves at ``gw.url`` until the block ends.

    With ``reject``, it plays a backend that knows no conditional writes and says so (501).
    """

    def __init__(
        self,
        upstream: str,
        access_key: str,
        secret_key: str,
        region: str = "us-east-1",
        *,
        reject: bool = False,
    ):
        self.upstream = upstream.rstrip("/")
        #: Answer a request carrying the header 501 NotImplemented instead of dropping the header.
        self.reject = reject
        self.credentials = Credentials(access_key, secret_key)
        self.region = region
        #: How many requests carried the header this gateway ignores.
        self.ignored = 0
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.gateway = self

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> IgnoringGateway:
        threading.Thread(target=self._server.serve_forever, name="s3-gateway", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
