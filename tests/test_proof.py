"""Destructive actions on proof (docs/RELIABILITY.md, "Destructive actions on proof"): gc's
deletes, reconcile's upload aborts, the recovery of dead workers' deliveries and the removal of
failed markers, each against a real SeaweedFS and a real redis-server, with the states that
used to fool them built exactly: a slow commit under a gc run every second, a commit whose
answer was lost, old records with no heartbeat, skewed delivery stamps, redeliveries with a
byte-identical value, gaps in the observation.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fewstep.contract import (
    TASK_NAME,
    ShardMessage,
    attempt_key,
    failed_key,
    heartbeat_key,
    image_key,
    manifest_key,
    metadata_key,
    shard_object_key,
)
from fewstep.queue import queue_length, redis_client
from fewstep.recovery import (
    UNACKED,
    UNACKED_INDEX,
    WORKERS,
    Recoverer,
    lead,
    live_tags,
    liveness_key,
    publish_liveness,
    resign,
    withdraw_liveness,
)
from fewstep.storage import open_store, s3_client
from tests.support import (
    attempt_records,
    cli,
    cli_json,
    config_dir,
    start_worker,
    stop_worker,
    verify_job,
    wait_done,
    wait_for,
)
from tests.test_end_to_end import SAMPLE, enqueue
from tests.test_faults import log_text

# --- gc under a slow commit, as the operator's cron job ran it ----------------------------------


def test_gc_every_second_during_slow_commits_deletes_no_committed_image(env, output, tmp_path):
    # Every shard's marker PUT is held 6 s (an S3 PUT retried through 503 SlowDown), while
    # `producer gc --delete --abandoned-after 1` runs in a loop, as a cron job with a short
    # threshold would. Before the fix gc took the committing attempts for dead (their heartbeat
    # named no attempt, they started more than 1 s ago) and deleted every image.
    slow = {
        **env,
        "FEWSTEP_FAILPOINT": "slow-commit:*",
        "FEWSTEP_FAILPOINT_SECONDS": "6",
        "FEWSTEP_CONFIG_DIR": config_dir(tmp_path, worker={"heartbeat_seconds": 1}),
    }
    job = enqueue(SAMPLE, "slowcommit", output, env, "--shard-size", "4", "--limit", "12")
    url = job["job_url"]
    stop = threading.Event()
    deleted: list[int] = []

    def cron() -> None:
        while not stop.is_set():
            run = cli("producer", "gc", "slowcommit", "--output", output, "--delete",
                      "--abandoned-after", "1", "--json", env=env, check=False)  # fmt: skip
            if run.returncode == 0:
                deleted.append(json.loads(run.stdout)["objects"])
            stop.wait(1)

    log = tmp_path / "worker.log"
    worker = start_worker(slow, log_path=log)
    gc_loop = threading.Thread(target=cron, daemon=True)
    gc_loop.start()
    try:
        # While part 1's marker PUT is held, the worker's heartbeat still names its attempt.
        wait_for(
            lambda: "failpoint slow-commit reached for part-000001" in log_text(log), 240, "a slow commit"
        )
        time.sleep(2.5)  # two beats after the commit began
        beat = json.loads(open_store(url).get(heartbeat_key(_worker_id(url))))
        running = [r for r in attempt_records(url, 1) if r["state"] == "running"]
        assert beat["shard"] == 1 and beat["attempt_id"] == running[-1]["id"]
        wait_done("slowcommit", output, env, timeout=240)
    finally:
        stop.set()
        gc_loop.join(timeout=60)
        stop_worker(worker)
    assert len(deleted) >= 5, "gc did not run during the slow commits"
    assert sum(deleted) == 0  # one attempt per shard, all committed: nothing was ever garbage
    summary = verify_job("slowcommit", output, env)
    assert summary["images_checked"] == 12 and summary["ok"]
    records = [r for s in range(1, 4) for r in attempt_records(url, s)]
    assert all(r["state"] == "committed" and r["commit_sent"] is True for r in records), records


def _worker_id(job_url: str) -> str:
    keys = [k for k, _ in open_store(job_url).list("workers/")]
    assert len(keys) == 1, keys
    return json.loads(open_store(job_url).get(keys[0]))["worker"]


# --- gc and upload aborts on a job's attempt records, built exactly ------------------------------


def _record(store, shard: int, attempt: str, state: str, **extra) -> None:
    record = {"id": attempt, "shard": shard, "round": 1, "worker": "gone:1:cpu", "state": state,
              "started_at": "2020-01-01T00:00:00.000+00:00", **extra}  # fmt: skip
    if state != "running":
        record.setdefault("ended_at", "2020-01-01T00:10:00.000+00:00")
    store.put(attempt_key(shard, attempt), json.dumps(record).encode())


def _marker(store, shard: int, attempt: str) -> None:
    # What gc reads of a marker is its attempt_id column (every row names the one attempt).
    buffer = io.BytesIO()
    pq.write_table(pa.table({"attempt_id": [attempt] * 4}), buffer)
    assert store.put(metadata_key(shard), buffer.getvalue(), if_absent=True)


def _images(store, shard: int, attempt: str) -> list[str]:
    keys = [image_key(shard, attempt, row, "png") for row in range(2)]
    for key in keys:
        store.put(key, b"png")
    return keys


def _attempt(name: str) -> str:
    return f"20200101T000000.000000Z-{name}"


def test_gc_deletes_only_committed_shards_losers_and_attempts_ended_before_their_commit(env, output):
    job = enqueue(SAMPLE, "proofs", output, env, "--shard-size", "4", "--limit", "8")
    store = open_store(job["job_url"])
    a, b, c = _attempt("a"), _attempt("b"), _attempt("c")
    d, e, f, g, h = (_attempt(x) for x in "defgh")
    # Shard 1: committed by a; b still says running; c ended before its commit.
    _record(store, 1, a, "committed", commit_sent=True)
    _record(store, 1, b, "running", commit_sent=False)
    _record(store, 1, c, "error", commit_sent=False)
    _marker(store, 1, a)
    # Shard 2, open: d "running" since 2020 with no heartbeat (the old gc's "abandoned");
    # e ended storage_unavailable *after* sending its marker PUT (the answer was lost: it may
    # have landed); f ended before its commit; g is an older worker's record (no commit_sent);
    # h ended before its commit, just now.
    _record(store, 2, d, "running", commit_sent=False)
    _record(store, 2, e, "storage_unavailable", commit_sent=True)
    _record(store, 2, f, "error", commit_sent=False)
    _record(store, 2, g, "error")
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000+00:00", time.gmtime())
    _record(store, 2, h, "superseded", commit_sent=False, ended_at=now)
    images = {
        (s, x): _images(store, s, x)
        for s, x in [(1, a), (1, b), (1, c), (2, d), (2, e), (2, f), (2, g), (2, h)]
    }

    def gc(*extra: str) -> dict:
        return cli_json("producer", "gc", "proofs", "--output", output, *extra, env=env)

    dry = gc("--abandoned-after", "3600")
    assert {(x["shard"], x["attempt"]) for x in dry["folders"]} == {(1, b), (1, c), (2, f)}
    assert all(store.exists(k) for keys in images.values() for k in keys)  # a dry run deletes nothing
    gc("--delete", "--abandoned-after", "3600")
    gone = {owner for owner, keys in images.items() if not any(store.exists(k) for k in keys)}
    assert gone == {(1, b), (1, c), (2, f)}
    # The delay only delays: h's record ended just now, so it stays until --abandoned-after passes.
    assert {(x["shard"], x["attempt"]) for x in gc("--delete", "--abandoned-after", "0")["folders"]} == {
        (2, h)
    }
    # e's lost-response commit had landed after all: the marker names e. Now, and only now,
    # the other attempts of shard 2 are provably losers; e is the dataset.
    _marker(store, 2, e)
    assert {(x["shard"], x["attempt"]) for x in gc("--delete")["folders"]} == {(2, d), (2, g)}
    assert all(store.exists(k) for k in images[(2, e)] + images[(1, a)])
    assert gc("--delete")["objects"] == 0


def test_reconcile_aborts_only_uploads_whose_attempt_ended_or_whose_shard_is_committed(env, output):
    job = enqueue(SAMPLE, "aborts", output, env, "--shard-size", "4", "--limit", "8")
    store = open_store(job["job_url"])
    client = s3_client()
    a, b, d, f = _attempt("a"), _attempt("b"), _attempt("d"), _attempt("f")
    _record(store, 1, a, "committed", commit_sent=True)
    _record(store, 1, b, "running", commit_sent=False)
    _marker(store, 1, a)
    _record(store, 2, d, "running", commit_sent=False)  # may stream its tar for hours
    _record(store, 2, f, "interrupted", commit_sent=False)

    def start(key: str) -> str:
        return client.create_multipart_upload(Bucket=store.bucket, Key=f"{store.prefix}/{key}")["UploadId"]

    uploads = {
        "loser of a committed shard": start(shard_object_key(1, b, "webdataset")),
        "running": start(shard_object_key(2, d, "webdataset")),
        "ended": start(shard_object_key(2, f, "parquet")),
        "not an attempt's": start("images/part-000002/notes.tar.gz"),
    }
    summary = cli_json(
        "producer", "reconcile", "aborts", "--output", output, "--abandoned-after", "0", env=env
    )
    left = {
        u["UploadId"]
        for u in client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix).get("Uploads", [])
    }
    assert {name for name, upload in uploads.items() if upload in left} == {"running", "not an attempt's"}
    assert summary["aborted_uploads"] == 2 and summary["kept_uploads_of_live_attempts"] == 1
    for upload in left & set(uploads.values()):
        key = next(
            u["Key"]
            for u in client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix)["Uploads"]
            if u["UploadId"] == upload
        )
        client.abort_multipart_upload(Bucket=store.bucket, Key=key, UploadId=upload)


def test_a_local_outputs_temporary_files_are_removed_only_for_ended_attempts(tmp_path):
    from producer.reconcile import abort_ended_uploads

    store = open_store(str(tmp_path / "out"))
    running, ended = _attempt("run"), _attempt("end")
    _record(store, 1, running, "running", commit_sent=False)
    _record(store, 1, ended, "error", commit_sent=False)
    left = {}
    for attempt in (running, ended):
        upload = store.upload(shard_object_key(1, attempt, "webdataset"), 1024)
        upload.write(b"x" * 4096)  # past one part: a temporary file exists
        left[attempt] = upload
    assert sorted(u.key for u in store.pending_uploads()) == sorted(
        shard_object_key(1, a, "webdataset") for a in (running, ended)
    )
    assert abort_ended_uploads(store, 3600)["aborted_uploads"] == 0  # the delay
    assert abort_ended_uploads(store, 0) == {
        "aborted_uploads": 1, "kept_uploads_of_live_attempts": 1, "kept_uploads_not_an_attempts": 0,
    }  # fmt: skip
    assert [u.key for u in store.pending_uploads()] == [shard_object_key(1, running, "webdataset")]
    assert left[running].finish() == 4096  # the live writer finishes unharmed


# --- retry --failed -----------------------------------------------------------------------------


def test_retry_failed_sends_a_shard_whose_last_delivery_is_not_yet_acknowledged(env, output):
    # The worker that marks a shard failed acknowledges its message after writing the marker.
    # A retry in that window used to count the shard as queued, remove the marker and send
    # nothing: the shard then had neither marker nor message.
    job = enqueue(SAMPLE, "unacked", output, env, "--shard-size", "16", "--limit", "16")
    store = open_store(job["job_url"])
    client = redis_client()
    queue = job["queue"]
    client.delete(queue)  # the enqueued message was delivered ...
    tag = f"tag-{uuid.uuid4().hex[:8]}"
    _deliver(client, queue, tag, ShardMessage(job["job_url"], 1, manifest_key(1)), time.time())
    store.put(failed_key(1), json.dumps({"shard": 1, "round": 1}).encode())  # ... and failed
    try:
        summary = cli_json("producer", "retry", "unacked", "--failed", "--output", output, env=env)
        assert summary["retried"] == [1] and summary["enqueued"] == 1
        assert queue_length(client, queue) == 1 and not store.exists(failed_key(1))
    finally:
        client.hdel(UNACKED, tag)
        client.zrem(UNACKED_INDEX, tag)
        client.delete(queue)


# --- recovery of dead workers' deliveries, on a real Redis, with the recoverer's clock ----------


def _deliver(client, queue: str, tag: str, message: ShardMessage, delivered_at: float, task: str = TASK_NAME):
    """Put a message in kombu's unacked set as its Redis transport does on delivery."""
    envelope = {
        "body": json.dumps([[], message.to_kwargs(), {}]),
        "content-type": "application/json",
        "headers": {"task": task, "id": message.task_id},
        "properties": {"delivery_tag": tag, "delivery_info": {"exchange": queue, "routing_key": queue}},
    }
    client.hset(UNACKED, tag, json.dumps([envelope, queue, queue]))
    client.zadd(UNACKED_INDEX, {tag: delivered_at})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def deliveries(env):
    """(client, queue, deliver(name, at) -> tag); everything removed afterwards."""
    client = redis_client()
    queue = f"recovery-{uuid.uuid4().hex[:8]}"
    tags: list[str] = []

    def deliver(name: str, at: float, task: str = TASK_NAME, shard: int = 1) -> str:
        tag = f"{name}-{uuid.uuid4().hex[:8]}"
        _deliver(client, queue, tag, ShardMessage("s3://b/job", shard, manifest_key(shard)), at, task)
        tags.append(tag)
        return tag

    yield client, queue, deliver
    for tag in tags:
        client.hdel(UNACKED, tag)
        client.zrem(UNACKED_INDEX, tag)
    client.delete(queue)


