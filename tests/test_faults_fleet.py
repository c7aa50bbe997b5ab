"""Fault tests of a mixed, preemptible fleet (docs/RELIABILITY.md, tests (k) and (l)), against
the session's real redis-server and SeaweedFS with real worker processes, and the recovery of a
dead worker's messages (fewstep/recovery.py) against a real Redis.
"""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict

import boto3

from fewstep.contract import image_key_attempt, metadata_key
from fewstep.queue import queue_length, redis_client
from fewstep.storage import open_store
from tests.s3_gateway import S3Gateway
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
    env, output, local_services, tmp_path
):
    # Two workers with different batch sizes (different bytes for the same seed on CPUs) and a
    # 2 s visibility timeout run one shard at the same time. The batch-1 worker takes it first
    # and writes every image, but its storage is slow to take the commit marker (a gateway holds
    # that one write); meanwhile Redis hands the shard to the batch-4 worker, which runs it
    # whole and commits first. The batch-1 attempt is then a loser that wrote every image: what
    # gc must remove. (Left to timing alone, the late attempt often sees the commit before its
    # first upload and writes nothing, and gc would prove nothing.)
    short = {**env, "FEWSTEP_VISIBILITY_TIMEOUT": "2"}
    svc = local_services
    logs = [tmp_path / "b1.log", tmp_path / "b4.log"]
    rows = 8
    marker = metadata_key(1)
    with S3Gateway(svc.s3_endpoint, svc.access_key, svc.secret_key, hold=marker) as gateway:
        workers = [
            start_worker({**short, "AWS_ENDPOINT_URL_S3": gateway.url}, "--batch-size", "1", log_path=logs[0])
        ]
        try:
            wait_for(lambda: " ready." in log_text(logs[0]), 240, "the batch-1 worker to be ready")
            size = ("--shard-size", str(rows), "--limit", str(rows))
            job = enqueue(SAMPLE, "mixed", output, short, *size, "--steps", "12")
            url = job["job_url"]
            wait_for(lambda: attempt_folders(url), 240, "the batch-1 worker's first image")
            workers.append(start_worker(short, "--batch-size", "4", log_path=logs[1]))
            wait_done("mixed", output, short, timeout=420)  # committed by the batch-4 worker
            assert gateway.holding.is_set(), "the batch-1 worker never tried to commit"
            gateway.release()
            records = wait_for(lambda: _ended(attempt_records(url, 1)), 240, "both attempts to end")
        finally:
            gateway.release()  # where the test failed early: a held worker can still stop
            for worker in workers:
                stop_worker(worker)

    states = [r["state"] for r in records]
    # The first delivery (batch 1) lost to the redelivery (batch 4), which ran at the same time.
    assert [(r["state"], r["redelivered"]) for r in records] == [("superseded", False), ("committed", True)]
    # The loser's conditional write of the marker reached storage and was refused (412).
    assert [
        status for path, status in gateway.conditional_puts if path.endswith(marker) and status != 503
    ] == [412]
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
    assert len(loser_keys) == rows, records  # the loser wrote every image before it lost
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


RECOVERY = {"liveness_seconds": 1, "liveness_ttl": 6, "restore_after": 9, "scan_seconds": 2}


def test_l_a_sigkilled_workers_shard_returns_without_the_visibility_timeout(env, output, tmp_path):
    assert "FEWSTEP_VISIBILITY_TIMEOUT" not in env  # the default: an hour
    # Recovery settings 5× shorter than the defaults (which the compose-stack test runs with):
    # the same mechanism, a kill-to-requeue bound of 17 s instead of 85 s.
    env = {**env, "FEWSTEP_CONFIG_DIR": config_dir(tmp_path, recovery=RECOVERY)}
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
        # Restored within liveness_ttl + restore_after + scan_seconds (17 s here), by reconcile
        # or by worker B's recoverer, then run by B.
        while time.monotonic() - killed_at < 180 and committed_count(url) < job["shards"]:
            summary = cli_json("producer", "reconcile", "preempted", "--output", output, "--json", env=env)
            restored += summary["restored_from_dead_workers"]
            time.sleep(2)
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
