"""The worker process: its own queue only, the model loaded once, idle exit."""

from __future__ import annotations

import subprocess
import sys
import time

from fewstep.queue import queue_length, redis_client
from tests.support import start_worker, wait_done
from tests.test_end_to_end import SAMPLE, enqueue


def test_worker_consumes_only_its_models_queue_and_loads_the_model_once(env, output, tmp_path):
    other = enqueue(SAMPLE, "for-sdxs", output, env, "--model", "sdxs-512-0.9", "--shard-size", "16")
    mine_a = enqueue(SAMPLE, "for-tiny-a", output, env, "--shard-size", "8")
    mine_b = enqueue(SAMPLE, "for-tiny-b", output, env, "--shard-size", "16")
    assert other["queue"] != mine_a["queue"] == mine_b["queue"]
    log = tmp_path / "worker.log"
    worker = start_worker(env, "--exit-when-idle", "2", log_path=log)
    wait_done("for-tiny-a", output, env)
    wait_done("for-tiny-b", output, env)
    assert worker.wait(timeout=60) == 0
    assert queue_length(redis_client(), other["queue"]) == 2  # untouched
    text = log.read_text()
    assert text.count("loaded model tiny") == 1
    assert text.count("committed: ") == 6


def test_worker_exits_when_idle(env):
    start = time.monotonic()
    worker = start_worker(env, "--exit-when-idle", "1")
    assert worker.wait(timeout=90) == 0
    assert time.monotonic() - start < 90


def test_producer_never_imports_torch(env):
    code = (
        "import sys; from producer import cli, enqueue, progress, sharding; "
        "from producer import selection; "
        "from producer.sources import diffusiondb, formats, journeydb, location, partiprompts; "
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, 'GPU stack imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