def _recoverer(client, queue: str, clock: Clock) -> Recoverer:
    return Recoverer(client, {queue}.__contains__, ttl=30, restore_after=45, clock=clock)


def _scan_until(recoverer: Recoverer, clock: Clock, until: float, step: float = 10) -> list[float]:
    """Scan every ``step`` seconds of the recoverer's clock up to ``until``; when it restored."""
    restored_at = []
    while clock.now <= until:
        if recoverer.scan().restored:
            restored_at.append(clock.now)
        clock.now += step
    return restored_at


def test_a_dead_delivery_is_restored_only_after_restore_after_seconds_of_unnamed_scans(deliveries):
    client, queue, deliver = deliveries
    clock = Clock()
    # Stamped by a worker whose clock ran an hour behind: the stamp plays no part.
    deliver("dead", time.time() - 3600)
    live = deliver("live", time.time() + 3600)
    deliver("foreign", time.time() - 3600, task="someone.else")
    publish_liveness(client, "host:1:cpu", queue, {live}, ttl=30)
    try:
        assert _scan_until(_recoverer(client, queue, clock), clock, 1100) == [1050.0]  # first seen at 1000
    finally:
        withdraw_liveness(client, "host:1:cpu")
    restored = [json.loads(raw) for raw in client.lrange(queue, 0, -1)]
    assert len(restored) == 1 and restored[0]["headers"]["redelivered"] is True
    assert restored[0]["properties"]["delivery_info"]["redelivered"] is True
    assert client.hexists(UNACKED, live)  # the live worker's delivery stayed where it was


