"""The ``worker`` command: load one pinned model, then consume its queue."""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

import click

from fewstep import UserError, console
from fewstep.contract import queue_name
from fewstep.presets import check_runnable, listing, presets, resolve_model
from fewstep.queue import check_broker, queue_length, redis_client
from fewstep.settings import broker_url, defaults, queue_prefix, read_ahead, redact_url, visibility_timeout
from worker import hub_files, pickle_weights
from worker.encode import JPEG_ENCODERS
from worker.model import DTYPES
from worker.speed import COMPILE_MODES, SpeedOptions

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


class BatchSize(click.ParamType):
    """A positive integer, or ``auto``: measured per resolution on its first use."""

    name = "N|auto"

    def convert(self, value, param, ctx):
        """``auto`` or a positive integer."""
        if value is None or value == "auto" or isinstance(value, int):
            return value
        try:
            number = int(value)
        except ValueError:
            number = 0
        if number < 1:
            self.fail(f"{value!r} is neither a positive integer nor 'auto'", param, ctx)
        return number


def _batch_sizes(model, asked: int | str | None, cfg: dict):
    """The flag's size, else the preset's, else measured on CUDA (or with ``auto``), else the
    CPU default. Measured sizes are measured per resolution, when a shard first asks for it."""
    from worker import speed
    from worker.batching import BatchSizes

    if isinstance(asked, int):
        return BatchSizes(fixed=asked)
    if asked is None and model.preset.get("batch_size"):
        return BatchSizes(fixed=int(model.preset["batch_size"]))
    if asked == "auto" or model.device.startswith("cuda"):
        return BatchSizes(measure=functools.partial(speed.auto_batch_size, model, int(cfg["auto_batch_max"])))
    return BatchSizes(fixed=int(cfg["batch_size_cpu"]))


@dataclass
class WorkerSettings:
    """What the ``worker`` command was asked for (None: take the default)."""

    model: str
    device: str = "auto"
    batch_size: int | str | None = None
    exit_when_idle: float | None = None
    loglevel: str = "info"
    speed: SpeedOptions = field(default_factory=SpeedOptions)
    jpeg_encoder: str = "auto"
    encode_threads: int | None = None
    metrics_port: int | None = None
    metrics_address: str = "127.0.0.1"
    shutdown_grace: float | None = None
    read_ahead: bool = True


