"""One offline device run: GPU tests, model-only and end-to-end throughput at real size.

Run through ``bash bench/device/run.sh RESULTS_DIR [--smoke]`` (which installs what is
missing from ``bench/device/wheels``). The deadline counts from run.sh's start
(``FEWSTEP_DEVICE_STARTED``, the install included): the whole run is ``FEWSTEP_DEVICE_SECONDS``
(540) of wall time; a part starts only if its allowance (:data:`ALLOWANCES`) ends 25 s before
that, and a watchdog saves what was measured and ends the run 15 s before it. In this order:

1. ``pytest -m gpu tests/test_gpu.py`` (the CUDA-only paths; on a CPU they skip, saying why);
2. SDXS-512 (+ TAESD), then SD-Turbo, SDXL-Turbo at 512 and PixArt-α 512 (``configs/``): build
   it with random weights as a local diffusers directory, then
   - **model-only** img/s per batch size: ``Model.generate`` in this process, as the worker's
     device thread calls it (prompt encoding, denoising, VAE decode, pixels to uint8, left on
     the GPU: no host copy, no encoding), after one warm-up call per size; GPU memory peak
     (``torch.cuda.max_memory_allocated``) per size; the size ``--batch-size auto`` chooses;
   - **end to end**: ``producer enqueue`` → Redis → one real ``worker --model <directory>``
     process → encode (JPEG on the GPU with nvJPEG, PNG and WebP on the CPU) → local-directory
     storage → commit; each job's img/s spans its first batch on the device to its last
     shard's commit (stats objects), after a one-shard warm-up job; bytes per image from the
     committed metadata. Ratio end-to-end ÷ model-only at the same batch size and options.
     Also the worker process's whole life, and its CPU seconds per image;
   - SDXS only: **scoring** (``bench/scoring.py``: ``--score clip,aesthetic,nsfw`` and
     ``--embeddings`` with ViT-L/14-size scorers, as the worker's device thread runs them) and
     the JPEG job through a second worker with the read-ahead off (``FEWSTEP_READ_AHEAD=0``);
3. **speed options** per model, one change from the baseline (float16, channels_last, SDPA)
   each: bfloat16, no channels_last, ``--compile default``, ``--vae tiny`` (where the model has
   a full VAE); SDXS first. A model's folder is deleted once its last part is done.

RESULTS_DIR holds exactly :data:`RESULT_FILES`, each rewritten atomically after every part:
``results.json``, ``summary.txt``, ``gpu-tests.log`` and ``logs.tar.gz`` (workers' logs,
tracebacks, the GPU tests' JUnit XML, scoring's output; each member its last 2 MiB).

``--smoke``: the same steps with the configs' tiny ``smoke`` stand-ins on the CPU, a few
images each (checks the script; its figures say nothing about any GPU). ``--plan``: print the
order of the parts with their allowances and what the deadline would skip if each took all of
its allowance; runs nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # bench/: the harness

import models  # noqa: E402
from harness import REPO, local_redis, machine, run_jobs, write_prompts  # noqa: E402

#: run.sh's start (epoch seconds): the deadline counts from it, the install included.
STARTED = float(os.environ.get("FEWSTEP_DEVICE_STARTED") or time.time())
#: The whole run's wall time from run.sh's start (a device command may run 600 s).
WALL = float(os.environ.get("FEWSTEP_DEVICE_SECONDS") or 540)
RESERVE = 25.0  # a part must end this long before the wall (final save, archive, stop)
STOP_BEFORE = 15.0  # the watchdog saves and ends the run this long before the wall
MODELS = ("sdxs-512", "sd-turbo", "sdxl-turbo", "pixart-alpha-512")
#: What RESULTS_DIR holds, exactly (a GPU host brings back at most 8 files).
RESULT_FILES = ("results.json", "summary.txt", "gpu-tests.log", "logs.tar.gz")
LOG_TAIL = 2 * 2**20  # bytes of each log kept in the archive (its end)
#: Where the end-to-end images go: said next to every end-to-end figure.
STORAGE = "local directory (no S3 server: no PUT cost in the figure)"
#: Seconds a part may take on a GPU host, planned before it starts (it starts only if they fit
#: before the deadline). Allowances, not measurements: docs/BENCHMARKS.md reads them against
#: the CPU smoke run's times per part.
ALLOWANCES: dict[str, float] = {
    "install": 40,  # run.sh, before run.py: the plan's guess (the run records the real one)
    "gpu tests": 100,
    "build": 20,
    "build pixart-alpha-512": 120,  # 11 GB of weights written
    "build sdxl-turbo": 60,
    "model-only, per batch size": 10,
    "auto batch size": 30,
    "end to end sdxs-512": 90,  # JPEG, PNG, WebP jobs and a warm-up job through one worker
    "end to end": 60,
    "scoring": 90,
    "read-ahead off": 60,
    "speed option": 25,
    "compile sdxs-512": 120,
    "compile": 240,
}


class Clock:
    """The run's deadline, counted from run.sh's start: a part starts only if it fits before it."""

    def __init__(self, started: float = STARTED, wall: float = WALL):
        self.started = started
        self.wall = wall

    def left(self) -> float:
        """Seconds a part may still take (the deadline less the reserve for the final save)."""
        return self.started + self.wall - RESERVE - time.time()

    def allows(self, seconds: float) -> bool:
        """Whether a part allowed ``seconds`` ends before the deadline."""
        return self.left() >= seconds

    def elapsed(self) -> float:
        """Seconds since run.sh started."""
        return round(time.time() - self.started, 1)


def allowance(part: str, name: str = "") -> float:
    """The part's allowance, the model's own where it has one."""
    return ALLOWANCES.get(f"{part} {name}", ALLOWANCES[part])


class Plan:
    """What a run does: the real one on a GPU, or the smoke one on the CPU."""

    def __init__(self, smoke: bool, check_device: bool = True):
        self.smoke = smoke
        self.device = "cpu" if smoke else "cuda"
        if check_device and not smoke:
            import torch

            if not torch.cuda.is_available():
                raise SystemExit("error: no CUDA GPU visible (use --smoke to check the script on a CPU)")
        self.batch_sizes = (1, 2) if smoke else (1, 4, 16, 32, 64, 128)
        self.min_seconds = 0.0 if smoke else 1.5
        self.shard_size = 8 if smoke else 256
        #: images per end-to-end job: JPEG (the throughput figure), then PNG and WebP (SDXS only).
        self.images = {"jpeg": 8, "png": 4, "webp": 4} if smoke else {"jpeg": 4096, "png": 1024, "webp": 1024}
        self.other_jpeg = 4 if smoke else 1024  # the models after SDXS: JPEG only
        self.dtype = "float32" if smoke else "float16"
        #: bench/scoring.py's arguments: ViT-L/14-size scorers on a GPU, tiny ones on the CPU.
        self.scoring = ["--scorers", "tiny", "--batches", "1", "--repeat", "1"] if smoke else [
            "--scorers", "vit-l14", "--batches", "8", "--repeat", "2"]  # fmt: skip


def planned_parts(models_: list[str]) -> list[tuple[str, float]]:
    """(part, allowance) in the order the run takes them."""
    parts = [("install (run.sh)", ALLOWANCES["install"]), ("gpu tests", ALLOWANCES["gpu tests"])]
    for name in models_:
        parts += [
            (f"{name}: build", allowance("build", name)),
            (f"{name}: model-only, 6 batch sizes", 6 * ALLOWANCES["model-only, per batch size"]),
            (f"{name}: auto batch size", ALLOWANCES["auto batch size"]),
            (f"{name}: end to end", allowance("end to end", name)),
        ]
        if name == "sdxs-512":
            parts += [
                (f"{name}: scoring", ALLOWANCES["scoring"]),
                (f"{name}: read-ahead off", ALLOWANCES["read-ahead off"]),
            ]
    for name in models_:
        options = 3 if name == "sdxs-512" else 4  # baseline, bfloat16, no channels_last (+ --vae tiny)
        parts += [(f"{name}: {options} speed options", options * ALLOWANCES["speed option"]),
                  (f"{name}: --compile default", allowance("compile", name))]  # fmt: skip
    return parts


def plan_text(models_: list[str], wall: float = WALL) -> str:
    """The parts in order, each as if it took all of its allowance: when it would start, and
    whether the deadline would let it (a part that does not fit is skipped, the next may fit)."""
    lines = [
        f"plan: {wall:.0f} s from run.sh's start; a part starts if it ends {RESERVE:.0f} s before that",
        f"{'part':<44} {'allowance':>9} {'starts at':>9}  outcome",
    ]
    t = 0.0
    for part, seconds in planned_parts(models_):
        fits = part.startswith("install") or t + seconds <= wall - RESERVE
        lines.append(
            f"{part:<44} {seconds:>8.0f}s {t:>8.0f}s  {'runs' if fits else 'skipped by the deadline'}"
        )
        t += seconds if fits else 0
    return "\n".join(lines) + "\n"


# --- the results folder ------------------------------------------------------------------------


class Results:
    """RESULTS_DIR and the run's record: exactly :data:`RESULT_FILES`, each written atomically
    (a temporary file renamed over it) after every part, so a run stopped at any moment leaves
    four readable files; the logs live in ``logs`` (scratch) and travel as one archive."""

    def __init__(self, directory: Path, logs: Path, record: dict[str, Any]):
        self.directory, self.logs, self.record = directory, logs, record
        self.directory.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.gpu_log = logs / "gpu-tests.log"
        self.lock = threading.RLock()
        self.current = "start"  # the part running now (said if the run is stopped in it)

    def _write(self, name: str, data: bytes) -> None:
        partial = self.directory / f".{name}.partial"
        partial.write_bytes(data)
        os.replace(partial, self.directory / name)

    def _archive(self) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for path in sorted(p for p in self.logs.rglob("*") if p.is_file()):
                with path.open("rb") as f:
                    size = path.stat().st_size
                    f.seek(max(0, size - LOG_TAIL))
                    data = f.read(LOG_TAIL)
                info = tarfile.TarInfo(str(path.relative_to(self.logs)))
                info.size, info.mtime = len(data), int(time.time())
                tar.addfile(info, io.BytesIO(data))
        return buffer.getvalue()

    def save(self) -> None:
        """Write the four files as the record stands."""
        with self.lock:
            self.record["elapsed_seconds"] = round(time.time() - STARTED, 1)
            self._write("results.json", (json.dumps(self.record, indent=2) + "\n").encode())
            self._write("summary.txt", summary(self.record).encode())
            gpu_log = (
                self.gpu_log.read_bytes() if self.gpu_log.is_file() else b"(the GPU tests have not run)\n"
            )
            self._write("gpu-tests.log", gpu_log[-LOG_TAIL:])
            self._write("logs.tar.gz", self._archive())

    def part(self, name: str) -> Part:
        """A context for one part: its start, seconds and outcome go into ``record["parts"]``."""
        return Part(self, name)

    def stop(self, why: str) -> None:
        """Save what was measured, end this process's children and exit (deadline or SIGTERM)."""
        if not self.lock.acquire(timeout=5):  # a save in progress on another thread: let it finish
            pass
        self.record["stopped"] = f"{why}, during: {self.current}"
        self.record["seconds"] = round(time.time() - STARTED, 1)
        try:
            self.save()
        finally:
            _kill_children()
            print(f"run.py: stopped ({self.record['stopped']}); results saved", file=sys.stderr, flush=True)
            os._exit(3)


