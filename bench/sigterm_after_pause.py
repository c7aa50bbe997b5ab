"""Reproduce the open problem of docs/RELIABILITY.md ("A SIGTERM right after the SIGCONT that
ends a pause can be missed"): a real worker holds a shard while storage is down; it is paused
with SIGSTOP, then sent SIGCONT and SIGTERM back to back, as the chaos harness's skew restart
does. Prints, per try, how long after the SIGTERM the worker ended, and whether it ended only
when a second SIGCONT (``--wake`` seconds later) woke it.

    python -m bench.sigterm_after_pause [--tries 3] [--wake 30] [--faketime +31s]

A plain SIGTERM (no pause) is tried first for comparison. ``--faketime`` runs the worker under
libfaketime with that offset, as the chaos harness runs its skewed slots. Real Redis and
SeaweedFS on 127.0.0.1 (``fewstep/services.py``), the ``tiny`` model on the CPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fewstep import services  # noqa: E402

BUCKET = "sigterm-bench"
SAMPLE = REPO / "examples" / "parti-sample.tsv"


def one_try(
    svc, env: dict[str, str], root: Path, label: str, pause: bool, wake: float, worker_env=None
) -> str:
    job = f"{label}-{int(time.time() * 1000)}"
    enqueue = [sys.executable, "-m", "producer", "enqueue", "partiprompts", "--path", str(SAMPLE),
               "--model", "tiny", "--limit", "8", "--job", job, "--output", f"s3://{BUCKET}/jobs",
               "--width", "64", "--height", "64"]  # fmt: skip
    subprocess.run(enqueue, env=env, cwd=REPO, check=True, capture_output=True)
    svc.stop_weed()  # the worker takes the shard and retries storage
    log = root / f"{job}.log"
    command = [sys.executable, "-m", "worker", "--model", "tiny", "--device", "cpu", "--shutdown-grace", "10"]
    with log.open("wb") as out:
        worker = subprocess.Popen(command, env=worker_env or env, cwd=REPO, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while b"cannot reach S3" not in log.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
        if pause:
            os.kill(worker.pid, signal.SIGSTOP)
            time.sleep(3)
            os.kill(worker.pid, signal.SIGCONT)
        sent = time.monotonic()
        worker.terminate()
        try:
            worker.wait(timeout=wake)
            return f"{label}: ended {time.monotonic() - sent:.1f} s after SIGTERM (code {worker.returncode})"
        except subprocess.TimeoutExpired:
            os.kill(worker.pid, signal.SIGCONT)
            try:
                worker.wait(timeout=5)
                return (
                    f"{label}: NOT ended {wake:.0f} s after SIGTERM; ended at once when a second SIGCONT came"
                )
            except subprocess.TimeoutExpired:
                return f"{label}: NOT ended {wake:.0f} s after SIGTERM, nor after a second SIGCONT"
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        svc.start_weed()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tries", type=int, default=3, help="paused tries [3]")
    parser.add_argument("--wake", type=float, default=30, help="seconds before the second SIGCONT [30]")
    parser.add_argument("--faketime", help="run the worker under libfaketime with this offset (e.g. +31s)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="fewstep-sigterm-"))
    svc = services.start(root / "services", [BUCKET])
    env = {
        **os.environ, "CELERY_BROKER_URL": svc.broker_url, "AWS_ACCESS_KEY_ID": svc.access_key,
        "AWS_SECRET_ACCESS_KEY": svc.secret_key, "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": svc.s3_endpoint, "HF_HUB_OFFLINE": "1", "FEWSTEP_QUEUE_PREFIX": "sigterm",
        "FEWSTEP_MODEL_CACHE": str(root / "models"), "OMP_NUM_THREADS": "1",
    }  # fmt: skip
    worker_env = dict(env)
    if args.faketime:
        lib = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"
        worker_env.update(LD_PRELOAD=lib, FAKETIME=args.faketime)
    try:
        print(
            one_try(svc, env, root, "plain", pause=False, wake=args.wake, worker_env=worker_env), flush=True
        )
        for i in range(args.tries):
            label = f"paused-{i + 1}"
            print(
                one_try(svc, env, root, label, pause=True, wake=args.wake, worker_env=worker_env), flush=True
            )
    finally:
        svc.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