def test_a_gap_in_the_scans_starts_the_observation_again(deliveries):
    # A Redis outage, a paused recoverer, a lost lead: nothing seen before the gap proves silence.
    client, queue, deliver = deliveries
    clock = Clock()
    deliver("dead", time.time())
    recoverer = _recoverer(client, queue, clock)
    recoverer.scan()  # 1000: first seen
    clock.now = 1030  # 30 s later: past two thirds of the TTL
    assert recoverer.scan().restored == []
    assert _scan_until(recoverer, clock, 1200) == [1080.0]  # 45 s after 1030, not after 1000


def test_a_delivery_named_by_a_live_worker_in_any_scan_is_watched_again_from_scratch(deliveries):
    client, queue, deliver = deliveries
    clock = Clock()
    tag = deliver("paused", time.time())
    recoverer = _recoverer(client, queue, clock)
    recoverer.scan()  # 1000: unnamed (its worker is in a stall)
    clock.now = 1040
    publish_liveness(client, "stalled:1:cpu", queue, {tag}, ttl=30)  # it woke up and published
    try:
        assert recoverer.scan().held_by_live_workers == 1
    finally:
        withdraw_liveness(client, "stalled:1:cpu")
    clock.now = 1050
    assert _scan_until(recoverer, clock, 1200) == [1100.0]