class Part:
    """One timed part of the run (see :meth:`Results.part`)."""

    def __init__(self, results: Results, name: str):
        self.results, self.name = results, name
        self.row: dict[str, Any] = {"part": name}

    def __enter__(self) -> Part:
        self.results.current = self.name
        self.row["started_at_s"] = round(time.time() - STARTED, 1)
        self.start = time.time()
        self.results.record.setdefault("parts", []).append(self.row)
        return self

    def skip(self, why: str) -> None:
        """Mark the part skipped."""
        self.row["outcome"] = f"skipped: {why}"

    def __exit__(self, kind, error, tb) -> bool:
        self.row["seconds"] = round(time.time() - self.start, 1)
        if error is not None:
            self.row["outcome"] = f"error: {type(error).__name__}: {error}"
        else:
            self.row.setdefault("outcome", "done")
        self.results.current = "between parts"
        self.results.save()
        return False


def _kill_children() -> None:
    """SIGKILL every descendant of this process (a worker holding the GPU, redis-server)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    todo, found = [os.getpid()], []
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    for pid in found:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


# --- model-only --------------------------------------------------------------------------------


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _measure(model, batch: int, width: int, height: int, min_seconds: float) -> dict[str, Any]:
    """img/s of ``model.generate`` at ``batch`` images per call, as the worker calls it."""
    import torch

    cuda = model.device.startswith("cuda")
    prompts = [f"a synthetic benchmark prompt number {i}" for i in range(batch)]
    seeds = list(range(batch))
    steps, guidance = int(model.preset["steps"]), float(model.preset["guidance"])

    def call():
        model.generate(prompts, seeds, steps=steps, guidance=guidance, width=width, height=height,
                       keep_on_device=cuda)  # fmt: skip

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    call()  # allocation, autotuning, lazy set-up: not timed
    _sync(model.device)
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < min_seconds:
        call()
        calls += 1
    _sync(model.device)
    seconds = time.perf_counter() - start
    result = {"batch_size": batch, "images_per_s": round(batch * calls / seconds, 2), "calls": calls}
    if cuda:
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def _load(directory: Path, device: str, options, compile_mode: str = "off"):
    from worker import speed
    from worker.model import load_model

    model = load_model(str(directory), device)
    applied = speed.apply(model, options)
    if compile_mode != "off" and speed.compile_denoiser(model, compile_mode):
        applied["compile"] = compile_mode
    return model, applied


def release() -> None:
    """Give the GPU memory of models no longer referenced back to the driver, so that a worker
    process started next finds it free. Callers drop their own references first (``del model``):
    memory a live name still holds cannot be released."""
    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def models_alive() -> int:
    """Loaded models this process still holds (0 before a worker process starts)."""
    from worker.model import Model

    return sum(type(o) is Model for o in gc.get_objects())


def model_only(directory: Path, run: dict, plan: Plan, clock: Clock, record: dict) -> int:
    """Model-only sweep over batch sizes and the size ``--batch-size auto`` picks; returns the
    size the other parts run at."""
    from worker import speed
    from worker.batching import free_cached_memory, is_batch_too_large
    from worker.speed import SpeedOptions

    model, applied = _load(directory, plan.device, SpeedOptions(dtype=plan.dtype))
    record["load_seconds"] = round(model.load_seconds, 1)
    record["baseline"] = {"dtype": model.dtype, **applied}
    sweep = record["model_only"] = []
    for batch in plan.batch_sizes:
        if not clock.allows(ALLOWANCES["model-only, per batch size"]):
            sweep.append({"batch_size": batch, "skipped": "global deadline"})
            continue
        try:
            sweep.append(_measure(model, batch, run["width"], run["height"], plan.min_seconds))
        except Exception as e:
            if not is_batch_too_large(e):
                raise
            sweep.append({"batch_size": batch, "error": f"too large: {type(e).__name__}: {str(e)[:200]}"})
            break
        finally:
            free_cached_memory()
    chosen = None
    if clock.allows(ALLOWANCES["auto batch size"]):
        start = time.perf_counter()
        chosen = speed.auto_batch_size(model, limit=max(plan.batch_sizes), width=run["width"],
                                       height=run["height"])  # fmt: skip
        record["auto_batch_size"] = {"chosen": chosen, "seconds": round(time.perf_counter() - start, 1)}
    else:
        record["auto_batch_size"] = {"skipped": "global deadline"}
    measured = [r for r in sweep if "images_per_s" in r]
    if chosen is None:  # the best size measured, else the smallest
        chosen = max(measured, key=lambda r: r["images_per_s"])["batch_size"] if measured else 1
    alone = next((r["images_per_s"] for r in measured if r["batch_size"] == chosen), None)
    if alone is None and clock.allows(ALLOWANCES["model-only, per batch size"]):  # not in the sweep
        alone = _measure(model, chosen, run["width"], run["height"], plan.min_seconds)["images_per_s"]
    record["model_only_at_batch_size"] = {"batch_size": chosen, "images_per_s": alone}
    del model
    return chosen


def speed_options(directory: Path, run: dict, plan: Plan, clock: Clock, batch: int, name: str,
                  family_vae: bool, results: Results, rows_out: list) -> None:  # fmt: skip
    """One change from the baseline per row, model-only at ``batch``; each row saved as it ends.
    (Default attention is no row: diffusers >= 0.30 already runs SDPA, it repeats the baseline.)"""
    from worker.speed import SpeedOptions

    rows = [
        # channels_last is the worker's default on CUDA only
        (
            f"baseline ({plan.dtype}{'' if plan.smoke else ', channels_last'}, sdpa)",
            SpeedOptions(dtype=plan.dtype),
            "off",
        ),
        ("bfloat16", SpeedOptions(dtype="bfloat16"), "off"),
        ("no channels_last", SpeedOptions(dtype=plan.dtype, channels_last=False), "off"),
    ]
    if family_vae:
        rows.append(("--vae tiny", SpeedOptions(dtype=plan.dtype, vae="tiny"), "off"))
    rows.append(("--compile default", SpeedOptions(dtype=plan.dtype), "default"))  # the longest: last
    for label, options, compile_mode in rows:
        row: dict[str, Any] = {"option": label}
        rows_out.append(row)
        needs = allowance("compile", name) if compile_mode != "off" else ALLOWANCES["speed option"]
        if compile_mode != "off" and plan.smoke:
            row["skipped"] = "compiling on the CPU takes longer than the smoke run's budget"
        elif not clock.allows(needs):
            row["skipped"] = "global deadline"
        else:
            start = time.perf_counter()
            model, applied = _load(directory, plan.device, options, compile_mode)
            row["applied"] = {"dtype": model.dtype, **applied}
            if compile_mode != "off":  # the worker compiles during its warm-up: timed apart
                from worker import speed

                row["compile_seconds"] = round(speed.warm_up(model, batch, 2), 1)
            row.update(_measure(model, batch, run["width"], run["height"], plan.min_seconds))
            row["seconds"] = round(time.perf_counter() - start, 1)
            del model
            release()
        results.save()


# --- end to end ----------------------------------------------------------------------------------


def _bytes_per_image(output: Path, job) -> dict[str, Any]:
    """Bytes per image from the job's committed metadata (``bytes`` column)."""
    import pyarrow.parquet as pq

    name = job.stats[0].job
    table = pq.read_table(output / name / "metadata", columns=["bytes"])
    sizes = table.column("bytes").to_pylist()
    return {"bytes_per_image": round(sum(sizes) / len(sizes)), "rows": len(sizes)}


