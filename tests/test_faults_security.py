"""Locked-down defaults, checked on the running system: JSON only, results ignored, no
credentials anywhere they could leak, services on loopback with authentication, and a
broker reached over TLS with its certificate verified."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fewstep.contract import TASK_NAME, manifest_key, queue_name
from fewstep.queue import celery_app, queue_length, redis_client
from fewstep.services import free_port
from fewstep.storage import open_store
from tests.conftest import BUCKET
from tests.support import cli, config_dir, start_worker, stop_worker, wait_done, wait_for
from tests.test_cli_errors import assert_one_line_error
from tests.test_end_to_end import SAMPLE, enqueue


class Payload:
    """Unpickling this runs a shell command: what a pickled message could do to a worker."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_i_a_pickled_message_is_refused_and_never_executed(env, output, tmp_path):
    marker = tmp_path / "executed"
    queue = queue_name(env["FEWSTEP_QUEUE_PREFIX"], "tiny")
    app = celery_app()
    with app.producer_or_acquire() as producer:
        app.send_task(TASK_NAME, args=[Payload(marker)], queue=queue, serializer="pickle", producer=producer)
    (raw,) = redis_client().lrange(queue, 0, -1)
    assert json.loads(raw)["content-type"] == "application/x-python-serialize"  # a real pickled message
    job = enqueue(SAMPLE, "after-pickle", output, env, "--shard-size", "32")
    log = tmp_path / "worker.log"
    worker = start_worker(env, log_path=log)
    try:
        wait_done("after-pickle", output, env)  # the worker went on with the real shard
    finally:
        stop_worker(worker)
    assert not marker.exists()
    assert "Refusing to deserialize untrusted content of type pickle" in log.read_text()
    assert queue_length(redis_client(), job["queue"]) == 0  # dropped, not redelivered in a loop
    # Results are ignored: outputs live in storage and Redis does not grow with tasks.
    assert redis_client().keys("celery-task-meta-*") == []


