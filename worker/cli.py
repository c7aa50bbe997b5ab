"""The ``worker`` command: load one pinned model, then consume its queue."""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import threading
import time

import click

from fewstep import UserError, console
from fewstep.contract import queue_name
from fewstep.presets import presets, samplers
from fewstep.queue import check_broker, queue_length, redis_client
from fewstep.settings import broker_url, defaults, queue_prefix, redact_url, visibility_timeout

log = logging.getLogger("fewstep.worker")


class IdleExit:
    """Stops the worker once its queue has been empty, and no task running, for ``seconds``."""

    def __init__(self, queue: str, seconds: float):
        self.queue = queue
        self.seconds = seconds
        self.busy = 0
        self._lock = threading.Lock()

    def task_started(self, **_):
        with self._lock:
            self.busy += 1

    def task_finished(self, **_):
        with self._lock:
            self.busy -= 1

    def start(self, **_):
        threading.Thread(target=self._watch, name="idle-exit", daemon=True).start()

    def _watch(self) -> None:
        client = redis_client()
        idle_since = time.monotonic()
        while True:
            time.sleep(0.5)
            try:
                empty = queue_length(client, self.queue) == 0
            except Exception:
                empty = False
            if self.busy or not empty:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= self.seconds:
                log.info("queue %s empty for %.0fs: exiting", self.queue, self.seconds)
                os.kill(os.getpid(), signal.SIGTERM)  # Celery's warm shutdown
                return


def start_worker(
    model_name: str,
    device: str,
    batch_size: int | None,
    exit_when_idle: float | None,
    loglevel: str,
    metrics_port: int | None = None,
    metrics_address: str = "127.0.0.1",
    shutdown_grace: float | None = None,
) -> int:
    """Load the model, then run a Celery worker on the model's queue until it stops."""
    # Import-time notices of transformers (e.g. about torchvision) are noise in a worker log.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from celery import signals

    from worker import app as worker_app
    from worker.gpu_claim import claim_gpu, visible_gpus
    from worker.heartbeat import Activity, Heartbeat
    from worker.model import load_model
    from worker.shard import ShardRunner

    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Their debug logs print request headers (the access key id) and bodies: never at our debug level.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    check_broker()
    queue = queue_name(queue_prefix(), model_name)
    if device == "claim":
        device = claim_gpu(visible_gpus())
    model = load_model(model_name, device)
    cfg = defaults()["worker"]
    if batch_size is None:
        batch_size = int(
            model.preset.get("batch_size")
            or cfg["batch_size_cuda" if model.device.startswith("cuda") else "batch_size_cpu"]
        )
    worker_app.runner = ShardRunner(
        model,
        batch_size=batch_size,
        upload_threads=int(cfg["upload_threads"]),
        max_batches_in_flight=int(cfg["max_batches_in_flight"]),
    )
    if shutdown_grace is not None:
        worker_app.shutdown_grace = shutdown_grace
    log.info(
        "worker for %s on queue %s, broker %s, batch size %d, visibility timeout %ds, shutdown grace %ds",
        model_name,
        queue,
        redact_url(broker_url()),
        batch_size,
        visibility_timeout(),
        worker_app.shutdown_grace,
    )
    activity = Activity(worker_app.runner.worker_id, model_name, model.device)
    Heartbeat(activity, float(cfg["heartbeat_seconds"])).connect(signals).start()
    if metrics_port is not None:
        from worker.metrics import serve_metrics

        serve_metrics(activity, queue, metrics_port, metrics_address)
    if exit_when_idle is not None:
        idle = IdleExit(queue, exit_when_idle)
        signals.worker_ready.connect(idle.start, weak=False)
        signals.task_prerun.connect(idle.task_started, weak=False)
        signals.task_postrun.connect(idle.task_finished, weak=False)
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in model_name)[:60]
    worker = worker_app.app.Worker(
        hostname=f"{safe}.{os.getpid()}@{socket.gethostname()}",
        pool_cls="solo",  # the task runs in this process, next to the loaded model
        concurrency=1,
        queues=[queue],
        loglevel=loglevel.upper(),
        without_mingle=True,
        without_gossip=True,
        task_events=True,
    )
    worker.start()
    return worker.exitcode or 0


@click.group(invoke_without_command=True)
@click.option("--model", help="Preset name, hub id or local directory (see `worker models`).")
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="cpu, cuda, cuda:N, auto, or claim (a GPU no other worker on this host holds).",
)
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per pipeline call.")
@click.option(
    "--exit-when-idle",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="Exit once the queue has been empty this long.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    envvar="FEWSTEP_METRICS_PORT",
    help="Serve Prometheus metrics on this port (env FEWSTEP_METRICS_PORT).",
)
@click.option(
    "--metrics-address",
    default="127.0.0.1",
    show_default=True,
    envvar="FEWSTEP_METRICS_ADDRESS",
    help="Address the metrics endpoint binds (env FEWSTEP_METRICS_ADDRESS).",
)
@click.option(
    "--shutdown-grace",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="After SIGTERM, how long the shard in progress may run before it goes back to the queue [480].",
)
@click.option(
    "--loglevel", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"])
)
@click.version_option(package_name="fewstep")
@click.pass_context
def cli(
    ctx, model, device, batch_size, exit_when_idle, metrics_port, metrics_address, shutdown_grace, loglevel
) -> None:
    """Hold one pinned model and turn the shards on its queue into images + parquet."""
    if ctx.invoked_subcommand is not None:
        return
    if not model:
        raise UserError("--model is required (a preset from `worker models`, a hub id or a local directory)")
    ctx.exit(
        start_worker(
            model,
            device,
            batch_size,
            exit_when_idle,
            loglevel,
            metrics_port=metrics_port,
            metrics_address=metrics_address,
            shutdown_grace=shutdown_grace,
        )
    )


@cli.command("models")
def list_models() -> None:
    """List the model presets: steps, guidance, resolution, dtype, samplers, licence."""
    rows = [("preset", "steps", "cfg", "size", "dtype", "samplers", "licence")]
    for name, p in sorted(presets().items()):
        rows.append(
            (
                name,
                str(p["steps"]),
                f"{p['guidance']:g}",
                f"{p['width']}x{p['height']}",
                p.get("dtype", ""),
                ",".join(samplers(p)),
                p.get("license", ""),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])


main = functools.partial(console.run, cli)