def _job_record(label: str, job, alone: float | None, output: Path) -> dict[str, Any]:
    idle = sum(s.gpu_idle_fraction * s.seconds for s in job.stats) / sum(s.seconds for s in job.stats)
    row = {
        "job": label,
        "storage": STORAGE,
        "format": job.stats[0].format,
        "images": job.images,
        "seconds": round(job.seconds, 2),
        "images_per_s": round(job.rate, 2),
        "ratio_to_model_only": round(job.rate / alone, 3) if alone else None,
        "device_idle_share": round(idle, 3),
        "encoder": job.stats[0].encoder,
        # Summed over the encode threads (nvJPEG's runs on the device thread: its time is also
        # in the span the ratio divides, not in model-only).
        "encode_ms_per_image": round(1000 * job.total("encode_s") / job.images, 3),
        "shards": len(job.stats),
        "shards_started_with_batches_read_ahead": sum(s.batches_ahead > 0 for s in job.stats),
        "worker_cpu_ms_per_image_in_span": round(1000 * job.cpu_seconds / job.images, 2),
    }
    try:
        row.update(_bytes_per_image(output, job))
    except Exception as e:  # a figure about the bytes must not lose the throughput figure
        row["bytes_per_image"] = f"not read: {type(e).__name__}: {e}"
    return row