class ExpectedReject(logging.Filter):
    """Celery logs a task's ``Reject`` with its traceback; fewstep rejects only on purpose (a
    shard going back to the queue on shutdown, a worker storage refuses), already said in one
    line by the task: keep Celery's line, drop the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        from celery.exceptions import Reject

        if record.exc_info and isinstance(record.exc_info[1], Reject):
            record.exc_info, record.exc_text = None, None
        return True


def _check_scorers() -> None:
    """Say at start, in one line, which scorer presets this worker could not load: a job with
    ``--score`` would fail every attempt here (the ``tiny`` set and directories need nothing)."""
    from fewstep.scorers import scorer_presets, scoring_spec, unavailable

    problem = unavailable(scoring_spec([",".join(scorer_presets())]), ask_hub=False)
    if problem:
        log.info("jobs with --score: %s", problem)


def start_worker(settings: WorkerSettings) -> int:
    """Load the model, tune it, then run a Celery worker on the model's queue until it stops."""
    # Import-time notices of transformers (e.g. about torchvision) are noise in a worker log.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from celery import signals

    from worker import app as worker_app
    from worker import speed
    from worker.encode import choose_jpeg_encoder
    from worker.gpu_claim import claim_gpu, cuda_device_count
    from worker.heartbeat import Activity, Heartbeat
    from worker.liveness import Liveness
    from worker.model import load_model
    from worker.shard import ShardRunner

    tag = f" {os.environ['FEWSTEP_WORKER_TAG']}" if os.environ.get("FEWSTEP_WORKER_TAG") else ""
    logging.basicConfig(
        level=settings.loglevel.upper(), format=f"%(asctime)s{tag} %(levelname)s %(name)s: %(message)s"
    )
    # Their debug logs print request headers (the access key id) and bodies: never at our debug level.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("celery.app.trace").addFilter(ExpectedReject())
    check_broker()
    model_name = settings.model
    queue = queue_name(queue_prefix(), model_name)
    device = claim_gpu(cuda_device_count()) if settings.device == "claim" else settings.device
    model = load_model(model_name, device)
    applied = speed.apply(model, settings.speed)
    cfg = defaults()["worker"]
    runner = ShardRunner(
        model,
        batch_size=_batch_sizes(model, settings.batch_size, cfg),
        upload_threads=int(cfg["upload_threads"]),
        max_batches_in_flight=int(cfg["max_batches_in_flight"]),
        encode_threads=settings.encode_threads or int(cfg["encode_threads"]) or None,
        queue_name=queue,
        gpu_jpeg=choose_jpeg_encoder(settings.jpeg_encoder, model.device),
        speed=applied,
        progress_every=float(cfg["progress_every"]),
        read_ahead=settings.read_ahead,
    )
    if speed.compile_denoiser(model, settings.speed.compile):
        runner.speed["compile"] = settings.speed.compile
    if model.pipeline is not None:  # first calls pay for lazy set-up (and compiling): not in any rate
        if model.device == "cpu" and settings.speed.compile == "off":
            # Nothing to autotune or compile: one small batch absorbs the lazy set-up, where
            # full batches at the native size could take minutes on a CPU.
            batches, size, images = 1, min(128, int(model.preset["width"]), int(model.preset["height"])), 1
        else:
            # Under auto the sizes are measured at each resolution's first use, which warms
            # them up too; this absorbs the device's own lazy set-up.
            batches, size, images = int(cfg["warmup_batches"]), None, runner.batch_sizes.fixed or 1
        seconds = runner.on_device(speed.warm_up, model, images, batches, size, size)
        log.info("warm-up: %d batches in %.1fs (not counted in any rate)", batches, seconds)
    worker_app.runner = runner
    if settings.shutdown_grace is not None:
        worker_app.shutdown_grace = settings.shutdown_grace
    # The model stack (torch, diffusers, ...) leaves millions of long-lived objects: freezing
    # them keeps full garbage collections, which hold the GIL, from stalling the stages.
    gc.collect()
    gc.freeze()
    log.info(
        "worker for %s on queue %s, broker %s, batch size %s, %d encode threads, JPEG on %s, %s; "
        "read-ahead %s, visibility timeout %ds, shutdown grace %ds",
        model_name,
        queue,
        redact_url(broker_url()),
        runner.batch_sizes,
        runner.encode_threads,
        "the GPU" if runner.gpu_jpeg else "the CPU",
        ", ".join(f"{k}={v}" for k, v in {"dtype": model.dtype, **runner.speed}.items()),
        "on" if runner.lookahead.queue_name else "off",
        visibility_timeout(),
        worker_app.shutdown_grace,
    )
    _check_scorers()
    activity = Activity(runner.worker_id, model_name, model.device, progress=runner.progress)
    heartbeat = Heartbeat(activity, float(cfg["heartbeat_seconds"])).connect(signals).start()
    runner.on_shard_start = heartbeat.beat_now
    # Liveness in Redis, so a killed worker's shard comes back within a minute (fewstep/recovery.py).
    liveness = Liveness(runner.worker_id, queue)
    signals.worker_ready.connect(liveness.start, weak=False)
    signals.task_received.connect(liveness.beat_now, weak=False)
    signals.worker_shutdown.connect(liveness.stop, weak=False)
    if settings.metrics_port is not None:
        from worker.metrics import serve_metrics

        serve_metrics(activity, queue, settings.metrics_port, settings.metrics_address)
    if settings.exit_when_idle is not None:
        idle = IdleExit(queue, settings.exit_when_idle)
        signals.worker_ready.connect(idle.start, weak=False)
        signals.task_prerun.connect(idle.task_started, weak=False)
        signals.task_postrun.connect(idle.task_finished, weak=False)
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in model_name)[:60]
    worker = worker_app.app.Worker(
        hostname=f"{safe}.{os.getpid()}@{socket.gethostname()}",
        pool_cls="solo",  # the task runs in this process, next to the loaded model
        concurrency=1,
        queues=[queue],
        loglevel=settings.loglevel.upper(),
        without_mingle=True,
        without_gossip=True,
        task_events=True,
    )
    try:
        worker.start()
    finally:
        _close(runner, worker.exitcode or 0)
    return worker.exitcode or 0


