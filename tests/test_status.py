"""`producer status` and `producer jobs`: progress, rate, ETA, workers and errors, from storage."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import pytest

from fewstep.storage import open_store
from tests.support import cli, cli_json, committed_metadata, run_worker_until_idle
from tests.test_end_to_end import SAMPLE, enqueue


def iso(seconds_ago: float = 0.0) -> str:
    return (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds_ago)).isoformat()


def put_json(store, key: str, value: dict) -> None:
    store.put(key, json.dumps(value).encode())


def heartbeat(worker: str, shard: int | None, seconds_ago: float, rate: float) -> dict:
    """A heartbeat in the shape worker/heartbeat.py writes."""
    return {
        "worker": worker, "host": worker.split(":")[0], "pid": 1, "model": "tiny", "device": "cuda:0",
        "job": "fleet", "state": "working", "shard": shard, "attempt": 1,
        "shard_started_at": iso(seconds_ago), "shards_done": 1, "images_done": 4, "images_per_s": rate,
        "started_at": iso(600),
        "last_seen": iso(seconds_ago), "interval_s": 5, "last_error": None, "version": "0.1.0",
    }  # fmt: skip


def staged_job(env, output) -> tuple[dict, object]:
    """8 queued shards of 4 prompts; shards 1-2 committed, 3 given up, 4 and 5 claimed by workers
    (one live, one silent for 10 minutes), with stats and markers as the workers write them."""
    summary = enqueue(SAMPLE, "fleet", output, env, "--shard-size", "4")
    store = open_store(summary["job_url"])
    for shard in (1, 2):
        store.put(f"metadata/part-{shard:06d}.parquet", b"")  # status only lists commit markers
        put_json(store, f"stats/part-{shard:06d}.json", {
            "shard": shard, "attempt": 1, "worker": "gpu-a:1:cuda:0", "images": 4, "seconds": 2.0,
            "generate_s": 1.5, "encode_s": 0.3, "upload_s": 0.2, "gpu_idle_fraction": 0.1,
            "images_per_s": 2.0, "finished_at": iso(30),
        })  # fmt: skip
    put_json(store, "failed/part-000003.json", {
        "shard": 3, "attempts": 3, "error": "RuntimeError: CUDA out of memory", "worker": "gpu-b:7:cuda:1",
        "failed_at": iso(60),
    })  # fmt: skip
    put_json(store, "workers/gpu-a-1-cuda-0.json", heartbeat("gpu-a:1:cuda:0", 4, 1, 3.5))
    put_json(store, "workers/gpu-b-7-cuda-1.json", heartbeat("gpu-b:7:cuda:1", 5, 600, 9.0))
    return summary, store


def test_status_json_counts_shards_workers_rate_and_errors(env, output):
    staged_job(env, output)
    s = cli_json("producer", "status", "fleet", "--output", output, env=env)
    assert (s["state"], s["model"], s["shards_total"], s["images_total"]) == ("running", "tiny", 8, 32)
    assert (s["shards_done"], s["shards_failed"], s["images_done"]) == (2, 1, 8)
    assert s["shards_running"] == 1  # the silent worker's shard 5 counts as queued again
    assert s["shards_queued"] == 4  # 4 of 8 messages wait in Redis for shards still open
    assert s["queue"]["reachable"] is True
    assert s["workers_live"] == 1
    assert [(w["worker"], w["live"]) for w in s["workers"]] == [
        ("gpu-a:1:cuda:0", True),
        ("gpu-b:7:cuda:1", False),
    ]
    assert (s["images_per_s"], s["rate_source"]) == (3.5, "heartbeats")
    assert abs(s["eta_s"] - (32 - 8 - 4) / 3.5) < 0.2  # the given-up shard 3 waits for no one
    assert s["failures"][0]["part"] == "part-000003" and "CUDA out of memory" in s["failures"][0]["error"]
    assert s["last_errors"][0]["error"] == "RuntimeError: CUDA out of memory"
    assert s["stages"]["generate_s"] == 3.0 and s["stages"]["gpu_idle_fraction"] == 0.1


def test_status_works_from_storage_alone_when_redis_is_gone(env, output):
    staged_job(env, output)
    gone = {**env, "CELERY_BROKER_URL": "redis://:secret@127.0.0.1:9/0"}
    s = cli_json("producer", "status", "fleet", "--output", output, env=gone)
    assert (s["shards_done"], s["shards_failed"], s["shards_running"]) == (2, 1, 1)
    assert s["shards_queued"] is None and s["queue"]["reachable"] is False
    assert "secret" not in json.dumps(s)
    view = cli("producer", "status", "fleet", "--output", output, env={**gone, "COLUMNS": "160"}).stdout
    assert "? queued" in view and "queued shards unknown" in view
    assert "gpu-a:1:cuda:0" in view and "CUDA out of memory" in view


def test_watch_follows_a_real_worker_until_done_and_the_worker_leaves_a_heartbeat(env, output, tmp_path):
    job = enqueue(SAMPLE, "watched", output, env, "--shard-size", "4")
    command = [sys.executable, "-m", "producer", "status", "watched", "--output", output, "--watch"]
    view_env = {**env, "COLUMNS": "200"}
    view = subprocess.Popen([*command, "--interval", "0.5"], env=view_env, stdout=subprocess.PIPE, text=True)
    lines = subprocess.Popen(
        [*command, "--json", "--interval", "0.5"], env=view_env, stdout=subprocess.PIPE, text=True
    )
    try:
        run_worker_until_idle(env, tmp_path / "worker.log")
        out, _ = view.communicate(timeout=120)
        objects = [json.loads(line) for line in lines.communicate(timeout=120)[0].splitlines()]
    finally:
        view.kill()
        lines.kill()
    assert view.returncode == 0 and lines.returncode == 0
    assert "[done]" in out and "32/32" in out and "8 done" in out
    assert objects[0]["state"] != "done" and objects[-1]["state"] == "done"
    assert objects[-1]["images_done"] == 32

    worker_id = committed_metadata(job["job_url"]).column("worker")[0].as_py()
    assert worker_id in out
    store = open_store(job["job_url"])
    [(key, _size)] = list(store.list("workers/"))
    beat = json.loads(store.get(key))
    assert (beat["worker"], beat["model"], beat["device"], beat["job"]) == (
        worker_id,
        "tiny",
        "cpu",
        "watched",
    )
    assert (beat["state"], beat["shards_done"], beat["images_done"], beat["shard"]) == (
        "stopped",
        8,
        32,
        None,
    )
    assert beat["images_per_s"] > 0 and beat["last_error"] is None


def test_jobs_lists_the_jobs_under_an_output_with_state_and_counts(env, output, tmp_path):
    enqueue(SAMPLE, "waiting", output, env, "--shard-size", "16")
    open_store(output).put("notes/readme.txt", b"not a job")
    listing = cli_json("producer", "jobs", "--output", output, env=env)
    assert [(j["job"], j["state"], j["shards_done"], j["shards_total"]) for j in listing["jobs"]] == [
        ("waiting", "queued", 0, 2)
    ]
    run_worker_until_idle(env, tmp_path / "worker.log")
    [row] = cli_json("producer", "jobs", "--output", output, env=env)["jobs"]
    assert (row["state"], row["images_done"], row["finalized_at"]) == ("done", 32, None)
    empty = tmp_path / "empty-output"
    assert "no jobs under" in cli("producer", "jobs", "--output", str(empty), env=env).stdout


def test_status_of_a_job_never_shows_another_jobs_worker_error(env, output):
    staged_job(env, output)
    store = open_store(f"{output}/fleet")
    other = dict(heartbeat("gpu-c:3:cpu", 6, 1, 1.0), last_error={
        "job_url": f"{output}/scored2", "shard": 4, "at": iso(2),
        "error": "Retry: cannot load scorer model openai/clip-vit-large-patch14",
    })  # fmt: skip
    own = dict(heartbeat("gpu-d:4:cpu", 7, 1, 1.0), last_error={
        "job_url": f"{output}/fleet", "shard": 7, "at": iso(1), "error": "OSError: disk full",
    })  # fmt: skip
    unnamed = dict(heartbeat("gpu-e:5:cpu", 8, 1, 1.0), last_error={"shard": 2, "at": iso(1), "error": "old"})
    for name, beat in (("c", other), ("d", own), ("e", unnamed)):
        put_json(store, f"workers/gpu-{name}.json", beat)
    s = cli_json("producer", "status", "fleet", "--output", output, env=env)
    errors = [e["error"] for e in s["last_errors"]]
    assert "OSError: disk full" in errors and "RuntimeError: CUDA out of memory" in errors
    assert not any("scorer" in e or e == "old" for e in errors)
    by_worker = {w["worker"]: w["last_error"] for w in s["workers"]}
    assert by_worker["gpu-c:3:cpu"] is None and by_worker["gpu-e:5:cpu"] is None
    assert by_worker["gpu-d:4:cpu"]["error"] == "OSError: disk full"


def test_a_heartbeat_carries_only_the_last_error_of_its_own_job():
    from worker.heartbeat import Activity

    activity = Activity("host:1:cpu", "tiny", "cpu")
    activity.shard_started({"job_url": "s3://b/jobs/scored2", "shard": 4})
    activity.error(RuntimeError("cannot load scorer model"))
    assert activity.record("working", 5)["last_error"]["job_url"] == "s3://b/jobs/scored2"
    activity.shard_finished(None, "RETRY")
    activity.shard_started({"job_url": "s3://b/jobs/killme", "shard": 1})
    assert activity.record("working", 5)["last_error"] is None


def test_status_says_to_reconcile_shards_redis_lost_and_gives_no_eta_without_a_live_worker(env, output):
    from fewstep.queue import redis_client

    summary, store = staged_job(env, output)
    redis_client().delete(summary["queue"])  # as after a flush: the waiting messages are gone
    s = cli_json("producer", "status", "fleet", "--output", output, env=env)
    assert (s["shards_queued"], s["shards_unqueued"], s["shards_running"]) == (0, 4, 1)
    view = cli("producer", "status", "fleet", "--output", output, env=env).stdout
    assert "4 open shards are neither queued nor running" in view
    assert "`producer reconcile fleet` sends them again" in view
    # The live worker goes silent: nothing moves, so no ETA, however fast the last shards were.
    put_json(store, "workers/gpu-a-1-cuda-0.json", heartbeat("gpu-a:1:cuda:0", 4, 600, 3.5))
    s = cli_json("producer", "status", "fleet", "--output", output, env=env)
    assert s["workers_live"] == 0 and s["eta_s"] is None
    assert "ETA - (no live worker)" in cli("producer", "status", "fleet", "--output", output, env=env).stdout
    # Every open shard given up: the job failed, no ETA either.
    for shard in (4, 5, 6, 7, 8):
        put_json(store, f"failed/part-{shard:06d}.json", {"shard": shard, "attempts": 3, "error": "x"})
    s = cli_json("producer", "status", "fleet", "--output", output, env=env)
    assert (s["state"], s["eta_s"], s["shards_unqueued"]) == ("failed", None, 0)


def test_jobs_and_status_in_a_pipe_keep_whole_names_and_watch_prints_a_frame_per_refresh(env, output):
    names = ("sample-one-with-a-long-name", "sample-two-with-a-long-name")
    for name in names:
        enqueue(SAMPLE, name, output, env, "--shard-size", "16")
    piped = {k: v for k, v in env.items() if k != "COLUMNS"}
    listing = cli("producer", "jobs", "--output", output, env=piped).stdout
    assert all(name in listing for name in names) and "…" not in listing
    # --watch into a pipe: frames as the job is read, not one at the end (the job stays queued).
    command = [sys.executable, "-m", "producer", "status", names[0], "--output", output, "--watch"]
    with pytest.raises(subprocess.TimeoutExpired) as stopped:
        subprocess.run([*command, "--interval", "0.5"], env=piped, capture_output=True, timeout=20)
    frames = (stopped.value.stdout or b"").decode().splitlines()
    headers = [line for line in frames if line.startswith(f"job {names[0]} [queued]")]
    assert len(headers) >= 2, frames
