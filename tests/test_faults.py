"""Nothing lost, nothing doubled: real workers killed, stopped, raced and cut off.

Each scenario runs real worker processes against a real Redis and a real SeaweedFS and
ends by reading the committed metadata: every prompt exactly once, and ``producer
verify`` finds every image with the size and sha256 its row records. Shards are made
slow with more denoising steps of the tiny model, never with sleeps in the code.
The scenarios are described in docs/RELIABILITY.md.
"""

from __future__ import annotations

import io
import json
import secrets
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fewstep.contract import ShardMessage, failed_key, manifest_key, metadata_key
from fewstep.queue import celery_app, queue_length, redis_client, send_shards
from fewstep.services import Services, free_port
from fewstep.storage import open_store
from producer.sources.partiprompts import parse
from tests.support import (
    attempt_records,
    cli,
    cli_json,
    committed_metadata,
    config_dir,
    start_worker,
    stop_worker,
    verify_job,
    wait_done,
    wait_for,
)
from tests.test_end_to_end import SAMPLE, enqueue

PROMPTS = parse(SAMPLE.read_bytes(), str(SAMPLE))["prompt"]
# Columns that differ between two runs of the same spec; everything else must be equal.
PER_RUN = {"worker", "created_at", "gen_ms", "attempt", "attempt_id", "image_key"}


def assert_each_prompt_once(job_url: str, rows: int = len(PROMPTS)) -> pa.Table:
    """The committed metadata holds rows 0..rows-1 once each, with their prompts byte-exact."""
    table = committed_metadata(job_url)
    row_ids = table.column("row_id").to_pylist()
    lost, duplicates = sorted(set(range(rows)) - set(row_ids)), len(row_ids) - len(set(row_ids))
    assert (lost, duplicates) == ([], 0), f"prompts lost: {lost}, duplicates: {duplicates}"
    assert row_ids == list(range(rows))
    assert table.column("prompt").to_pylist() == PROMPTS[:rows]
    return table


def finish(job: str, output: str, env: dict[str, str], tmp_path, rows: int) -> pa.Table:
    """A fresh worker completes the job; then every prompt is there once and verify passes."""
    worker = start_worker(env, log_path=tmp_path / "finish.log")
    try:
        status = wait_done(job, output, env, timeout=420)
    finally:
        stop_worker(worker)
    table = assert_each_prompt_once(status["job_url"], rows)
    verify_job(job, output, env)
    return table


def keys_under(job_url: str, prefix: str) -> list[str]:
    return [key for key, _ in open_store(job_url).list(prefix)]


def half_written(job_url: str) -> int | None:
    """A shard with images in storage and no commit marker: a worker is in its middle."""
    committed = set(keys_under(job_url, "metadata/"))
    for key in keys_under(job_url, "images/"):
        shard = int(key.split("/")[1].removeprefix("part-"))
        if f"metadata/part-{shard:06d}.parquet" not in committed:
            return shard
    return None


def committed_count(job_url: str) -> int:
    return len(keys_under(job_url, "metadata/"))


def ended(records: list[dict]) -> bool:
    return all(r["state"] != "running" for r in records)