#: Seconds a worker whose shutdown grace is over waits for its stages to stop before it leaves.
CLOSE_AFTER_GRACE = 1.0


def _close(runner, code: int) -> None:
    """Stop the runner's stages; the worker's last step.

    Once the shutdown grace is over, the shard in progress has gone back to the queue and the
    batch the device may still be generating for it (a model call cannot be interrupted; under
    CPU load it takes seconds) is for nothing: waiting for it made the clean exit depend on
    load, and the watchdog ended such workers instead. So is the interpreter's teardown (torch's
    modules: seconds on a loaded machine). The stages get a moment, then the process leaves with
    ``os._exit`` and the worker's own exit code (no teardown under a running model call either,
    which can abort the process).
    """
    from worker import commit

    if not commit.shutdown.expired():
        runner.close()
        return
    closing = threading.Thread(target=runner.close, name="close", daemon=True)
    closing.start()
    closing.join(timeout=CLOSE_AFTER_GRACE)
    if closing.is_alive():
        log.warning("shutdown grace over: not waiting for the batch on the device; exiting (code %d)", code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@click.group(invoke_without_command=True)
@click.option("--model", help="Preset name, hub id or local directory (see `worker models`).")
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="cpu, cuda, cuda:N, auto, or claim (a GPU no other worker on this host holds).",
)
@click.option(
    "--gpus",
    metavar="all|0,1,...",
    help="One worker process per GPU, each pinned with CUDA_VISIBLE_DEVICES and loading its own model.",
)
@click.option(
    "--batch-size",
    type=BatchSize(),
    help="Images per pipeline call, or 'auto': measured per resolution on first use [CUDA: auto]; "
    "halved after running out of memory.",
)
@click.option(
    "--dtype", type=click.Choice(DTYPES), help="Precision on CUDA (float16, bfloat16) [the preset's]."
)
@click.option(
    "--vae",
    default="default",
    show_default=True,
    help="'tiny': decode with AutoencoderTiny (taesd for SD1/SD2, taesdxl for SDXL); or a VAE the "
    "preset names in its `vaes` (`worker models` lists them, e.g. sdxl-turbo's fp16-fix).",
)
@click.option(
    "--compile",
    "compile_mode",
    type=click.Choice(COMPILE_MODES),
    default="off",
    show_default=True,
    help="torch.compile the denoiser; its warm-up runs before the first shard.",
)
@click.option(
    "--channels-last/--no-channels-last", default=None, help="channels_last memory format [on CUDA]."
)
@click.option(
    "--attention",
    type=click.Choice(["sdpa", "default"]),
    default="sdpa",
    show_default=True,
    help="Attention kernels.",
)
@click.option(
    "--jpeg-encoder",
    type=click.Choice(JPEG_ENCODERS),
    default="auto",
    show_default=True,
    help="Where JPEG is encoded: 'auto' uses nvJPEG on CUDA when torchvision is installed.",
)
@click.option("--encode-threads", type=click.IntRange(min=1), help="Image encoding threads [one per core].")
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
@click.option(
    "--allow-pickle-conversion",
    is_flag=True,
    envvar=pickle_weights.ALLOW_ENV,
    help="Convert a preset's pickle-only weights (pinned by sha256) once to safetensors, read with "
    "torch.load(weights_only=True) on torch >= 2.6 (env FEWSTEP_ALLOW_PICKLE_CONVERSION=1); "
    "`worker models` lists the presets that need it.",
)
@click.version_option(package_name="fewstep")
@click.pass_context
def cli(
    ctx,
    model,
    device,
    gpus,
    batch_size,
    dtype,
    vae,
    compile_mode,
    channels_last,
    attention,
    jpeg_encoder,
    encode_threads,
    exit_when_idle,
    metrics_port,
    metrics_address,
    shutdown_grace,
    loglevel,
    allow_pickle_conversion,
) -> None:
    """Hold one pinned model and turn the shards on its queue into images + parquet."""
    if ctx.invoked_subcommand is not None:
        return
    if not model:
        raise UserError("--model is required (a preset from `worker models`, a hub id or a local directory)")
    # Before the broker, the GPUs or the weights: a preset that cannot run is refused in one line.
    preset = check_runnable(resolve_model(model), allow_benchmark=True)
    if allow_pickle_conversion:  # the launcher's workers and the Celery child inherit it
        os.environ[pickle_weights.ALLOW_ENV] = "1"
    pickle_weights.check_convertible(preset)
    if gpus:
        from worker.launcher import launch

        logging.basicConfig(level=loglevel.upper(), format="%(asctime)s launcher %(levelname)s: %(message)s")
        ctx.exit(launch(gpus, sys.argv[1:], device))
    settings = WorkerSettings(
        model=model,
        device=device,
        batch_size=batch_size,
        exit_when_idle=exit_when_idle,
        loglevel=loglevel,
        speed=SpeedOptions(
            dtype=dtype, channels_last=channels_last, attention=attention, compile=compile_mode, vae=vae
        ),
        jpeg_encoder=jpeg_encoder,
        encode_threads=encode_threads,
        metrics_port=metrics_port,
        metrics_address=metrics_address,
        shutdown_grace=shutdown_grace,
        read_ahead=read_ahead(),  # a bad FEWSTEP_READ_AHEAD is refused before the broker or the weights
    )
    ctx.exit(start_worker(settings))


