"""Fault tests of a mixed, preemptible fleet (docs/RELIABILITY.md, tests (k) and (l)), against
the session's real redis-server and SeaweedFS with real worker processes, and the recovery of a
dead worker's messages (fewstep/recovery.py) against a real Redis.
"""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict

import boto3

from fewstep.contract import image_key_attempt
from fewstep.queue import queue_length, redis_client
from fewstep.storage import open_store
from tests.support import (
    attempt_records,
    cli,
    cli_json,
    start_worker,
    stop_worker,
    verify_job,
    wait_done,
    wait_for,
)
from tests.test_end_to_end import SAMPLE, enqueue
from tests.test_faults import assert_each_prompt_once, committed_count, half_written, log_text


def attempt_folders(job_url: str) -> dict[tuple[int, str], int]:
    """Objects per attempt folder under images/, as listed in storage."""
    folders: dict[tuple[int, str], int] = defaultdict(int)
    for key, _size in open_store(job_url).list("images/"):
        owner = image_key_attempt(key)
        assert owner is not None, f"{key} lies outside an attempt folder"
        folders[owner] += 1
    return dict(folders)


def listed_images(job_url: str) -> dict[str, tuple[int, str]]:
    """Every object under the job's ``images/``, listed with boto3 (none of fewstep's storage or
    key code), with the (shard, attempt id) its path ``images/part-N/<attempt>/...`` names."""
    bucket, _, prefix = job_url.removeprefix("s3://").partition("/")
    client = boto3.client(
        "s3",
        endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"],
        aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    found: dict[str, tuple[int, str]] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/images/"):
        for item in page.get("Contents", []):
            key = item["Key"].removeprefix(f"{prefix}/")
            _images, part, attempt, _name = key.split("/")
            found[key] = (int(part.removeprefix("part-")), attempt)
    return found


# --- (k) mixed workers, overlapping attempts ------------------------------------------------------


def test_k_mixed_batch_sizes_overlapping_attempts_verify_exact_and_gc_removes_only_losers(
    env, output, tmp_path
):
    # Two workers with different batch sizes (different bytes for the same seed on CPUs) and a
    # 2 s visibility timeout: every shard outlives it, so Redis hands running shards to the
    # other worker and attempts really overlap.
    short = {**env, "FEWSTEP_VISIBILITY_TIMEOUT": "2"}
    logs = [tmp_path / "b1.log", tmp_path / "b4.log"]
    workers = [
        start_worker(short, "--batch-size", size, log_path=path)
        for size, path in zip(("1", "4"), logs, strict=True)
    ]
    rows = 12
    try:
        wait_for(lambda: all(" ready." in log_text(p) for p in logs), 240, "both workers to be ready")
        job = enqueue(
            SAMPLE, "mixed", output, short, "--shard-size", "4", "--limit", str(rows), "--steps", "12"
        )
        url = job["job_url"]
        wait_done("mixed", output, short, timeout=420)
        records = {
            s: wait_for(lambda s=s: _ended(attempt_records(url, s)), 240, f"shard {s}'s attempts to end")
            for s in range(1, job["shards"] + 1)
        }
    finally:
        for worker in workers:
            stop_worker(worker)

    states = [r["state"] for shard in records.values() for r in shard]
    overlapping = [s for s, rs in records.items() if len(rs) > 1]
    assert overlapping, f"no shard ran twice: the test did not exercise overlapping attempts ({states})"
    assert all([r["state"] for r in rs].count("committed") == 1 for rs in records.values()), records
    assert "error" not in states  # a live attempt is no failure, so nothing was marked failed
    assert not list(open_store(url).list("failed/"))

    table = assert_each_prompt_once(url, rows)  # every prompt exactly once
    summary = verify_job("mixed", output, env)  # sha256 of every committed image
    assert summary["mismatches"] == 0 and summary["images_checked"] == rows
    committed = set(
        zip(table.column("part_id").to_pylist(), table.column("attempt_id").to_pylist(), strict=True)
    )
    # What storage holds, listed independently: the committed rows' images, and the losers'.
    before = listed_images(url)
    committed_keys = {key for key, owner in before.items() if owner in committed}
    loser_keys = set(before) - committed_keys
    assert committed_keys == set(table.column("image_key").to_pylist())
    assert loser_keys, f"no losing attempt wrote an image: gc --delete would prove nothing ({records})"
    by_owner = Counter(before.values())
    assert attempt_folders(url) == by_owner  # fewstep's listing agrees with boto3's
    losers = {owner: n for owner, n in by_owner.items() if owner not in committed}

    # gc: dry run by default, lists exactly the losers' folders, touches nothing.
    dry = cli_json("producer", "gc", "mixed", "--output", output, env=env)
    assert not dry["deleted"]
    assert {(f["shard"], f["attempt"]): f["objects"] for f in dry["folders"]} == losers
    assert dry["kept_committed_objects"] == rows
    assert set(listed_images(url)) == set(before)
    # Readers never list what losers left: status and verify count committed rows only.
    status = cli_json("producer", "status", "mixed", "--output", output, env=env)
    assert status["images_done"] == rows
    done = cli_json("producer", "gc", "mixed", "--output", output, "--delete", env=env)
    assert done["deleted"] and done["objects"] == len(loser_keys)
    # Exactly the losers' objects are gone; every committed object is still there.
    assert set(listed_images(url)) == committed_keys
    verify_job("mixed", output, env)  # the committed images were not touched


def _ended(records: list[dict]) -> list[dict] | None:
    return records if records and all(r["state"] != "running" for r in records) else None


# --- (l) SIGKILL with the default visibility timeout --------------------------------------------


def test_l_a_sigkilled_workers_shard_returns_without_the_visibility_timeout(env, output, tmp_path):
    assert "FEWSTEP_VISIBILITY_TIMEOUT" not in env  # the default: an hour
    job = enqueue(SAMPLE, "preempted", output, env, "--shard-size", "4", "--limit", "8", "--steps", "16")
    url = job["job_url"]
    a = start_worker(env, "--batch-size", "1", log_path=tmp_path / "a.log")
    try:
        shard = wait_for(lambda: half_written(url), 240, "worker A to be in the middle of a shard")
        a.kill()  # SIGKILL: no ack, no requeue; its message stays in Redis' unacked set
        a.wait(timeout=30)
    finally:
        a.kill()
    killed_at = time.monotonic()
    b = start_worker(env, log_path=tmp_path / "b.log")
    try:
        restored = 0
        # Restored within liveness_ttl + restore_after + scan_seconds (85 s by default), by
        # reconcile or by worker B's recoverer, then run by B.
        while time.monotonic() - killed_at < 180 and committed_count(url) < job["shards"]:
            summary = cli_json("producer", "reconcile", "preempted", "--output", output, "--json", env=env)
            restored += summary["restored_from_dead_workers"]
            time.sleep(5)
        wait_done("preempted", output, env, timeout=max(1.0, 180 - (time.monotonic() - killed_at)))
        took = time.monotonic() - killed_at
    finally:
        stop_worker(b)
    assert took < 180, f"job completed {took:.0f}s after the kill"
    log = log_text(tmp_path / "b.log")
    assert restored >= 1 or "no live worker named its delivery" in log  # by reconcile, or by worker B
    states = [r["state"] for r in attempt_records(url, shard)]
    assert states == ["running", "committed"], states
    assert_each_prompt_once(url, 8)
    verify_job("preempted", output, env)
    assert queue_length(redis_client(), job["queue"]) == 0


def test_gc_of_a_missing_job_is_one_line_and_non_zero(env, output):
    result = cli("producer", "gc", "no-such-job", "--output", output, env=env, check=False)
    assert result.returncode != 0 and "no job at" in result.stderr and "Traceback" not in result.stderr
