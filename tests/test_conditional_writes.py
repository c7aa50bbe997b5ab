"""The conditional-write check: a backend must honour ``If-None-Match: *`` before anything commits.

The honouring backend is the session's SeaweedFS (and a local directory). The one that
does not is real too: ``tests/s3_gateway.py``, an HTTP gateway on 127.0.0.1 in front of the
same SeaweedFS that drops the header and re-signs each request (boto3 signs the header, so
it cannot be stripped under the client's signature). boto3, the worker and the producer
talk to it over HTTP exactly as they would to a misbehaving S3 service. The same gateway
plays S3's ``409 ConditionalRequestConflict`` (a conflicting conditional write in progress,
retry) on a commit marker's PUT.
"""

from __future__ import annotations

import threading
import time

import pytest

from fewstep import storage
from fewstep.contract import JOB_SPEC_KEY, MANIFESTS, WORKERS, metadata_key
from fewstep.queue import pending_messages, queue_length, redis_client
from fewstep.storage import (
    PROBE_PREFIX,
    ConditionalWritesIgnored,
    LocalStore,
    check_conditional_writes,
    open_store,
)
from tests.conftest import BUCKET
from tests.s3_gateway import S3Gateway
from tests.support import attempt_records, cli, cli_json, run_worker_until_done, start_worker
from tests.test_cli_errors import assert_one_line_error
from tests.test_end_to_end import SAMPLE
from tests.test_faults import assert_each_prompt_once

REFUSAL = "does not honour conditional writes (If-None-Match: *)"


@pytest.fixture
def fresh_checks(monkeypatch):
    """This process has checked no backend yet (other tests may have checked the session's)."""
    monkeypatch.setattr(storage, "_verified", set())
    monkeypatch.setattr(storage, "_probe_locks", {})


@pytest.fixture
def gateway(local_services):
    with S3Gateway(
        local_services.s3_endpoint, local_services.access_key, local_services.secret_key, ignore=True
    ) as gw:
        yield gw


class ProbeWrites:
    """Counts the probe's PutObject calls made through the shared boto3 client."""

    def __init__(self, client):
        self.client = client
        self.keys: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, params, **_):
        if params.get("Key", "").rpartition("/")[2].startswith(PROBE_PREFIX):
            with self._lock:
                self.keys.append(params["Key"])

    def __enter__(self) -> ProbeWrites:
        self.client.meta.events.register("before-parameter-build.s3.PutObject", self)
        return self

    def __exit__(self, *exc) -> None:
        self.client.meta.events.unregister("before-parameter-build.s3.PutObject", self)