def _png_encoder() -> list[str]:
    """fpng (the default PNG encoder) where it imports here, else Pillow's zlib: a host whose
    carried wheels do not fit its Python measures PNG rather than failing the job. The job's
    ``encoder`` figure says which one ran."""
    try:
        import fpng  # noqa: F401
    except ImportError:
        print("fpng does not import here: the PNG job uses --png-encoder pillow", flush=True)
        return ["--png-encoder", "pillow"]
    return []


def end_to_end(directory, cfg_dir, plan, clock, env, prompts, batch, alone, jobs, logs, read_ahead=True):
    """One worker process through ``jobs`` [(label, images, enqueue flags)]; a record per job."""
    import torch

    worker_args = ["--device", plan.device, "--batch-size", str(batch)]
    if not plan.smoke:
        worker_args += ["--dtype", plan.dtype, "--jpeg-encoder", "gpu"]
    label = "read-ahead-off" if not read_ahead else "read-ahead-on"
    output = Path(cfg_dir).parent / "output"
    held = {"models": models_alive()}  # what this process holds while the worker needs the GPU
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        held["gpu_reserved_gib"] = round(torch.cuda.memory_reserved() / 2**30, 2)
    runs, first, life = run_jobs(
        {**env, "FEWSTEP_CONFIG_DIR": str(cfg_dir)},  # the producer reads the model's settings too
        prompts,
        model=str(directory),
        jobs=[(images, flags) for _, images, flags in jobs],
        shard_size=plan.shard_size,
        worker_args=worker_args,
        worker_env={"FEWSTEP_READ_AHEAD": "1" if read_ahead else "0"},
        log_path=logs / f"{directory.name}-{label}.log",
        output=str(output),
        timeout=max(clock.left(), 30),
    )
    return {
        "read_ahead": read_ahead,
        "batch_size": batch,
        "storage": STORAGE,
        "benchmark_process_held_at_worker_start": held,
        "jobs": [_job_record(name, run, alone, output) for (name, _, _), run in zip(jobs, runs, strict=True)],
        "first_shard_seconds": round(first.seconds, 2),
        "worker_life": {
            "images": life.images,
            "seconds_from_process_start_to_last_commit": round(life.seconds, 1),
            "images_per_s": round(life.images / life.seconds, 2),
            "ratio_to_model_only": round(life.images / life.seconds / alone, 3) if alone else None,
            "cpu_ms_per_image": round(1000 * life.cpu_seconds / life.images, 2),
        },
    }