def redis_contents() -> bytes:
    """Every key and value in Redis, as bytes."""
    client = redis_client()
    out = []
    for key in client.keys("*"):
        kind = client.type(key)
        if kind == b"string":
            values = [client.get(key)]
        elif kind == b"list":
            values = client.lrange(key, 0, -1)
        elif kind == b"hash":
            values = [b for pair in client.hgetall(key).items() for b in pair]
        elif kind == b"set":
            values = list(client.smembers(key))
        elif kind == b"zset":
            values = [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
        else:
            values = []
        out += [key, *values]
    return b"\n".join(out)


def test_credentials_never_reach_messages_job_spec_metadata_records_or_logs(env, output, tmp_path):
    secrets = [
        env["AWS_SECRET_ACCESS_KEY"].encode(),
        env["AWS_ACCESS_KEY_ID"].encode(),
        env["CELERY_BROKER_URL"].split("@")[0].rsplit(":", 1)[1].encode(),  # the Redis password
    ]
    config = config_dir(tmp_path, worker={"max_attempts": 1})
    env = {**env, "FEWSTEP_CONFIG_DIR": config}
    job = enqueue(SAMPLE, "secrets", output, env, "--shard-size", "16")
    store = open_store(job["job_url"])
    store.put(manifest_key(2), b"broken")  # so an error record and a failed marker get written too
    assert not any(s in redis_contents() for s in secrets)  # the queued messages
    log = tmp_path / "worker.log"
    worker = start_worker(env, "--loglevel", "debug", log_path=log)
    try:
        wait_for(lambda: store.exists("failed/part-000002.json"), 300, "shard 2 to be marked failed")
        wait_for(lambda: store.exists("metadata/part-000001.parquet"), 300, "shard 1 to be committed")
    finally:
        stop_worker(worker)
    objects = {key: store.get(key) for key, _ in store.list()}
    assert {"job.json", "failed/part-000002.json", "metadata/part-000001.parquet"} <= set(objects)
    assert any(k.startswith("attempts/part-000002/") for k in objects)
    text = log.read_bytes()
    # Celery's own log masks the URL (it names fewstep's Redis transport class as the scheme).
    assert b"Connected to fewstep.transport:GuardedRedisTransport://:**@" in text
    for secret in secrets:
        assert secret not in text
        assert not [key for key, data in objects.items() if secret in data]
        assert secret not in redis_contents()


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket process ``pid`` listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            address, port = local.split(":")
            raw = bytes.fromhex(address)
            if width == 8:
                ip = socket.inet_ntop(socket.AF_INET, raw[::-1])
            else:
                ip = socket.inet_ntop(
                    socket.AF_INET6, b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                )
            found.add((ip, int(port, 16)))
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc to list sockets")
def test_local_services_listen_on_loopback_only(local_services):
    for pid in (local_services.redis_pid, local_services.weed_pid):
        addresses = listening(pid)
        assert addresses, pid
        assert {ip for ip, _ in addresses} == {"127.0.0.1"}, addresses


@pytest.mark.parametrize(("method", "path"), [("GET", "/anon/x.txt"), ("PUT", "/anon/new.txt"), ("GET", "")])
def test_anonymous_s3_requests_are_refused(local_services, env, method, path):
    open_store(f"s3://{BUCKET}/anon").put("x.txt", b"x")
    request = urllib.request.Request(
        f"{local_services.s3_endpoint}/{BUCKET}{path}", method=method, data=b"y" if method == "PUT" else None
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403


# --- rediss:// ----------------------------------------------------------------------------


class TLSProxy:
    """A TLS endpoint on 127.0.0.1 in front of the plain test Redis (redis-server here lacks TLS)."""

    def __init__(self, target_port: int, cert: Path, key: Path):
        self.port = free_port()
        self.target_port = target_port
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", self.port, ssl=self.context)
        )
        ready.set()
        self.loop.run_forever()
        server.close()

    async def _client(self, reader, writer) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                return  # either side closed: the proxy's job for this pair is over
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def tls_broker(local_services, tmp_path):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not found: cannot make a certificate for the TLS test")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    proxy = TLSProxy(local_services.redis_port, cert, key)
    yield f"rediss://:{local_services.redis_password}@127.0.0.1:{proxy.port}/0", cert
    proxy.close()


def test_a_rediss_broker_is_used_with_its_certificate_verified(env, output, tls_broker, tmp_path):
    url, cert = tls_broker
    # Not trusted: the self-signed certificate is refused (kombu alone would not verify it).
    untrusted = cli(
        "producer", "enqueue", "partiprompts", "--path", str(SAMPLE), "--model", "tiny", "--job", "tls",
        "--output", output, env={**env, "CELERY_BROKER_URL": url}, check=False,
    )  # fmt: skip
    assert_one_line_error(untrusted, "rediss://:***@127.0.0.1", "certificate verify failed")
    trusted = {**env, "CELERY_BROKER_URL": f"{url}?ssl_ca_certs={cert}"}
    enqueue(SAMPLE, "tls", output, trusted, "--shard-size", "16")
    log = tmp_path / "worker.log"
    worker = start_worker(trusted, log_path=log)
    try:
        wait_done("tls", output, trusted)
    finally:
        stop_worker(worker)
    # fewstep's own start-up line names the URL; Celery's names the transport class it selects
    # for redis:// and rediss:// (fewstep/transport.py), TLS included.
    assert "broker rediss://:***@127.0.0.1" in log.read_text()
    assert "Connected to fewstep.transport:GuardedRedisTransport://:**@127.0.0.1" in log.read_text()
    assert env["CELERY_BROKER_URL"].split("@")[0].rsplit(":", 1)[1] not in log.read_text()


def test_error_text_hides_url_passwords_and_the_environments_secrets(monkeypatch):
    """Attempt records, failed markers, heartbeats and status all describe errors this one way."""
    from fewstep.settings import describe_error

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3-secret-value")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-value")
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://:broker-pass@127.0.0.1:6379/0")
    error = ConnectionError(
        "to redis://user:url-pass@host:1/0 failed\nkey s3-secret-value token session-token-value"
        " password broker-pass"
    )
    for limit in (2000, 500):
        text = describe_error(error, limit)
        assert text.startswith("ConnectionError: to redis://user:***@host:1/0 failed key *** token ***")
        assert "\n" not in text
        for secret in ("url-pass", "s3-secret-value", "session-token-value", "broker-pass"):
            assert secret not in text
    assert describe_error(RuntimeError()) == "RuntimeError"
    assert len(describe_error(ValueError("x" * 5000), 500)) == 500
