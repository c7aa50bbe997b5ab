"""Pipeline overlap on a CPU-only machine: end-to-end vs model-only with the synthetic model.

The ``synthetic`` model holds a fixed latency per batch with the GIL released and returns
512x512 images, like a model on a GPU. For each rate it runs, in the same process run:

- **model-only**: the synthetic model's batches back to back, nothing else;
- **end-to-end**: ``producer enqueue`` + a real ``worker`` process + Redis + SeaweedFS, with
  encoding, uploads and commits;

and prints their ratio (target: end-to-end ≥ 0.95 × model-only). It also prints the bare
encoder's CPU cost per image against the worker's, how threads compare with processes for
encoding, and the rate at which PNG becomes the bottleneck. The JPEG rates run once per
``--layouts`` entry (files, webdataset, parquet: how the worker stores images), in the same
run, with the storage requests per 1,000 images each layout made.

    .venv/bin/python bench/pipeline.py                 # the full sweep (a few minutes)
    .venv/bin/python bench/pipeline.py --jpeg-rates 200 --png-rates 40 --images 512
    .venv/bin/python bench/pipeline.py --read-ahead-ablation 200 --images 1024 --shard-size 128
    .venv/bin/python bench/pipeline.py --layouts files,webdataset,parquet --jpeg-rates 100,300 --png-rates ""
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from harness import REPO, JobRun, local_services, machine, run_job, write_prompts

from fewstep.contract import ShardStats
from worker.encode import ImageFormat, encode
from worker.synthetic import load as load_synthetic
from worker.synthetic import pictures

JPEG = ImageFormat("jpeg", quality=90)
PNG = ImageFormat("png", png_level=6)
TARGET = 0.95


def bare_encoder_cpu(image_format: ImageFormat, seconds: float = 2.0) -> float:
    """CPU seconds of one ``encode`` call on a synthetic 512x512 image, one thread, no pipeline."""
    images = pictures(512, 512)
    start, count = time.thread_time(), 0
    while time.thread_time() - start < seconds:
        encode(images[count % len(images)], image_format)
        count += 1
    return (time.thread_time() - start) / count


def _encode_png_bytes(pixels: np.ndarray) -> int:
    return len(encode(pixels, PNG))


def _encode_jpeg_bytes(pixels: np.ndarray) -> int:
    return len(encode(pixels, JPEG))


def pool_rates(workers: int, count: int) -> dict[str, float]:
    """Images/s encoding ``count`` images with threads vs processes (pixels sent to them)."""
    images = pictures(512, 512)
    rates = {}
    for label, fn, n in (
        ("jpeg", _encode_jpeg_bytes, count),
        ("png", _encode_png_bytes, max(8, count // 16)),
    ):
        for kind, pool_cls in (("threads", ThreadPoolExecutor), ("processes", ProcessPoolExecutor)):
            with pool_cls(workers) as pool:
                list(pool.map(fn, [images[0]] * workers))  # start the workers
                start = time.perf_counter()
                list(pool.map(fn, [images[i % len(images)] for i in range(n)]))
                rates[f"{label} {kind}"] = n / (time.perf_counter() - start)
    return rates


def model_only(batch_ms: float, batch_size: int, images: int) -> float:
    """Images/s of the synthetic model alone over ``images`` images."""
    model = load_synthetic("synthetic", {"width": 512, "height": 512, "batch_ms": batch_ms}, "cpu")
    seeds = list(range(batch_size))
    prompts = ["p"] * batch_size
    start = time.perf_counter()
    for _ in range(images // batch_size):
        model.generate(prompts, seeds, steps=1, guidance=0.0, width=512, height=512)
    return images / (time.perf_counter() - start)


def end_to_end(
    svc,
    env,
    prompts: Path,
    rate: float,
    args,
    image_format: ImageFormat,
    log: Path,
    read_ahead: bool = True,
    layout: str = "files",
):
    """Model-only and end-to-end runs at ``rate``: (model-only images/s, the job's run)."""
    batch_ms = 1000 * args.batch_size / rate
    settings = ["--layout", layout]
    settings += ["--quality", str(image_format.quality)] if image_format.quality else []
    settings += ["--png-level", str(image_format.png_level)] if image_format.png_level is not None else []
    run, first = run_job(
        env,
        prompts,
        model="synthetic",
        images=args.images,
        shard_size=args.shard_size,
        job_args=["--format", image_format.name, *settings],
        worker_args=["--batch-size", str(args.batch_size)],
        worker_env={"FEWSTEP_SYNTHETIC_BATCH_MS": f"{batch_ms:.4f}", "FEWSTEP_READ_AHEAD": "01"[read_ahead]},
        log_path=log,
        storage_pid=svc.weed_pid,
    )
    return model_only(batch_ms, args.batch_size, args.images), run, first


def report(label: str, rate: float, alone: float, run: JobRun, first: ShardStats, bare: float) -> float:
    """Print one rate's results; returns end-to-end / model-only."""
    ratio = run.rate / alone
    idle = sum(s.gpu_idle_fraction * s.seconds for s in run.stats) / sum(s.seconds for s in run.stats)
    print(
        f"{label} {rate:4.0f} img/s asked: model-only {alone:6.1f}, end-to-end {run.rate:6.1f} img/s, "
        f"ratio {ratio:.3f} {'ok' if ratio >= TARGET else 'BELOW TARGET'}; model idle {100 * idle:.1f}%, "
        f"waited for slots "
        f"{run.total('wait_s'):.2f}s, batches generated ahead in "
        f"{sum(s.batches_ahead > 0 for s in run.stats)}/{len(run.stats)} shards"
    )
    encode_cpu = run.total("encode_cpu_s") / run.images
    worker_cpu = run.cpu_seconds / run.images
    print(
        f"    CPU per image: encode stage {1000 * encode_cpu:.2f} ms = {encode_cpu / bare:.2f} x the bare "
        f"encoder; whole worker process {1000 * worker_cpu:.2f} ms = {worker_cpu / bare:.2f} x the bare "
        "encoder; "
        f"SeaweedFS {1000 * run.storage_cpu_seconds / run.images:.2f} ms; a fresh worker's first shard "
        f"(warm-up job) {first.seconds:.2f}s, model alone {first.images / alone:.2f}s"
    )
    per_1000 = {name: 1000 * run.total(name) / run.images for name in ("image_requests", "storage_requests")}
    print(
        f"    storage requests per 1,000 images: for the images {per_1000['image_requests']:.1f}, by the "
        f"whole worker from each task's start to its commit {per_1000['storage_requests']:.1f}"
    )
    return ratio


def read_ahead_ablation(args) -> None:
    """JPEG end to end at one rate, read-ahead on then off (FEWSTEP_READ_AHEAD), same services."""
    print(machine())
    rate = args.read_ahead_ablation
    with local_services() as (svc, env), tempfile.TemporaryDirectory() as scratch:
        prompts = write_prompts(Path(scratch) / "prompts.tsv", args.images)
        logs = REPO / ".fewstep" / "bench-logs"
        logs.mkdir(parents=True, exist_ok=True)
        for read_ahead in (True, False):
            log = logs / f"read-ahead-{int(read_ahead)}.log"
            alone, run, first = end_to_end(svc, env, prompts, rate, args, JPEG, log, read_ahead=read_ahead)
            report(f"JPEG, read-ahead {'on ' if read_ahead else 'off'}", rate, alone, run, first,
                   bare_encoder_cpu(JPEG, 0.5))  # fmt: skip


def main() -> None:
    """Run the sweep and print the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--jpeg-rates", default="100,200,300,400,500", help="Synthetic rates (img/s), JPEG q90."
    )
    parser.add_argument("--png-rates", default="10,20,30,40", help="Synthetic rates (img/s), PNG level 6.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=2048, help="Images per JPEG run.")
    parser.add_argument("--png-images", type=int, default=256, help="Images per PNG run (4 shards).")
    parser.add_argument(
        "--read-ahead-ablation",
        type=float,
        metavar="RATE",
        help="Only this: JPEG at RATE img/s through a worker with the next-shard read-ahead on, then off.",
    )
    parser.add_argument(
        "--layouts", default="files", help="Layouts the JPEG rates run with, e.g. files,webdataset,parquet."
    )
    args = parser.parse_args()
    if args.read_ahead_ablation:
        read_ahead_ablation(args)
        return

    print(machine())
    bare_jpeg, bare_png = bare_encoder_cpu(JPEG), bare_encoder_cpu(PNG)
    print(f"bare encoder, one thread, 512x512 synthetic image: JPEG q90 {1000 * bare_jpeg:.2f} ms CPU, "
          f"PNG level 6 {1000 * bare_png:.1f} ms CPU")  # fmt: skip
    cores = len(os.sched_getaffinity(0))
    rates = pool_rates(cores, 400)
    print(f"encoding pool of {cores}: " + ", ".join(f"{k} {v:.0f} img/s" for k, v in rates.items()))

    with local_services() as (svc, env), tempfile.TemporaryDirectory() as scratch:
        prompts = write_prompts(Path(scratch) / "prompts.tsv", max(args.images, args.png_images))
        logs = REPO / ".fewstep" / "bench-logs"
        logs.mkdir(parents=True, exist_ok=True)
        for layout in [name for name in args.layouts.split(",") if name]:
            best = None
            for rate in [float(r) for r in args.jpeg_rates.split(",") if r]:
                log = logs / f"jpeg-{layout}-{rate:.0f}.log"
                alone, run, first = end_to_end(svc, env, prompts, rate, args, JPEG, log, layout=layout)
                if report(f"JPEG {layout}", rate, alone, run, first, bare_jpeg) >= TARGET:
                    best = max(best or 0.0, alone)
            print(f"{layout}: highest JPEG rate sustained at >= {TARGET} x model-only: "
                  + (f"{best:.0f} img/s" if best else "none of those tried"))  # fmt: skip
        png_args = argparse.Namespace(
            **{
                **vars(args),
                "images": args.png_images,
                "shard_size": max(args.batch_size, args.png_images // 4),
            }
        )
        bottleneck = None
        for rate in [float(r) for r in args.png_rates.split(",") if r]:
            alone, run, first = end_to_end(
                svc, env, prompts, rate, png_args, PNG, logs / f"png-{rate:.0f}.log"
            )
            if report("PNG ", rate, alone, run, first, bare_png) < TARGET and bottleneck is None:
                bottleneck = alone
        print(
            "PNG level 6 becomes the bottleneck at: "
            + (f"{bottleneck:.0f} img/s" if bottleneck else "none of the rates tried")
            + f" (CPU bound: {cores} cores / {1000 * bare_png:.1f} ms = {cores / bare_png:.0f} img/s at most)"
        )


if __name__ == "__main__":
    main()