# --- the run -------------------------------------------------------------------------------------


def gpu_tests(results: Results, clock: Clock) -> dict[str, Any]:
    """``pytest -m gpu tests/test_gpu.py``: passed / failed / skipped, and its last lines."""
    xml = results.logs / "gpu-tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
               "--junitxml", str(xml), "-rs", "tests/test_gpu.py"]  # fmt: skip
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                              timeout=max(10.0, min(ALLOWANCES["gpu tests"], clock.left())))  # fmt: skip
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:  # its output comes as bytes, whatever `text` says
        partial = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
        output, code = f"{partial}\ntimed out", "timeout"
    results.gpu_log.write_text(output)
    counts: dict[str, Any] = {}
    if xml.is_file():
        import xml.etree.ElementTree as ET

        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    lines = [line for line in str(output).splitlines() if line.strip()]
    return {"exit_code": code, "seconds": round(time.perf_counter() - start, 1), **counts,
            "tail": lines[-12:]}  # fmt: skip


def scoring(directory: Path, plan: Plan, clock: Clock, batch: int, logs: Path) -> dict[str, Any]:
    """``bench/scoring.py`` on the built SDXS (its own process, so its GPU memory goes with it):
    generation alone, then + clip, + clip/aesthetic/nsfw, + embeddings, ms per image."""
    out = logs / "scoring.json"
    command = [sys.executable, str(REPO / "bench" / "scoring.py"), "--device", plan.device, "--model",
               str(directory), "--batch", str(batch), *plan.scoring, "--json", str(out)]  # fmt: skip
    with (logs / "scoring.log").open("wb") as log:
        done = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                              timeout=max(10.0, clock.left()))  # fmt: skip
    if done.returncode != 0 or not out.is_file():
        raise RuntimeError(f"bench/scoring.py exited with {done.returncode} (logs.tar.gz: scoring.log)")
    measured = json.loads(out.read_text())
    return {k: measured[k] for k in ("scorers", "batch", "images", "generate_ms_per_image", "sets",
                                     "embedding_bytes_per_image", "rounds_ms_per_image")}  # fmt: skip


