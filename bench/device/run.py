"""One offline device run: GPU tests, model-only and end-to-end throughput at real size.

Run through ``bash bench/device/run.sh RESULTS_DIR [--smoke]`` (which installs what is
missing from ``bench/device/wheels``). In this order, each part skipped once the global
deadline would be passed, results written after every part:

1. ``pytest -m gpu tests/test_gpu.py`` (the CUDA-only paths; on a CPU they skip, saying why);
2. per model of ``configs/`` (SDXS-512 + TAESD, SD-Turbo, SDXL-Turbo at 512, PixArt-α 512): build it with
   random weights as a local diffusers directory, then
   - **model-only** img/s per batch size: ``Model.generate`` in this process, as the worker's
     device thread calls it (prompt encoding, denoising, VAE decode, pixels to uint8, left on
     the GPU: no host copy, no encoding), after one warm-up call per size; GPU memory peak
     (``torch.cuda.max_memory_allocated``) per size; the size ``--batch-size auto`` chooses;
   - **speed options** at that size, one change from the baseline (float16, channels_last,
     SDPA) each: bfloat16, no channels_last, default attention, ``--compile default``,
     ``--vae tiny`` (where the model has a full VAE); SDXS's right after its other parts, the
     other models' once every model's throughput is measured;
   - **end to end**: ``producer enqueue`` → Redis → one real ``worker --model <directory>``
     process → encode (JPEG on the GPU with nvJPEG, PNG and WebP on the CPU) → local-directory
     storage → commit; each job's img/s spans its first batch on the device to its last
     shard's commit (stats objects), after a one-shard warm-up job. Ratio end-to-end ÷
     model-only at the same batch size and options. Also the worker process's whole life:
     images ÷ (last commit − process start: imports, model load, warm-up, first shard
     included) ÷ model-only, and its CPU seconds (every thread, user + system) per image;
   - SDXS only: the same JPEG job through a second worker with the next-shard read-ahead off
     (``FEWSTEP_READ_AHEAD=0``).
3. ``results.json`` and ``summary.txt`` in RESULTS_DIR.

``--smoke``: the same steps with the configs' tiny ``smoke`` stand-ins on the CPU, a few
images each (checks the script; its figures say nothing about any GPU).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # bench/: the harness

import models  # noqa: E402
from harness import REPO, local_redis, machine, run_jobs, write_prompts  # noqa: E402

STARTED = time.monotonic()
MODELS = ("sdxs-512", "sd-turbo", "sdxl-turbo", "pixart-alpha-512")


class Clock:
    """The run's global deadline: a part starts only if its estimate fits before it."""

    def __init__(self, budget: float):
        self.start = time.monotonic()
        self.budget = budget

    def left(self) -> float:
        """Seconds until the deadline."""
        return self.budget - (time.monotonic() - self.start)

    def allows(self, seconds: float) -> bool:
        """Whether a part estimated at ``seconds`` ends before the deadline."""
        return self.left() >= seconds

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return round(time.monotonic() - self.start, 1)


class Plan:
    """What a run does: the real one on a GPU, or the smoke one on the CPU."""

    def __init__(self, smoke: bool):
        import torch

        self.smoke = smoke
        self.device = "cpu" if smoke else "cuda"
        if not smoke and not torch.cuda.is_available():
            raise SystemExit("error: no CUDA GPU visible (use --smoke to check the script on a CPU)")
        self.budget = 240.0 if smoke else 480.0  # the last part ends before ~9 min on a GPU
        self.batch_sizes = (1, 2) if smoke else (1, 4, 16, 32, 64, 128)
        self.min_seconds = 0.0 if smoke else 1.5
        self.shard_size = 8 if smoke else 256
        #: images per end-to-end job: JPEG (the throughput figure), then PNG and WebP (SDXS only).
        self.images = {"jpeg": 8, "png": 4, "webp": 4} if smoke else {"jpeg": 4096, "png": 1024, "webp": 1024}
        self.other_jpeg = 4 if smoke else 1024  # the models after SDXS: JPEG only
        self.dtype = "float32" if smoke else "float16"


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