@cli.command("models")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per preset, a line each.")
def list_models(as_json: bool) -> None:
    """List the model presets: steps, guidance, size, dtype, samplers, status, whether the
    revision is pinned, gating, VRAM class, conditioning modes, VAEs, commercial use, licence.

    Under the table, why each preset that is not simply available or not pinned is so, which
    need --allow-pickle-conversion, and whose hub listing is not confirmed offline. The
    table is wide (about 230 columns): --json gives the same facts for scripts and pipes.
    """
    columns = list(listing(presets()["tiny"]))
    rows = [("preset", *columns)]
    notes = []
    for name, p in sorted(presets().items()):
        facts = listing(p)
        rows.append((name, *(facts[c] for c in columns)))
        why = None
        if facts["status"] != "available":
            try:
                check_runnable(p)
            except UserError as e:
                why = str(e)
                notes.append(why)
        if p.get("revision_note"):
            notes.append(f"model {name}: {p['revision_note']}")
        pickled, unlisted = pickle_weights.note(p), hub_files.note(p)
        notes += [f"model {name}: {n}" for n in (None if why else pickled, unlisted) if n]
        if as_json:
            note = p.get("revision_note")
            extra = {"pickle_conversion": pickled, "hub_listing": unlisted}
            click.echo(json.dumps({"preset": name, **facts, "why": why, "revision_note": note, **extra}))
    if as_json:
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:  # the licence, free text, last and unpadded
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    if notes:
        click.echo("")
        for note in notes:
            click.echo(note)


@cli.group("scorers")
def scorers_group() -> None:
    """Scorer presets (config/scorers.toml) for `producer enqueue --score`."""


@scorers_group.command("list")
def list_scorers() -> None:
    """List the scorer presets: column, repository, pinned revision, licence."""
    from fewstep.scorers import scorer_presets

    for name, p in scorer_presets().items():
        click.echo(f"{name}  {p['column']}  {p['repo']}@{p['revision']}  {p['licence']}")
        click.echo(f"    {p['description']}")
    click.echo("tiny  (all of them)  built locally, offline (worker/tiny_scorers.py)  random weights")
    click.echo("    --score tiny (or NAME=tiny): to try scores without downloading; the numbers mean nothing")


@scorers_group.command("convert-aesthetic")
@click.argument("source", metavar="IN.pth")
@click.argument("directory", metavar="OUT_DIR")
def convert_aesthetic_command(source: str, directory: str) -> None:
    """Convert LAION's pickled aesthetic head (.pth) to OUT_DIR/model.safetensors, loaded with
    torch.load(weights_only=True); then enqueue with --score aesthetic=OUT_DIR."""
    from worker.scorer_weights import convert_aesthetic

    click.echo(f"wrote {convert_aesthetic(source, directory)}")


main = functools.partial(console.run, cli)