def _build(name, plan, scratch) -> tuple[Path, Path, dict]:
    spec = models.spec(name)
    tiny = {
        family: str(models.build_tiny_vae(scratch / "models" / repo, smoke=plan.smoke))
        for family, repo in models.TINY_VAES.items()
    }
    directory = models.build(name, scratch / "models" / name, smoke=plan.smoke, device=plan.device,
                             dtype=plan.dtype)  # fmt: skip
    cfg_dir = models.config_dir(scratch / name, spec, plan.smoke, tiny)
    release()
    return directory, cfg_dir, spec


def throughput(name, plan, clock, scratch, results, env, prompts) -> None:
    """A model's build, model-only sweep, end to end (and SDXS's scoring and read-ahead off)."""
    record = results.record
    spec = models.spec(name)
    run = models.settings(spec, plan.smoke)
    entry = record["models"][name] = {"label": spec["label"], "source": spec["source"], "settings": run}
    sdxs = name == "sdxs-512"
    with results.part(f"{name}: build"):
        start = time.perf_counter()
        directory, cfg_dir, _ = _build(name, plan, scratch)
        os.environ["FEWSTEP_CONFIG_DIR"] = entry["config_dir"] = str(cfg_dir)
        entry["directory"] = str(directory)
        entry["build_seconds"] = round(time.perf_counter() - start, 1)
        entry["weights_gib"] = round(
            sum(p.stat().st_size for p in directory.rglob("*.safetensors")) / 2**30, 2
        )
    with results.part(f"{name}: model-only"):
        batch = model_only(directory, run, plan, clock, entry)
        release()
    alone = entry["model_only_at_batch_size"]["images_per_s"]
    jobs = [("jpeg", plan.images["jpeg"] if sdxs else plan.other_jpeg, ["--format", "jpeg"])]
    if sdxs:
        jobs += [("png", plan.images["png"], ["--format", "png", *_png_encoder()]),
                 ("webp", plan.images["webp"], ["--format", "webp"])]  # fmt: skip
    with results.part(f"{name}: end to end") as part:
        if clock.allows(allowance("end to end", name)):
            first = end_to_end(
                directory, cfg_dir, plan, clock, env, prompts, batch, alone, jobs, results.logs
            )
            entry["end_to_end"] = [first]
        else:
            entry["end_to_end"] = {"skipped": "global deadline"}
            part.skip("global deadline")
    if not sdxs:
        return
    with results.part(f"{name}: scoring") as part:
        if clock.allows(ALLOWANCES["scoring"]):
            try:
                entry["scoring"] = scoring(directory, plan, clock, batch, results.logs)
            except Exception as e:  # recorded; the read-ahead ablation still runs
                entry["scoring"] = {"error": f"{type(e).__name__}: {e}"}
                part.row["outcome"] = f"error: {entry['scoring']['error']}"
        else:
            entry["scoring"] = {"skipped": "global deadline"}
            part.skip("global deadline")
    with results.part(f"{name}: read-ahead off") as part:
        if isinstance(entry.get("end_to_end"), list) and clock.allows(ALLOWANCES["read-ahead off"]):
            entry["end_to_end"].append(end_to_end(directory, cfg_dir, plan, clock, env, prompts, batch, alone,
                                                  jobs[:1], results.logs, read_ahead=False))  # fmt: skip
        else:
            entry["read_ahead_off"] = {"skipped": "global deadline"}
            part.skip("global deadline")


def options_part(name, plan, clock, results, keep: bool) -> None:
    """The speed options of a model already built and measured; then its folder is deleted
    (a model's last part), unless ``keep`` (``--scratch``: for a second run)."""
    entry, spec = results.record["models"][name], models.spec(name)
    directory = Path(entry["directory"])
    try:
        with results.part(f"{name}: speed options") as part:
            if "model_only_at_batch_size" not in entry:
                part.skip("the model's throughput was not measured")
            elif clock.allows(ALLOWANCES["speed option"]):
                os.environ["FEWSTEP_CONFIG_DIR"] = entry["config_dir"]
                # --vae tiny where there is a full VAE to replace (SDXS ships TAESD already)
                full_vae = spec["family"] in models.TINY_VAES and name != "sdxs-512"
                batch = entry["model_only_at_batch_size"]["batch_size"]
                rows = entry["speed_options"] = []
                run = models.settings(spec, plan.smoke)
                speed_options(directory, run, plan, clock, batch, name, full_vae, results, rows)
            else:
                entry["speed_options"] = {"skipped": "global deadline"}
                part.skip("global deadline")
    finally:
        if not keep:
            shutil.rmtree(directory, ignore_errors=True)
            entry["deleted"] = True