def test_a_redelivery_with_a_byte_identical_value_is_not_restored_on_the_first_deliverys_evidence(deliveries):
    client, queue, deliver = deliveries
    clock = Clock()
    tag = deliver("aba", 1_700_000_000.25)
    raw = client.hget(UNACKED, tag)
    recoverer = _recoverer(client, queue, clock)
    recoverer.scan()  # 1000: the first delivery, unnamed
    # Restored by someone and delivered again with the same tag: same value, new stamp.
    client.zadd(UNACKED_INDEX, {tag: 1_700_000_100.5})
    assert client.hget(UNACKED, tag) == raw
    clock.now = 1050
    assert recoverer.scan().restored == []  # a new delivery: watched from now on
    # The Lua script itself refuses a restore with the old stamp, whatever the caller believed.
    restore = client.register_script(__import__("fewstep.recovery", fromlist=["_RESTORE"])._RESTORE)
    assert restore(keys=[UNACKED, UNACKED_INDEX, queue], args=[tag, raw, repr(1_700_000_000.25), "{}"]) == 0
    assert client.hexists(UNACKED, tag) and client.llen(queue) == 0


def test_one_recoverer_leads_per_broker_and_a_stopping_one_hands_over(env):
    client = redis_client()
    first, second = f"a-{uuid.uuid4().hex[:6]}", f"b-{uuid.uuid4().hex[:6]}"
    client.delete("fewstep.recoverer")
    assert lead(client, first, 5) and lead(client, first, 5)  # takes, then renews
    assert not lead(client, second, 5)
    resign(client, second)  # not its lease: nothing happens
    assert not lead(client, second, 5)
    resign(client, first)
    assert lead(client, second, 5)
    resign(client, second)


