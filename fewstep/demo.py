"""The end-to-end demo: local Redis + SeaweedFS, a real producer, a real worker process.

Everything runs as a user would run it: ``producer enqueue`` and ``worker`` are started
as separate processes against services on 127.0.0.1, and the results are read back
from S3 and copied to a local folder to look at.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click
import pyarrow as pa
import pyarrow.parquet as pq

from fewstep import UserError, services
from fewstep.contract import METADATA
from fewstep.storage import open_store

BUCKET = "fewstep-demo"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "parti-sample.tsv"


def _run(args: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(args, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"{' '.join(args[2:4])} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def run_demo(prompts: str | None, out_dir: str) -> None:
    prompts_path = Path(prompts) if prompts else EXAMPLE
    if not prompts_path.is_file():
        raise UserError(f"prompt file not found: {prompts_path} (pass --prompts)")
    state = Path(".fewstep/demo").resolve()
    shutil.rmtree(state, ignore_errors=True)
    click.echo("starting Redis and SeaweedFS on 127.0.0.1 ...")
    svc = services.start(state, [BUCKET])
    try:
        env = {**os.environ, **svc.env(), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        job = "demo-" + dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
        output = f"s3://{BUCKET}/jobs"
        os.environ.update(svc.env())
        py = sys.executable
        started = time.monotonic()
        click.echo(f"enqueueing {prompts_path} as job {job} ...")
        click.echo(
            "  "
            + _run(
                [
                    py,
                    "-m",
                    "producer",
                    "enqueue",
                    "partiprompts",
                    "--path",
                    str(prompts_path),
                    "--model",
                    "tiny",
                    "--job",
                    job,
                    "--output",
                    output,
                    "--shard-size",
                    "8",
                    # One file per image (the configured default, webdataset, puts a shard's
                    # images in one tar): the demo's images are there to open one by one.
                    "--layout",
                    "files",
                    # Scores with the tiny scorer set (random weights, built locally): offline,
                    # and enough for `producer report` and `gallery --sort` to have something.
                    "--score",
                    "tiny",
                    "--embeddings",
                ],
                env,
            )
            .strip()
            .replace("\n", "\n  ")
        )
        log_path = state / "worker.log"
        click.echo(f"starting a worker (model tiny, cpu); its log: {log_path}")
        with open(log_path, "wb") as log:
            worker = subprocess.Popen(
                [py, "-m", "worker", "--model", "tiny", "--device", "cpu", "--exit-when-idle", "3"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            status = _follow(py, job, output, env, worker)
            worker.wait(timeout=120)
        if status["state"] != "done":
            raise UserError(f"demo job did not finish: {status}; see {log_path}")
        elapsed = time.monotonic() - started
        _summarise(job, output, status, Path(out_dir), elapsed)
    finally:
        svc.stop()


def _follow(py: str, job: str, output: str, env: dict[str, str], worker: subprocess.Popen) -> dict:
    deadline = time.monotonic() + 600
    last = None
    while time.monotonic() < deadline:
        status = json.loads(_run([py, "-m", "producer", "status", job, "--output", output, "--json"], env))
        line = (
            f"  shards {status['shards_done']}/{status['shards_total']}, "
            f"images {status['images_done']}/{status['images_total']}"
        )
        if line != last:
            click.echo(line)
            last = line
        if status["state"] in ("done", "failed"):
            return status
        if worker.poll() is not None:
            return status
        time.sleep(1)
    return status


def _summarise(job: str, output: str, status: dict, out_dir: Path, elapsed: float) -> None:
    job_store = open_store(output).child(job)
    local = out_dir / job
    # The whole job folder: every producer command works on it, with --output OUT_DIR (a local
    # directory is an output location like a bucket), after the services are gone.
    for key, _ in job_store.list():
        (local / key).parent.mkdir(parents=True, exist_ok=True)
        (local / key).write_bytes(job_store.get(key))
    tables = [pq.read_table(local / key) for key, _ in job_store.list(f"{METADATA}/")]
    table = pa.concat_tables(tables).sort_by("row_id")
    click.echo("")
    click.echo(f"done in {elapsed:.1f}s: {status['images_done']} images in {status['shards_done']} shards")
    click.echo(f"in S3:   {job_store.url}/images/ and {job_store.url}/metadata/ (services now stopped)")
    click.echo(f"locally: {local}/images/ and {local}/metadata/ (the whole job folder)")
    click.echo(
        "  (--layout files, one file per image, to open them one by one; a fleet's training set "
        "uses the default, webdataset: one tar per shard, README: Which layout)"
    )
    click.echo("")
    rows = table.select(["image_name", "seed", "bytes", "category", "prompt"]).slice(0, 5).to_pylist()
    for r in rows:
        click.echo(
            f"  {r['image_name']}  seed {r['seed']:>10}  {r['bytes']:>6} B  "
            f"{r['category']:<14} {r['prompt'][:50]}"
        )
    click.echo(f"  ... {table.num_rows} rows; read them with pandas.read_parquet('{local}/metadata')")
    producer = shutil.which("producer") or os.path.relpath(Path(sys.executable).with_name("producer"))
    where = shlex.quote(str(out_dir))
    click.echo("")
    click.echo("next, on the local copy (README: After the demo; a local directory works as --output):")
    for command, what in (
        (f"status {job} --output {where}", "progress, rate, workers, errors"),
        (f"gallery {job} --output {where} --by category", f"contact sheet: {local}/gallery/index.html"),
        (f"report {job} --output {where} --by category", f"score plots: {local}/report/index.html"),
    ):
        click.echo(f"  {producer} {command}    # {what}")
    click.echo(
        "  (the scores come from --score tiny: random weights, to try the commands; see docs/SCORES.md)"
    )