def summary(record: dict) -> str:
    """A short text summary of the record."""
    gpu = record["machine"]["gpu"] or "no GPU"
    took = record.get("seconds") or f"{record.get('elapsed_seconds')} (not finished)"
    head = f"fewstep device run {record['mode']}: {gpu}, commit {record['commit']}, {record['date']}"
    lines = [f"{head}, {took} s from run.sh's start (install {record.get('install_seconds')} s)"]
    if record.get("stopped"):
        lines.append(f"STOPPED: {record['stopped']}")
    lines.append(f"images: {record['images']}")
    t = record.get("gpu_tests") or {}
    counts = ", ".join(f"{t.get(k, '?')} {k}" for k in ("tests", "failures", "errors", "skipped"))
    lines.append(f"GPU tests: {counts} (exit {t.get('exit_code')})")
    for name, entry in record["models"].items():
        lines.append(f"{name}: {entry['label']}")
        if "error" in entry or "skipped" in entry:
            lines.append(f"  {entry.get('error') or 'skipped: ' + entry['skipped']}")
        lines.append(f"  model-only img/s by batch size (peak GPU memory): {_sweep_text(entry)}")
        lines.append(f"  --batch-size auto: {entry.get('auto_batch_size')}")
        e2e = entry.get("end_to_end")
        for worker in e2e if isinstance(e2e, list) else []:
            ahead = "on" if worker["read_ahead"] else "off"
            for job in worker["jobs"]:
                lines.append(
                    f"  end to end, {job['job']}, read-ahead {ahead}, batch {worker['batch_size']}, "
                    f"storage: {job['storage']}: {job['images_per_s']} img/s = "
                    f"{job['ratio_to_model_only']} x model-only; device idle {job['device_idle_share']}; "
                    f"{job['bytes_per_image']} bytes/image"
                )
            life = worker["worker_life"]
            lines.append(
                f"    worker life (start to last commit): {life['images_per_s']} img/s = "
                f"{life['ratio_to_model_only']} x model-only; CPU {life['cpu_ms_per_image']} ms/image"
            )
        score = entry.get("scoring")
        if isinstance(score, dict) and "sets" in score:
            added = ", ".join(f"+{label} {100 * s['added']:.1f} %" for label, s in score["sets"].items())
            lines.append(f"  scoring ({score['scorers']} scorers, batch {score['batch']}): generation "
                         f"{score['generate_ms_per_image']} ms/image; {added}")  # fmt: skip
        elif score:
            lines.append(f"  scoring: {score}")
        options = entry.get("speed_options")
        for row in options if isinstance(options, list) else []:
            rate = row.get("images_per_s")
            measured = f"{rate} img/s" if rate else f"skipped ({row.get('skipped', 'not reached')})"
            lines.append(f"  {row['option']}: {measured}")
    lines.append(goal(record))
    return "\n".join(lines) + "\n"


def _sweep_text(entry: dict) -> str:
    cells = []
    for r in entry.get("model_only", []):
        if "images_per_s" in r:
            peak = f" ({r['peak_gib']} GiB)" if "peak_gib" in r else ""
            cells.append(f"{r['batch_size']}: {r['images_per_s']}{peak}")
        else:
            cells.append(f"{r['batch_size']}: {r.get('error') or r.get('skipped')}")
    return ", ".join(cells)


GOAL = "goal (SDXS JPEG end to end >= 300 img/s and >= 0.9 x model-only)"


def goal(record: dict) -> str:
    """The issue's goal, checked on SDXS's JPEG job with read-ahead on: >= 300 img/s end to end
    and >= 0.9 x model-only (a smoke run's figures check nothing), with the storage it used."""
    runs = record["models"].get("sdxs-512", {}).get("end_to_end")
    jobs = (
        [j for w in runs if w["read_ahead"] for j in w["jobs"] if j["job"] == "jpeg"]
        if isinstance(runs, list)
        else []
    )
    if not jobs:
        return f"{GOAL}: not measured"
    rate, ratio = jobs[0]["images_per_s"], jobs[0]["ratio_to_model_only"]
    met = "met" if rate >= 300 and (ratio or 0) >= 0.9 else "NOT met"
    scope = " (smoke run: says nothing about a GPU)" if record["mode"].startswith("smoke") else ""
    return f"{GOAL}: {met}: {rate} img/s, {ratio} x, storage: {jobs[0]['storage']}{scope}"


