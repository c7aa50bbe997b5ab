"""Watching the fleet: heartbeats in storage, the worker's Prometheus endpoint, Flower on task events."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from fewstep.services import free_port
from fewstep.storage import KeyMissing, open_store
from tests.conftest import BUCKET
from tests.support import run_worker_until_idle, start_worker, wait_done, wait_for
from tests.test_end_to_end import SAMPLE, enqueue
from worker.heartbeat import Activity, Heartbeat


def test_heartbeat_follows_shards_and_errors_as_celery_signals_report_them(env, output):
    job_url = f"{output}/beating"
    store = open_store(job_url)
    beat = Heartbeat(Activity("host-1:42:cuda:0", "tiny", "cuda:0"), interval=0.5).start()

    def read() -> dict | None:
        try:
            return json.loads(store.get("workers/host-1-42-cuda-0.json"))
        except KeyMissing:
            return None

    beat.task_prerun(task_id="t1", kwargs={"job_url": job_url, "shard": 2, "manifest_key": "m", "attempt": 1})
    working = wait_for(lambda: (b := read()) and b["state"] == "working" and b, 60, "working heartbeat")
    assert (working["shard"], working["attempt"], working["job"], working["images_done"]) == (
        2,
        1,
        "beating",
        0,
    )
    first_seen = working["last_seen"]
    wait_for(lambda: read()["last_seen"] != first_seen, 60, "a later beat while working")

    beat.task_postrun(task_id="t1", retval={"shard": 2, "images": 4, "state": "committed"}, state="SUCCESS")
    idle = wait_for(lambda: (b := read()) and b["state"] == "idle" and b, 60, "idle heartbeat")
    assert (idle["shard"], idle["shards_done"], idle["images_done"]) == (None, 1, 4)
    assert idle["images_per_s"] > 0

    beat.task_prerun(task_id="t2", kwargs={"job_url": job_url, "shard": 3, "manifest_key": "m", "attempt": 2})
    beat.task_retry(reason=ConnectionError("cannot reach redis://:hunter2@10.0.0.5:6379/0"))
    beat.task_postrun(task_id="t2", retval=None, state="RETRY")
    beat.stop()
    stopped = read()
    assert stopped["state"] == "stopped" and stopped["images_done"] == 4
    assert stopped["last_error"]["shard"] == 3
    assert (
        "ConnectionError" in stopped["last_error"]["error"]
        and "hunter2" not in stopped["last_error"]["error"]
    )


def metrics(port: int) -> dict[tuple[str, str], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("fewstep_"):
                values[(sample.name, sample.labels.get("outcome") or sample.labels.get("queue", ""))] = (
                    sample.value
                )
    return values


def test_worker_serves_prometheus_metrics(env, output, tmp_path):
    job = enqueue(SAMPLE, "measured", output, env, "--shard-size", "8")
    port = free_port()
    worker = start_worker(env, "--metrics-port", str(port), log_path=tmp_path / "worker.log")
    try:
        wait_done("measured", output, env)
        m = wait_for(
            lambda: (v := metrics(port)) and v.get(("fewstep_worker_shards_total", "committed")) == 4 and v,
            60,
            "4 committed shards in the worker's metrics",
        )
        assert m[("fewstep_worker_images_total", "")] == 32
        assert m[("fewstep_worker_busy", "")] == 0 and m[("fewstep_worker_images_per_second", "")] > 0
        assert m[("fewstep_queue_up", job["queue"])] == 1
        assert m[("fewstep_queue_depth", job["queue"])] == 0
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
    finally:
        worker.kill()


def test_flower_shows_the_workers_task_events(env, output, tmp_path):
    port = free_port()
    auth = "ops:" + "flower-test-password"
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "flower", "--address=127.0.0.1", f"--port={port}"],
        env={**env, "FLOWER_BASIC_AUTH": auth},
        stdout=open(tmp_path / "flower.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}

    def api(path: str):
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def up() -> bool:
        try:
            api("/api/tasks")
        except OSError:
            return False
        return True

    try:
        wait_for(up, 60, "Flower to answer")
        time.sleep(2)  # Flower subscribes to the event stream right after start
        enqueue(SAMPLE, "flowered", output, env, "--shard-size", "8")
        run_worker_until_idle(env, tmp_path / "worker.log")

        def succeeded() -> list:
            tasks = api("/api/tasks").values()
            done = [t for t in tasks if t["name"] == "fewstep.generate_shard" and t["state"] == "SUCCESS"]
            return done if len(done) == 4 else []

        done = wait_for(succeeded, 60, "4 succeeded shard tasks in Flower")
        assert {t["uuid"].rsplit("#", 2)[1] for t in done} == {f"part-{s:06d}" for s in range(1, 5)}
        assert all(f"s3://{BUCKET}/" in t["kwargs"] for t in done)
    finally:
        flower.terminate()
        flower.wait(timeout=30)