def test_seaweedfs_passes_the_probe_once_per_bucket_from_many_threads(env, output, fresh_checks):
    store = open_store(output)
    with ProbeWrites(store._client) as writes:
        threads = [
            threading.Thread(target=check_conditional_writes, args=(store.child(f"j{i}"),)) for i in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert len(writes.keys) == 2  # one probe, written twice, for all eight threads
        assert len(set(writes.keys)) == 1
        check_conditional_writes(store)  # cached: no request at all
        assert len(writes.keys) == 2
        check_conditional_writes(open_store("s3://fewstep-other/x"))  # another bucket: its own probe
        assert len(writes.keys) == 4
    assert list(store.list()) == []  # the probe deleted itself


def test_a_local_directory_passes_the_probe_and_refuses_a_second_create(tmp_path, fresh_checks):
    store = LocalStore(tmp_path / "out")
    check_conditional_writes(store)
    assert list((tmp_path / "out").iterdir()) == []  # the probe left neither file nor folder
    assert store.put("k", b"1", if_absent=True) and not store.put("k", b"2", if_absent=True)
    assert store.get("k") == b"1"


def test_a_backend_ignoring_if_none_match_fails_the_probe_in_one_line(
    env, local_services, gateway, fresh_checks, monkeypatch
):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", gateway.url)
    store = open_store(f"s3://{BUCKET}/ignored")
    # The gateway really ignores the header: a second create-if-absent overwrites.
    assert store.put("twice", b"1", if_absent=True) and store.put("twice", b"2", if_absent=True)
    assert store.get("twice") == b"2"
    store.delete("twice")
    with pytest.raises(ConditionalWritesIgnored, match="does not honour conditional writes") as e:
        check_conditional_writes(store)
    message = str(e.value)
    assert "\n" not in message and gateway.url in message and repr(BUCKET) in message
    assert local_services.secret_key not in message and local_services.access_key not in message
    assert gateway.ignored >= 4  # the header was sent, and dropped
    assert list(store.list()) == []  # the probe deleted itself
    with pytest.raises(ConditionalWritesIgnored):  # a failed check is not cached
        check_conditional_writes(store)


def test_a_backend_rejecting_if_none_match_is_refused_in_one_line(
    env, local_services, fresh_checks, monkeypatch
):
    svc = local_services
    with S3Gateway(svc.s3_endpoint, svc.access_key, svc.secret_key, reject=True) as gateway:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", gateway.url)
        store = open_store(f"s3://{BUCKET}/rejected")
        start = time.monotonic()
        with pytest.raises(ConditionalWritesIgnored, match="NotImplemented") as e:
            check_conditional_writes(store)
    assert time.monotonic() - start < 10  # a 501 is an answer, not an outage to wait out
    assert "\n" not in str(e.value) and gateway.url in str(e.value)


def _enqueue(env, output: str, job: str, *extra: str):
    return cli(
        "producer", "enqueue", "partiprompts", "--path", str(SAMPLE), "--model", "synthetic",
        "--allow-synthetic", "--job", job, "--output", output, "--limit", "4", "--shard-size", "2",
        *extra, env=env, check=False,
    )  # fmt: skip


def test_enqueue_refuses_a_backend_ignoring_if_none_match_and_queues_nothing(env, output, gateway):
    result = _enqueue({**env, "AWS_ENDPOINT_URL_S3": gateway.url}, output, "ignored")
    assert_one_line_error(result, REFUSAL, gateway.url)
    assert result.returncode == 2
    queue = f"{env['FEWSTEP_QUEUE_PREFIX']}.synthetic"
    assert list(pending_messages(redis_client(), queue)) == []
    job = open_store(output).child("ignored")
    assert not job.exists(JOB_SPEC_KEY) and list(job.list()) == []  # no spec, no manifest, no probe


def test_worker_refuses_a_backend_ignoring_if_none_match_and_leaves_the_shards_queued(
    env, output, gateway, tmp_path, local_services
):
    summary = cli_json(
        "producer", "enqueue", "partiprompts", "--path", str(SAMPLE), "--model", "synthetic",
        "--allow-synthetic", "--job", "ignored", "--output", output, "--limit", "4", "--shard-size", "2",
        env=env,
    )  # fmt: skip
    log = tmp_path / "worker.log"
    worker = start_worker({**env, "AWS_ENDPOINT_URL_S3": gateway.url}, log_path=log, model="synthetic")
    try:
        assert worker.wait(timeout=120) != 0  # it stops itself
    finally:
        worker.kill()
    text = log.read_text(errors="replace")
    refusals = [line for line in text.splitlines() if REFUSAL in line]
    assert refusals and "goes back to the queue" in refusals[0] and gateway.url in refusals[0], text[-3000:]
    assert local_services.secret_key not in text and local_services.access_key not in text
    # Nothing drained, nothing written: both shards wait in Redis for a worker on a sound backend.
    assert queue_length(redis_client(), summary["queue"]) == summary["shards"] == 2
    job = open_store(summary["job_url"])
    written = {key.split("/")[0] for key, _ in job.list()}
    assert written <= {JOB_SPEC_KEY, MANIFESTS, WORKERS}  # the enqueue's, and the worker's heartbeat
    # (no image, attempt record, metadata, failed marker or probe)


def test_a_409_conditional_request_conflict_on_the_marker_is_retried_and_commits_once(
    env, output, local_services, tmp_path
):
    """S3 answers a conditional PUT racing another on the same key ``409 ConditionalRequestConflict``
    and says to retry: it is no answer (neither 200 nor 412). The worker asks again, the marker's
    second PUT reaches the store and lands, and the shard commits once, by this one attempt."""
    svc = local_services
    summary = cli_json(
        "producer", "enqueue", "partiprompts", "--path", str(SAMPLE), "--model", "synthetic",
        "--allow-synthetic", "--job", "conflicted", "--output", output, "--limit", "2", "--shard-size", "2",
        env=env,
    )  # fmt: skip
    marker = metadata_key(1)
    with S3Gateway(svc.s3_endpoint, svc.access_key, svc.secret_key, conflict=marker) as gateway:
        run_worker_until_done(
            {**env, "AWS_ENDPOINT_URL_S3": gateway.url}, output, "conflicted", model="synthetic",
            log_path=tmp_path / "worker.log", timeout=90,
        )  # fmt: skip
    text = (tmp_path / "worker.log").read_text(errors="replace")
    # The 409 was answered, then the same write was sent again and stored (200), nothing more.
    answers = [status for path, status in gateway.conditional_puts if path.endswith(marker)]
    assert answers == [409, 200], text[-3000:]
    assert "in progress elsewhere" in text  # the retry's reason, from fewstep/storage.py
    states = [r["state"] for r in attempt_records(summary["job_url"], 1)]
    assert states == ["committed"], states  # one attempt, not an error retried by a second one
    assert_each_prompt_once(summary["job_url"], 2)