def _commit() -> str:
    """The commit: FEWSTEP_COMMIT, else git, else the one fetch_wheels.sh stamped (a GPU host has
    no git, and the checkout travels without .git)."""
    if os.environ.get("FEWSTEP_COMMIT"):
        return os.environ["FEWSTEP_COMMIT"]
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip() + (" (with local changes)" if dirty.stdout.strip() else "")
    except OSError:
        pass
    stamp = HERE / "wheels" / "COMMIT"
    if stamp.is_file():
        return f"unknown (no git here; the wheels were fetched at {stamp.read_text().strip()})"
    return "unknown (no git here; set FEWSTEP_COMMIT)"


IMAGES_NOTE = ("random weights: noise-like images, so encode time and bytes per image are "
               "pessimistic against a trained model's")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run the device benchmark into RESULTS_DIR."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "results", type=Path, help="folder for results.json, summary.txt, gpu-tests.log, logs.tar.gz"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny configs on the CPU: checks the script")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated [{','.join(MODELS)}]")
    parser.add_argument(
        "--scratch", type=Path, default=None, help="where models are built and kept [a temp folder]"
    )
    parser.add_argument(
        "--plan", action="store_true", help="print the parts and their allowances; run nothing"
    )
    args = parser.parse_args(argv)
    names = args.models.split(",")
    if args.plan:
        print(plan_text(names), end="")
        return 0
    import tempfile

    import torch

    plan = Plan(args.smoke)
    clock = Clock()
    cuda = torch.cuda.is_available()
    record: dict[str, Any] = {
        "benchmark": "bench/device/run.py",
        "mode": "smoke (tiny configs on the CPU; not a throughput figure)" if plan.smoke else "full size",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": _commit(),
        "machine": {
            "host": machine(),
            "gpu": torch.cuda.get_device_name(0) if cuda and not plan.smoke else None,
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        },
        "wall_seconds": WALL,
        "install_seconds": round(time.time() - STARTED, 1),
        "images": IMAGES_NOTE,
        "spans": {
            "model_only": "Model.generate calls back to back in one process (prompt encoding, denoising, "
            "VAE decode, uint8 pixels left on the device), one untimed warm-up call per batch size",
            "end_to_end": "per job: its first batch on the device to its last shard's commit (stats "
            "objects), after a one-shard warm-up job in the same worker; JPEG is encoded by nvJPEG on the "
            "worker's device thread, so its time is in this span and lowers the ratio",
            "worker_life": "worker process start (before its imports) to its last commit: model load, "
            "warm-up and the warm-up job included; CPU = that process's user + system seconds, all threads",
            "not_counted": f"Redis's and the producer's CPU; storage: {STORAGE}",
        },
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="fewstep-device-") as tmp:
        scratch = args.scratch or Path(tmp)
        results = Results(args.results.resolve(), Path(tmp) / "logs", record)
        results.save()
        why = f"deadline: {WALL - STOP_BEFORE:.0f} s after run.sh started"
        deadline = threading.Timer(max(0.0, STARTED + WALL - STOP_BEFORE - time.time()), results.stop, (why,))
        deadline.daemon = True
        deadline.start()
        signal.signal(signal.SIGTERM, lambda *_: results.stop("SIGTERM (run.sh's timeout)"))
        with results.part("gpu tests"):
            record["gpu_tests"] = gpu_tests(results, clock)
        with local_redis() as env:
            prompts = write_prompts(Path(tmp) / "prompts.tsv", max(plan.images["jpeg"], plan.other_jpeg))
            for name in names:
                if not clock.allows(allowance("build", name) + ALLOWANCES["model-only, per batch size"]):
                    record["models"][name] = {"label": name, "skipped": "global deadline"}
                    continue
                try:
                    throughput(name, plan, clock, scratch, results, env, prompts)
                except (Exception, SystemExit) as e:  # one model's failure must not lose the others
                    record["models"].setdefault(name, {"label": name})["error"] = f"{type(e).__name__}: {e}"
                    (results.logs / f"{name}-error.txt").write_text(traceback.format_exc())
                release()
                results.save()
            for name in names:
                if "directory" not in record["models"].get(name, {}):
                    continue
                try:
                    options_part(name, plan, clock, results, keep=args.scratch is not None)
                except (Exception, SystemExit) as e:
                    record["models"][name]["error"] = f"speed options: {type(e).__name__}: {e}"
                    (results.logs / f"{name}-options-error.txt").write_text(traceback.format_exc())
                release()
        deadline.cancel()
        record["seconds"] = clock.elapsed()
        results.current = "done"
        results.save()
    print(summary(record), end="")
    failed = record["gpu_tests"].get("failures", 0) or record["gpu_tests"].get("errors", 0)
    errors = [n for n, e in record["models"].items() if "error" in e]
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