def test_live_tags_come_from_the_worker_registry_and_expired_workers_are_pruned(env):
    client = redis_client()
    alive, gone = f"alive-{uuid.uuid4().hex[:6]}", f"gone-{uuid.uuid4().hex[:6]}"
    publish_liveness(client, alive, "q", {"t1", "t2"}, ttl=30)
    publish_liveness(client, gone, "q", {"t3"}, ttl=0.05)
    time.sleep(0.2)
    try:
        assert {"t1", "t2"} <= live_tags(client) and "t3" not in live_tags(client)
        members = {m.decode() for m in client.smembers(WORKERS)}
        assert alive in members and gone not in members
        assert client.exists(liveness_key(alive))
    finally:
        withdraw_liveness(client, alive)


def test_a_worker_that_cannot_copy_its_held_tags_publishes_the_last_ones_not_none():
    from worker.liveness import Liveness, SnapshotFailed

    answers = [{"tag-1"}, SnapshotFailed("changed during 20 copies")]

    def held(_consumer):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    liveness = Liveness("w", "q", held=held)
    assert liveness._held() == {"tag-1"}
    assert liveness._held() == {"tag-1"}  # not the empty set that would disown the shard


def test_reconcile_restores_a_dead_workers_delivery_after_observing_it(env, output, tmp_path):
    fast = config_dir(
        tmp_path, recovery={"liveness_seconds": 1, "liveness_ttl": 3, "restore_after": 4, "scan_seconds": 1}
    )
    job = enqueue(SAMPLE, "observed", output, env, "--shard-size", "16", "--limit", "16")
    client = redis_client()
    queue = job["queue"]
    client.delete(queue)
    tag = f"dead-{uuid.uuid4().hex[:8]}"
    _deliver(client, queue, tag, ShardMessage(job["job_url"], 1, manifest_key(1)), time.time() + 600)
    try:
        started = time.monotonic()
        summary = cli_json("producer", "reconcile", "observed", "--output", output,
                           env={**env, "FEWSTEP_CONFIG_DIR": fast})  # fmt: skip
        took = time.monotonic() - started
        assert summary["restored_from_dead_workers"] == 1 and queue_length(client, queue) == 1
        assert took >= 4  # observed for restore_after seconds before restoring
    finally:
        client.hdel(UNACKED, tag)
        client.zrem(UNACKED_INDEX, tag)
        client.delete(queue)


def test_the_recovery_settings_are_checked_for_the_proofs_inequalities(env, tmp_path):
    bad = config_dir(tmp_path, recovery={"liveness_ttl": 30, "restore_after": 10})
    run = subprocess.run(
        [sys.executable, "-c", "from fewstep.recovery import recovery_settings; recovery_settings()"],
        env={**env, "FEWSTEP_CONFIG_DIR": bad}, capture_output=True, text=True,
    )  # fmt: skip
    assert (
        run.returncode != 0 and "restore_after must be at least liveness_ttl + liveness_seconds" in run.stderr
    )