def log_text(path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


# --- (a) SIGKILL ------------------------------------------------------------------------


def test_a_worker_killed_mid_shard_its_shard_is_redelivered_and_committed_once(env, output, tmp_path):
    env = {**env, "FEWSTEP_VISIBILITY_TIMEOUT": "8"}
    job = enqueue(SAMPLE, "killed", output, env, "--shard-size", "8", "--limit", "16", "--steps", "16")
    url = job["job_url"]
    a = start_worker(env, log_path=tmp_path / "a.log")
    try:
        shard = wait_for(lambda: half_written(url), 240, "worker A to be in the middle of a shard")
        a.kill()
        a.wait(timeout=30)
    finally:
        a.kill()
    assert not open_store(url).exists(metadata_key(shard))
    finish("killed", output, env, tmp_path, 16)
    records = attempt_records(url, shard)
    # A's record never got an outcome (its worker died); the redelivered message committed.
    assert [r["state"] for r in records] == ["running", "committed"]
    assert records[1]["redelivered"] is True
    assert records[0]["worker"] != records[1]["worker"]


# --- (b) visibility timeout ---------------------------------------------------------------


def test_b_shard_outliving_the_visibility_timeout_commits_once_and_equals_a_clean_run(env, output, tmp_path):
    # Two idle workers; one takes the shard, and once the shard is older than the 2 s
    # visibility timeout Redis hands it to the other while the first still runs it.
    short = {**env, "FEWSTEP_VISIBILITY_TIMEOUT": "2"}
    args = ("--shard-size", "8", "--limit", "8", "--steps", "24")
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    workers = [start_worker(short, "--batch-size", "2", log_path=path) for path in logs]
    try:
        wait_for(lambda: all(" ready." in log_text(p) for p in logs), 240, "both workers to be ready")
        url = enqueue(SAMPLE, "late", output, short, *args)["job_url"]
        wait_done("late", output, short, timeout=420)
        records = wait_for(
            lambda: (r := attempt_records(url, 1)) and len(r) >= 2 and ended(r) and r,
            240,
            "both attempts to end",
        )
    finally:
        for worker in workers:
            stop_worker(worker)
    states = [r["state"] for r in records]
    assert states.count("committed") == 1, states
    assert set(states) == {"committed", "superseded"}, states
    assert any(r["redelivered"] for r in records)
    assert "visibility timeout" in log_text(logs[0]) + log_text(logs[1])  # the loud warning
    late = assert_each_prompt_once(url, 8)
    verify_job("late", output, env)

    # The same spec run cleanly by one worker gives the same rows and the same image bytes
    # (with the same batch size: batch-mates change the last bit of some pixels on CPUs).
    clean = enqueue(SAMPLE, "late-clean", output, env, *args)
    c = start_worker(env, "--batch-size", "2", log_path=tmp_path / "c.log")
    try:
        wait_done("late-clean", output, env, timeout=420)
    finally:
        stop_worker(c)
    reference = assert_each_prompt_once(clean["job_url"], 8)
    columns = [c for c in late.column_names if c not in PER_RUN]
    assert late.select(columns).equals(reference.select(columns))
    late_store, clean_store = open_store(url), open_store(clean["job_url"])
    keys = zip(late.column("image_key").to_pylist(), reference.column("image_key").to_pylist(), strict=True)
    for late_key, clean_key in keys:
        assert late_store.get(late_key) == clean_store.get(clean_key)


# --- (c) SIGTERM ------------------------------------------------------------------------------


def test_c_sigterm_finishes_the_shard_in_progress_and_takes_no_other(env, output, tmp_path):
    job = enqueue(SAMPLE, "drain", output, env, "--shard-size", "8", "--limit", "16", "--steps", "16")
    url = job["job_url"]
    a = start_worker(env, "--shutdown-grace", "300", log_path=tmp_path / "a.log")
    try:
        wait_for(lambda: half_written(url), 240, "worker A to be in the middle of a shard")
        a.terminate()
        assert a.wait(timeout=300) == 0
    finally:
        a.kill()
    assert committed_count(url) == 1  # the shard in progress was finished and committed
    assert queue_length(redis_client(), job["queue"]) == 1  # the other one was never taken
    (first,) = keys_under(url, "attempts/")
    assert json.loads(open_store(url).get(first))["state"] == "committed"
    finish("drain", output, env, tmp_path, 16)


def test_c_sigterm_past_the_grace_period_returns_the_shard_to_the_queue(env, output, tmp_path):
    job = enqueue(SAMPLE, "requeue", output, env, "--shard-size", "16", "--limit", "16", "--steps", "8")
    url = job["job_url"]
    a = start_worker(env, "--shutdown-grace", "0", "--batch-size", "2", log_path=tmp_path / "a.log")
    try:
        wait_for(lambda: half_written(url), 240, "worker A to be in the middle of the shard")
        a.terminate()
        assert a.wait(timeout=120) == 0
    finally:
        a.kill()
    store = open_store(url)
    assert not store.exists(metadata_key(1))
    assert queue_length(redis_client(), job["queue"]) == 1  # rejected back onto the queue
    assert [r["state"] for r in attempt_records(url, 1)] == ["interrupted"]
    # An expected path: the task's warning and Celery's one line, no traceback.
    log = (tmp_path / "a.log").read_text(errors="replace")
    assert "shutdown grace over, returning it to the queue" in log and "worker shutting down" in log
    assert "Traceback" not in log, log[-3000:]
    finish("requeue", output, env, tmp_path, 16)
    assert [r["state"] for r in attempt_records(url, 1)] == ["interrupted", "committed"]
    assert not store.exists(failed_key(1))


# --- (d) Redis lost -------------------------------------------------------------------------------


@pytest.fixture
def own_redis(local_services, tmp_path, monkeypatch):
    """A Redis of this test's own (it gets killed), next to the session's SeaweedFS."""
    svc = Services(
        directory=str(tmp_path / "redis"),
        redis_port=free_port(),
        redis_password=secrets.token_urlsafe(18),
        s3_port=local_services.s3_port,
        access_key=local_services.access_key,
        secret_key=local_services.secret_key,
    )
    (tmp_path / "redis").mkdir()
    svc.start_redis()
    monkeypatch.setenv("CELERY_BROKER_URL", svc.broker_url)
    yield svc
    svc.stop_redis()


def test_d_redis_restarted_empty_mid_job_reconcile_completes_it(env, own_redis, output, tmp_path):
    env = {**env, "CELERY_BROKER_URL": own_redis.broker_url}
    job = enqueue(SAMPLE, "amnesia", output, env, "--shard-size", "4", "--steps", "12")
    url = job["job_url"]
    a = start_worker(env, log_path=tmp_path / "a.log")
    try:
        wait_for(lambda: committed_count(url) >= 1, 240, "a first committed shard")
        own_redis.stop_redis()
        own_redis.start_redis()  # no persistence: every queued shard is forgotten
        assert queue_length(redis_client(), job["queue"]) == 0
        assert cli_json("producer", "status", "amnesia", "--output", output, env=env)["state"] != "done"
        summary = cli_json("producer", "reconcile", "amnesia", "--output", output, env=env)
        assert summary["enqueued"] >= 1
        assert summary["enqueued"] + summary["already_done"] + summary["already_queued"] <= job["shards"]
        wait_done("amnesia", output, env, timeout=420)
        assert a.poll() is None  # the worker reconnected by itself
    finally:
        stop_worker(a)
    assert_each_prompt_once(url)
    verify_job("amnesia", output, env)


# --- (e) storage outage ----------------------------------------------------------------------------


@pytest.fixture
def own_storage(local_services, tmp_path, monkeypatch):
    """A SeaweedFS of this test's own (it gets stopped), next to the session's Redis."""
    (tmp_path / "weed").mkdir()
    svc = Services(
        directory=str(tmp_path / "weed"),
        redis_port=local_services.redis_port,
        redis_password=local_services.redis_password,
        s3_port=free_port(),
        access_key="fewstep" + secrets.token_hex(6),
        secret_key=secrets.token_urlsafe(24),
        buckets=["fewstep-outage"],
    )
    svc.start_weed()
    for key, value in svc.env().items():
        monkeypatch.setenv(key, value)
    yield svc
    svc.stop_weed()


def test_e_storage_stopped_mid_job_and_restarted_job_completes_without_partial_commit(
    env, own_storage, tmp_path
):
    config = config_dir(
        tmp_path, storage={"retry_seconds": 2}, worker={"storage_retry_delay": 2, "error_retry_delay": 2}
    )
    env = {**env, **own_storage.env(), "FEWSTEP_CONFIG_DIR": config}
    output = "s3://fewstep-outage/runs"
    job = enqueue(SAMPLE, "outage", output, env, "--shard-size", "4", "--steps", "12")
    url = job["job_url"]
    log = tmp_path / "a.log"
    a = start_worker(env, log_path=log)
    try:
        wait_for(lambda: committed_count(url) >= 1, 240, "a first committed shard")
        own_storage.stop_weed()
        wait_for(lambda: "storage unavailable" in log_text(log), 120, "the worker to notice the outage")
        time.sleep(3)
        own_storage.start_weed()
        wait_done("outage", output, env, timeout=420)
    finally:
        stop_worker(a)
    assert_each_prompt_once(url)
    verify_job("outage", output, env)  # every committed shard is whole
    assert "retrying in" in log_text(log)


# --- (f) racing workers -----------------------------------------------------------------------------


def test_f_two_workers_racing_on_one_shard_commit_it_exactly_once(env, output, tmp_path):
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    workers = [start_worker(env, log_path=path) for path in logs]
    try:
        wait_for(lambda: all(" ready." in log_text(p) for p in logs), 240, "both workers to be ready")
        job = enqueue(SAMPLE, "race", output, env, "--shard-size", "16", "--limit", "16", "--steps", "16")
        url = job["job_url"]
        duplicate = ShardMessage(url, 1, manifest_key(1), 1)
        assert send_shards(celery_app(), [duplicate], job["queue"]) == 1
        wait_done("race", output, env, timeout=600)  # about 40 s on a quiet machine
        records = wait_for(
            lambda: (r := attempt_records(url, 1)) and len(r) == 2 and ended(r) and r, 240, "both attempts"
        )
    finally:
        for worker in workers:
            stop_worker(worker)
    assert sorted(r["state"] for r in records) == ["committed", "superseded"]
    assert records[0]["worker"] != records[1]["worker"]
    assert_each_prompt_once(url, 16)
    verify_job("race", output, env)


# --- (g) crash between the images and the commit ---------------------------------------------


def test_g_crash_after_image_uploads_before_commit_redoes_only_that_shard(env, output, tmp_path):
    env = {**env, "FEWSTEP_VISIBILITY_TIMEOUT": "5"}
    job = enqueue(SAMPLE, "precommit", output, env, "--shard-size", "8", "--limit", "24")
    url = job["job_url"]
    store = open_store(url)
    crashing = {**env, "FEWSTEP_FAILPOINT": "before-commit:part-000002"}
    a = start_worker(crashing, log_path=tmp_path / "a.log")
    try:
        assert a.wait(timeout=240) != 0  # killed itself at the failpoint
    finally:
        a.kill()
    assert store.exists(metadata_key(1)) and not store.exists(metadata_key(2))
    assert len(keys_under(url, "images/part-000002/")) == 8  # every image written, no commit
    crashed = {key.rsplit("/", 2)[-2] for key in keys_under(url, "images/part-000002/")}
    first = store.get(metadata_key(1))
    finish("precommit", output, env, tmp_path, 24)
    assert store.get(metadata_key(1)) == first  # shard 1 was not redone
    # The redo wrote its own folder; the crashed attempt's images are left to `producer gc`.
    assert set(committed_metadata(url).column("attempt_id").to_pylist()).isdisjoint(crashed)
    garbage = cli_json("producer", "gc", "precommit", "--output", output, "--delete", env=env)
    assert [(f["shard"], f["attempt"], f["objects"]) for f in garbage["folders"]] == [(2, crashed.pop(), 8)]
    assert garbage["kept_committed_objects"] == 24
    verify_job("precommit", output, env)
    assert [r["state"] for r in attempt_records(url, 1)] == ["committed"]
    assert [r["state"] for r in attempt_records(url, 2)] == ["running", "committed"]
    assert [r["state"] for r in attempt_records(url, 3)] == ["committed"]


# --- failed shards ----------------------------------------------------------------------------------


def test_a_shard_failing_every_attempt_is_marked_failed_and_retry_failed_completes_it(env, output, tmp_path):
    config = config_dir(tmp_path, worker={"max_attempts": 2, "error_retry_delay": 1})
    env = {**env, "FEWSTEP_CONFIG_DIR": config}
    job = enqueue(SAMPLE, "poison", output, env, "--shard-size", "8", "--limit", "24")
    url = job["job_url"]
    store = open_store(url)
    manifest = store.get(manifest_key(2))
    store.put(manifest_key(2), b"not a parquet file")
    log = tmp_path / "a.log"
    a = start_worker(env, log_path=log)
    try:
        status = wait_for(
            lambda: (
                (s := cli_json("producer", "status", "poison", "--output", output, env=env))["state"]
                == "failed"
                and s
            ),
            240,
            "the job to end with one failed shard",
        )
        assert (status["shards_done"], status["shards_failed"]) == (2, 1)
        marker = json.loads(store.get(failed_key(2)))
        assert marker["attempts"] == 2 and "Parquet" in marker["last_error"]
        assert queue_length(redis_client(), job["queue"]) == 0  # it no longer blocks the queue

        store.put(manifest_key(2), manifest)  # the cause is fixed
        retried = cli_json("producer", "retry", "poison", "--output", output, "--failed", env=env)
        assert retried["retried"] == [2] and retried["enqueued"] == 1
        wait_done("poison", output, env, timeout=300)
    finally:
        stop_worker(a)
    states = [r["state"] for r in attempt_records(url, 2)]
    assert states == ["error", "error", "retry_requested", "committed"]
    assert not store.exists(failed_key(2))
    assert_each_prompt_once(url, 24)
    verify_job("poison", output, env)


def test_a_shard_that_kills_every_worker_is_marked_failed(env, output, tmp_path):
    config = config_dir(tmp_path, worker={"max_attempts": 2})
    env = {**env, "FEWSTEP_CONFIG_DIR": config, "FEWSTEP_VISIBILITY_TIMEOUT": "3"}
    job = enqueue(SAMPLE, "crashloop", output, env, "--shard-size", "4", "--limit", "4")
    url = job["job_url"]
    crashing = {**env, "FEWSTEP_FAILPOINT": "before-commit:part-000001"}
    for n in range(2):
        worker = start_worker(crashing, log_path=tmp_path / f"crash{n}.log")
        try:
            assert worker.wait(timeout=240) != 0
        finally:
            worker.kill()
    last = start_worker(env, log_path=tmp_path / "last.log")
    try:
        wait_for(lambda: open_store(url).exists(failed_key(1)), 240, "the shard to be marked failed")
    finally:
        stop_worker(last)
    marker = json.loads(open_store(url).get(failed_key(1)))
    assert marker["attempts"] == 2 and marker["workers_lost"] == 2
    assert not open_store(url).exists(metadata_key(1))
    assert cli_json("producer", "status", "crashloop", "--output", output, env=env)["state"] == "failed"


def test_a_worker_storage_refuses_stops_and_leaves_the_shards_queued(env, output, tmp_path):
    job = enqueue(SAMPLE, "refused", output, env, "--shard-size", "16")
    worker = start_worker({**env, "AWS_SECRET_ACCESS_KEY": "wrong-secret"}, log_path=tmp_path / "a.log")
    try:
        assert worker.wait(timeout=240) != 0
    finally:
        worker.kill()
    assert queue_length(redis_client(), job["queue"]) == job["shards"]  # nothing drained
    assert "rejected the credentials" in log_text(tmp_path / "a.log")
    assert "wrong-secret" not in log_text(tmp_path / "a.log")


# --- the commit itself, on real storage ---------------------------------------------------------


def _shard_table(store, rows: int, worker: str, attempt: str | None = None) -> pa.Table:
    from fewstep.contract import METADATA_CORE, image_key

    attempt = attempt or f"20250102T030405.000000Z-{worker}"
    keys = [image_key(1, attempt, r, "png") for r in range(rows)]
    for key in keys:
        store.put(key, b"x" * 10)
    columns = {name: [None] * rows for name in METADATA_CORE.names}
    columns.update(
        image_key=keys,
        sha256=["0" * 64] * rows,
        bytes=[10] * rows,
        worker=[worker] * rows,
        attempt_id=[attempt] * rows,
    )
    return pa.Table.from_pydict(columns, schema=METADATA_CORE)


@pytest.mark.parametrize("kind", ["s3", "local"])
def test_commit_is_conditional_and_refuses_a_partial_shard(env, output, tmp_path, kind):
    from worker.commit import IncompleteShard, commit

    store = open_store(f"{output}/commit" if kind == "s3" else str(tmp_path / "out"))
    first, second = _shard_table(store, 3, "first"), _shard_table(store, 3, "second")
    missing = first.column("image_key")[2].as_py()
    store.delete(missing)
    # The other attempt's complete folder does not make this attempt's shard complete.
    with pytest.raises(IncompleteShard, match="1 of 3 images missing"):
        commit(store, 1, first, 3)
    assert not store.exists(metadata_key(1))
    with pytest.raises(IncompleteShard, match="metadata has 3 rows, manifest 4"):
        commit(store, 1, first, 4)
    mixed = pa.concat_tables([first.slice(0, 2), second.slice(2)])
    with pytest.raises(IncompleteShard, match="rows of 2 attempts"):
        commit(store, 1, mixed, 3)
    store.put(missing, b"x" * 10)
    assert commit(store, 1, first, 3) is True
    assert commit(store, 1, second, 3) is False  # lost the race: the marker is untouched
    assert commit(store, 1, first, 3) is True  # a retried write of our own bytes is ours
    marker = pq.read_table(io.BytesIO(store.get(metadata_key(1))))
    assert set(marker.column("worker").to_pylist()) == {"first"}


def test_verify_reports_a_damaged_image_and_exits_non_zero(env, output, tmp_path):
    enqueue(SAMPLE, "damaged", output, env, "--shard-size", "16")
    worker = start_worker(env, log_path=tmp_path / "a.log")
    try:
        job = wait_done("damaged", output, env)
    finally:
        stop_worker(worker)
    verify_job("damaged", output, env)
    store = open_store(job["job_url"])
    table = committed_metadata(job["job_url"])
    key = table.column("image_key")[3].as_py()
    store.put(key, store.get(key)[:-1] + b"\0")  # same size, other bytes
    store.delete(table.column("image_key")[20].as_py())
    result = cli("producer", "verify", "damaged", "--output", output, env=env, check=False)
    assert result.returncode == 1
    assert "sha256 differs" in result.stdout and "missing" in result.stdout
    assert "2 mismatches" in result.stdout