def _free(model) -> None:
    import gc

    import torch

    del model
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def model_only(directory: Path, run: dict, plan: Plan, clock: Clock, record: dict) -> int:
    """Model-only sweep over batch sizes and the size ``--batch-size auto`` picks; returns the
    size the other parts run at."""
    import torch

    from worker import speed
    from worker.speed import SpeedOptions

    model, applied = _load(directory, plan.device, SpeedOptions(dtype=plan.dtype))
    record["load_seconds"] = round(model.load_seconds, 1)
    record["baseline"] = {"dtype": model.dtype, **applied}
    sweep = record["model_only"] = []
    for batch in plan.batch_sizes:
        if not clock.allows(20):
            sweep.append({"batch_size": batch, "skipped": "global deadline"})
            continue
        try:
            sweep.append(_measure(model, batch, run["width"], run["height"], plan.min_seconds))
        except torch.OutOfMemoryError:
            sweep.append({"batch_size": batch, "error": "out of memory"})
            torch.cuda.empty_cache()
            break
    chosen = None
    if clock.allows(30):
        start = time.perf_counter()
        chosen = speed.auto_batch_size(model, limit=max(plan.batch_sizes), width=run["width"],
                                       height=run["height"])  # fmt: skip
        record["auto_batch_size"] = {"chosen": chosen, "seconds": round(time.perf_counter() - start, 1)}
    else:
        record["auto_batch_size"] = {"skipped": "global deadline"}
    _free(model)
    measured = [r for r in sweep if "images_per_s" in r]
    if chosen is None:  # the best size measured, else the smallest
        chosen = max(measured, key=lambda r: r["images_per_s"])["batch_size"] if measured else 1
    return chosen


def speed_options(
    directory: Path,
    run: dict,
    plan: Plan,
    clock: Clock,
    batch: int,
    family_vae: bool,
    compile_estimate: float,
) -> list:
    """One change from the baseline per row, model-only at ``batch``."""
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
        ("attention default (no SDPA switch)", SpeedOptions(dtype=plan.dtype, attention="default"), "off"),
        ("--compile default", SpeedOptions(dtype=plan.dtype), "default"),
    ]
    if family_vae:
        rows.append(("--vae tiny", SpeedOptions(dtype=plan.dtype, vae="tiny"), "off"))
    out = []
    for label, options, compile_mode in rows:
        row: dict[str, Any] = {"option": label}
        if compile_mode != "off" and plan.smoke:
            row["skipped"] = "compiling on the CPU takes longer than the smoke run's budget"
        elif not clock.allows(compile_estimate if compile_mode != "off" else 25):
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
            _free(model)
        out.append(row)
    return out


# --- end to end ----------------------------------------------------------------------------------


def _job_record(label: str, job, alone: float | None) -> dict[str, Any]:
    idle = sum(s.gpu_idle_fraction * s.seconds for s in job.stats) / sum(s.seconds for s in job.stats)
    row = {
        "job": label,
        "images": job.images,
        "seconds": round(job.seconds, 2),
        "images_per_s": round(job.rate, 2),
        "ratio_to_model_only": round(job.rate / alone, 3) if alone else None,
        "device_idle_share": round(idle, 3),
        "encoder": job.stats[0].encoder,
        "shards": len(job.stats),
        "shards_started_with_batches_read_ahead": sum(s.batches_ahead > 0 for s in job.stats),
        "worker_cpu_ms_per_image_in_span": round(1000 * job.cpu_seconds / job.images, 2),
    }
    return row


def end_to_end(directory, cfg_dir, plan, clock, env, prompts, batch, alone, jobs, logs, read_ahead=True):
    """One worker process through ``jobs`` [(label, images, enqueue flags)]; a record per job."""
    worker_args = ["--device", plan.device, "--batch-size", str(batch)]
    if not plan.smoke:
        worker_args += ["--dtype", plan.dtype, "--jpeg-encoder", "gpu"]
    label = "read-ahead-off" if not read_ahead else "read-ahead-on"
    runs, first, life = run_jobs(
        env,
        prompts,
        model=str(directory),
        jobs=[(images, flags) for _, images, flags in jobs],
        shard_size=plan.shard_size,
        worker_args=worker_args,
        worker_env={"FEWSTEP_CONFIG_DIR": str(cfg_dir), "FEWSTEP_READ_AHEAD": "1" if read_ahead else "0"},
        log_path=logs / f"{directory.name}-{label}.log",
        output=str(Path(cfg_dir).parent / "output"),
        timeout=max(clock.left() + 30, 60),
    )
    return {
        "read_ahead": read_ahead,
        "batch_size": batch,
        "jobs": [_job_record(name, run, alone) for (name, _, _), run in zip(jobs, runs, strict=True)],
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


def gpu_tests(results: Path, clock: Clock) -> dict[str, Any]:
    """``pytest -m gpu tests/test_gpu.py``: passed / failed / skipped, and its last lines."""
    xml = results / "gpu-tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
               "--junitxml", str(xml), "-rs", "tests/test_gpu.py"]  # fmt: skip
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                              timeout=max(30.0, min(200.0, clock.left())))  # fmt: skip
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:
        output, code = f"{e.stdout or ''}\ntimed out", "timeout"
    (results / "gpu-tests.log").write_text(output)
    counts: dict[str, Any] = {}
    if xml.is_file():
        import xml.etree.ElementTree as ET

        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    lines = [line for line in output.splitlines() if line.strip()]
    return {"exit_code": code, "seconds": round(time.perf_counter() - start, 1), **counts,
            "tail": lines[-12:]}  # fmt: skip


def _model_part(name, plan, clock, scratch, results, record, env, prompts, logs) -> None:
    spec = models.spec(name)
    run = models.settings(spec, plan.smoke)
    entry = record["models"][name] = {"label": spec["label"], "source": spec["source"], "settings": run}
    start = time.perf_counter()
    tiny = {
        family: str(models.build_tiny_vae(scratch / "models" / repo, smoke=plan.smoke))
        for family, repo in models.TINY_VAES.items()
    }
    directory = models.build(name, scratch / "models" / name, smoke=plan.smoke, device=plan.device,
                             dtype=plan.dtype)  # fmt: skip
    cfg_dir = models.config_dir(scratch / name, spec, plan.smoke, tiny)
    os.environ["FEWSTEP_CONFIG_DIR"] = entry["config_dir"] = str(cfg_dir)
    entry["build_seconds"] = round(time.perf_counter() - start, 1)
    entry["weights_gib"] = round(sum(p.stat().st_size for p in directory.rglob("*.safetensors")) / 2**30, 2)
    batch = model_only(directory, run, plan, clock, entry)
    alone = next((r["images_per_s"] for r in entry["model_only"] if r.get("batch_size") == batch and
                  "images_per_s" in r), None)  # fmt: skip
    sdxs = name == "sdxs-512"
    if alone is None and clock.allows(20):  # the chosen size was not in the sweep
        from worker.speed import SpeedOptions

        model, _ = _load(directory, plan.device, SpeedOptions(dtype=plan.dtype))
        alone = _measure(model, batch, run["width"], run["height"], plan.min_seconds)["images_per_s"]
        _free(model)
    entry["model_only_at_batch_size"] = {"batch_size": batch, "images_per_s": alone}
    save(results, record)
    jobs = [("jpeg", plan.images["jpeg"] if sdxs else plan.other_jpeg, ["--format", "jpeg"])]
    if sdxs:
        jobs += [("png", plan.images["png"], ["--format", "png"]),
                 ("webp", plan.images["webp"], ["--format", "webp"])]  # fmt: skip
    if clock.allows(90 if sdxs else 60):
        first = end_to_end(directory, cfg_dir, plan, clock, env, prompts, batch, alone, jobs, logs)
        entry["end_to_end"] = [first]
        save(results, record)
        if sdxs and clock.allows(60):
            entry["end_to_end"].append(end_to_end(directory, cfg_dir, plan, clock, env, prompts, batch,
                                                  alone, jobs[:1], logs, read_ahead=False))  # fmt: skip
        elif sdxs:
            entry["read_ahead_off"] = {"skipped": "global deadline"}
    else:
        entry["end_to_end"] = {"skipped": "global deadline"}
    save(results, record)
    if sdxs:  # the others' options come after every model's throughput (see main)
        options_part(name, directory, plan, clock, results, record)


def options_part(name, directory, plan, clock, results, record) -> None:
    """The speed options of a model already built and measured."""
    entry, spec = record["models"][name], models.spec(name)
    batch = entry["model_only_at_batch_size"]["batch_size"]
    os.environ["FEWSTEP_CONFIG_DIR"] = entry["config_dir"]
    if clock.allows(60):
        # --vae tiny where there is a full VAE to replace (SDXS ships TAESD already)
        full_vae = spec["family"] in models.TINY_VAES and name != "sdxs-512"
        run = models.settings(spec, plan.smoke)
        compile_estimate = 120 if name == "sdxs-512" else 240  # seconds; inductor on a larger denoiser
        entry["speed_options"] = speed_options(directory, run, plan, clock, batch, full_vae, compile_estimate)
    else:
        entry["speed_options"] = {"skipped": "global deadline"}
    save(results, record)


def save(results: Path, record: dict) -> None:
    """Write the record and its summary as they stand (a run cut short still leaves what it measured)."""
    record["elapsed_seconds"] = round(time.monotonic() - STARTED, 1)
    (results / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    (results / "summary.txt").write_text(summary(record))


def _sweep_text(entry: dict) -> str:
    cells = []
    for r in entry.get("model_only", []):
        if "images_per_s" in r:
            peak = f" ({r['peak_gib']} GiB)" if "peak_gib" in r else ""
            cells.append(f"{r['batch_size']}: {r['images_per_s']}{peak}")
        else:
            cells.append(f"{r['batch_size']}: {r.get('error') or r.get('skipped')}")
    return ", ".join(cells)


def summary(record: dict) -> str:
    """A short text summary of the record."""
    gpu = record["machine"]["gpu"] or "no GPU"
    took = record.get("seconds") or f"{record.get('elapsed_seconds')} (not finished)"
    head = f"fewstep device run {record['mode']}: {gpu}, commit {record['commit']}, {record['date']}"
    lines = [f"{head}, {took} s"]
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
                    f"  end to end, {job['job']}, read-ahead {ahead}, batch {worker['batch_size']}: "
                    f"{job['images_per_s']} img/s = {job['ratio_to_model_only']} x model-only; "
                    f"device idle {job['device_idle_share']}"
                )
            life = worker["worker_life"]
            lines.append(
                f"    worker life (start to last commit): {life['images_per_s']} img/s = "
                f"{life['ratio_to_model_only']} x model-only; CPU {life['cpu_ms_per_image']} ms/image"
            )
        options = entry.get("speed_options")
        for row in options if isinstance(options, list) else []:
            rate = row.get("images_per_s")
            measured = f"{rate} img/s" if rate else f"skipped ({row['skipped']})"
            lines.append(f"  {row['option']}: {measured}")
    lines.append(goal(record))
    return "\n".join(lines) + "\n"


GOAL = "goal (SDXS JPEG end to end >= 300 img/s and >= 0.9 x model-only)"


def goal(record: dict) -> str:
    """The issue's goal, checked on SDXS's JPEG job with read-ahead on: >= 300 img/s end to end
    and >= 0.9 x model-only (a smoke run's figures check nothing)."""
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
    return f"{GOAL}: {met}: {rate} img/s, {ratio} x{scope}"


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True)
    return (done.stdout.strip() or "unknown") + (" (with local changes)" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> int:
    """Run the device benchmark into RESULTS_DIR."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="folder for results.json, summary.txt and logs")
    parser.add_argument("--smoke", action="store_true", help="tiny configs on the CPU: checks the script")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated [{','.join(MODELS)}]")
    parser.add_argument("--scratch", type=Path, default=None, help="where models are built [a temp folder]")
    args = parser.parse_args(argv)
    import tempfile

    import torch

    plan = Plan(args.smoke)
    clock = Clock(plan.budget)
    results = args.results.resolve()
    logs = results / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    record: dict[str, Any] = {
        "benchmark": "bench/device/run.py",
        "mode": "smoke (tiny configs on the CPU; not a throughput figure)" if plan.smoke else "full size",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": _commit(),
        "machine": {
            "host": machine(),
            "gpu": torch.cuda.get_device_name(0) if cuda and not plan.smoke else None,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        },
        "spans": {
            "model_only": "Model.generate calls back to back in one process (prompt encoding, denoising, "
            "VAE decode, uint8 pixels left on the device), one untimed warm-up call per batch size",
            "end_to_end": "per job: its first batch on the device to its last shard's commit (stats "
            "objects), after a one-shard warm-up job in the same worker",
            "worker_life": "worker process start (before its imports) to its last commit: model load, "
            "warm-up and the warm-up job included; CPU = that process's user + system seconds, all threads",
            "not_counted": "Redis's and the producer's CPU; storage is a local directory (no S3 server)",
        },
        "models": {},
    }
    save(results, record)
    record["gpu_tests"] = gpu_tests(results, clock)
    save(results, record)
    with tempfile.TemporaryDirectory(prefix="fewstep-device-") as tmp, local_redis() as env:
        scratch = args.scratch or Path(tmp)
        prompts = write_prompts(Path(tmp) / "prompts.tsv", max(plan.images["jpeg"], plan.other_jpeg))
        for name in args.models.split(","):
            if not clock.allows(45):
                record["models"][name] = {"label": name, "skipped": "global deadline"}
                continue
            try:
                _model_part(name, plan, clock, scratch, results, record, env, prompts, logs)
            except (Exception, SystemExit) as e:  # one model's failure must not lose the others
                record["models"].setdefault(name, {"label": name})["error"] = f"{type(e).__name__}: {e}"
                (logs / f"{name}-error.txt").write_text(traceback.format_exc())
            save(results, record)
        for name in args.models.split(","):
            entry = record["models"][name]
            if name != "sdxs-512" and "model_only_at_batch_size" in entry:
                try:
                    options_part(name, scratch / "models" / name, plan, clock, results, record)
                except (Exception, SystemExit) as e:
                    entry["error"] = f"speed options: {type(e).__name__}: {e}"
                    (logs / f"{name}-options-error.txt").write_text(traceback.format_exc())
    record["seconds"] = clock.elapsed()
    save(results, record)
    text = summary(record)
    (results / "summary.txt").write_text(text)
    print(text, end="")
    failed = record["gpu_tests"].get("failures", 0) or record["gpu_tests"].get("errors", 0)
    errors = [n for n, e in record["models"].items() if "error" in e]
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
