"""Pipeline overlap on a CPU-only machine: end-to-end vs model-only with the synthetic model.

The ``synthetic`` model holds a fixed latency per batch with the GIL released and returns
512x512 images, like a model on a GPU. For each format, layout and rate it runs, in the same
process run:

- **model-only**: the synthetic model's batches back to back, nothing else;
- **end-to-end**: ``producer enqueue`` + a real ``worker`` process + Redis + SeaweedFS, with
  encoding, uploads and commits;

and prints their ratio (target: end-to-end ≥ 0.95 × model-only), the whole worker process's
CPU per image against the bare JPEG encoder's, and SeaweedFS's CPU per image. Formats:
``jpeg`` (q90), ``png`` (fpng, the default PNG encoder), ``png-pillow6`` (Pillow's zlib at
level 6, the old default) and ``jxl`` (lossless, effort 1).

``--count-requests`` instead sends the worker's storage traffic through a counting gateway
(``tests/s3_gateway.py``) in front of SeaweedFS and prints the requests that arrived there for
each job, per 1,000 images and by kind: the whole life of every shard, from the task's first
marker check to its last PUT (attempt record, stats), heartbeats and reading ahead included.
The gateway re-signs and forwards every request in Python on the same cores, so that mode
prints no CPU ratios.

    .venv/bin/python bench/pipeline.py --formats jpeg,png --rates 100,300 --layouts webdataset,parquet
    .venv/bin/python bench/pipeline.py --formats jpeg --rates 300 --layouts files --shard-size 256
    .venv/bin/python bench/pipeline.py --count-requests --rates 100,300 --layouts webdataset,parquet
    .venv/bin/python bench/pipeline.py --read-ahead-ablation 200 --images 1024 --shard-size 128
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote

import numpy as np
from harness import REPO, JobRun, local_services, machine, run_job, write_prompts

from fewstep.contract import ShardStats
from worker.encode import ImageFormat, encode, encoder_label
from worker.synthetic import load as load_synthetic
from worker.synthetic import pictures

FORMATS = {  # label → (the worker's format, producer enqueue flags)
    "jpeg": (ImageFormat("jpeg", quality=90), ["--format", "jpeg", "--quality", "90"]),
    "png": (ImageFormat("png", png_encoder="fpng"), ["--format", "png", "--png-encoder", "fpng"]),
    "png-pillow6": (
        ImageFormat("png", png_level=6, png_encoder="pillow"),
        ["--format", "png", "--png-encoder", "pillow", "--png-level", "6"],
    ),
    "jxl": (ImageFormat("jxl", effort=1), ["--format", "jxl"]),
}
JPEG = FORMATS["jpeg"][0]
TARGET = 0.95


def bare_encoder_cpu(image_format: ImageFormat, seconds: float = 2.0) -> float:
    """CPU seconds of one ``encode`` call on a synthetic 512x512 image, one thread, no pipeline."""
    images = pictures(512, 512)
    start, count = time.thread_time(), 0
    while time.thread_time() - start < seconds:
        encode(images[count % len(images)], image_format)
        count += 1
    return (time.thread_time() - start) / count


def _encode_bytes(label: str, pixels: np.ndarray) -> int:
    return len(encode(pixels, FORMATS[label][0]))


def pool_rates(workers: int, count: int, labels: list[str]) -> dict[str, float]:
    """Images/s encoding ``count`` images with threads vs processes (pixels sent to them)."""
    images = pictures(512, 512)
    rates = {}
    for label in labels:
        n = count if label != "png-pillow6" else max(8, count // 16)
        for kind, pool_cls in (("threads", ThreadPoolExecutor), ("processes", ProcessPoolExecutor)):
            with pool_cls(workers) as pool:
                list(pool.map(_encode_bytes, [label] * workers, [images[0]] * workers))  # start them
                start = time.perf_counter()
                list(pool.map(_encode_bytes, [label] * n, [images[i % len(images)] for i in range(n)]))
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


def end_to_end(svc, env, prompts: Path, rate: float, args, flags: list[str], log: Path, *,
               read_ahead: bool = True, layout: str = "files", endpoint: str | None = None):  # fmt: skip
    """A job at ``rate`` through a fresh worker: (its run, the warm-up shard's stats).
    ``endpoint``: the S3 endpoint the worker uses instead of SeaweedFS's own."""
    batch_ms = 1000 * args.batch_size / rate
    worker_env = {"FEWSTEP_SYNTHETIC_BATCH_MS": f"{batch_ms:.4f}", "FEWSTEP_READ_AHEAD": "01"[read_ahead]}
    if endpoint:
        worker_env["AWS_ENDPOINT_URL_S3"] = endpoint
    return run_job(
        env,
        prompts,
        model="synthetic",
        images=args.images,
        shard_size=args.shard_size,
        job_args=[*flags, "--layout", layout],
        worker_args=["--batch-size", str(args.batch_size)],
        worker_env=worker_env,
        log_path=log,
        storage_pid=svc.weed_pid,
    )


def report(label: str, rate: float, alone: float, run: JobRun, first: ShardStats, bare_jpeg: float) -> float:
    """Print one run's results; returns end-to-end / model-only."""
    ratio = run.rate / alone
    idle = sum(s.gpu_idle_fraction * s.seconds for s in run.stats) / sum(s.seconds for s in run.stats)
    print(
        f"{label} {rate:4.0f} img/s asked: model-only {alone:6.1f}, end-to-end {run.rate:6.1f} img/s, "
        f"ratio {ratio:.3f} {'ok' if ratio >= TARGET else 'BELOW TARGET'}; model idle {100 * idle:.1f}%, "
        f"waited for slots {run.total('wait_s'):.2f}s, batches generated ahead in "
        f"{sum(s.batches_ahead > 0 for s in run.stats)}/{len(run.stats)} shards"
    )
    encode_cpu = run.total("encode_cpu_s") / run.images
    worker_cpu = run.cpu_seconds / run.images
    size = sum(s.images for s in run.stats)
    print(
        f"    CPU per image: encode stage {1000 * encode_cpu:.2f} ms; whole worker process "
        f"{1000 * worker_cpu:.2f} ms = {worker_cpu / bare_jpeg:.2f} x the bare JPEG encoder; SeaweedFS "
        f"{1000 * run.storage_cpu_seconds / run.images:.2f} ms; {size} images in {len(run.stats)} shards; "
        f"a fresh worker's first shard (warm-up job) {first.seconds:.2f}s, "
        f"model alone {first.images / alone:.2f}s"
    )
    return ratio


def request_kind(job: str, method: str, path: str, query: str) -> str | None:
    """What a request that reached the gateway was for (None: not about ``job``)."""
    query = unquote(query)
    marker = f"/{job}/"
    if marker in path:
        rest = path.split(marker, 1)[1]
    elif f"prefix=bench/{job}/" in query:
        rest = query.split(f"prefix=bench/{job}/", 1)[1].split("&", 1)[0]
    else:
        return None
    top = rest.split("/", 1)[0] or "(job)"
    if "list-type" in query or (method == "GET" and not rest):
        return f"LIST {top}"
    if "uploadId" in query and "partNumber" in query:
        return f"{method} {top} (multipart part)"
    if "uploads" in query.split("&") or query.startswith("uploads"):
        return f"{method} {top} (multipart start)"
    if "uploadId" in query:
        return f"{method} {top} (multipart {'complete' if method == 'POST' else 'abort'})"
    return f"{method} {top}"


def count_requests(args) -> None:
    """Each layout and rate through the counting gateway: requests per 1,000 images, by kind."""
    from tests.s3_gateway import S3Gateway

    print(machine())
    flags = FORMATS[args.formats.split(",")[0]][1]
    with local_services() as (svc, env), tempfile.TemporaryDirectory() as scratch:
        prompts = write_prompts(Path(scratch) / "prompts.tsv", args.images)
        logs = REPO / ".fewstep" / "bench-logs"
        logs.mkdir(parents=True, exist_ok=True)
        with S3Gateway(svc.s3_endpoint, svc.access_key, svc.secret_key) as gateway:
            for layout in [name for name in args.layouts.split(",") if name]:
                for rate in [float(r) for r in args.rates.split(",") if r]:
                    before = len(gateway.requests)
                    log = logs / f"count-{layout}-{rate:.0f}.log"
                    run, _ = end_to_end(svc, env, prompts, rate, args, flags, log,
                                        layout=layout, endpoint=gateway.url)  # fmt: skip
                    job = run.stats[0].job
                    seen = gateway.requests[before:]
                    kinds = Counter(k for r in seen if (k := request_kind(job, *r)) is not None)
                    total = sum(kinds.values())
                    seconds = [s.seconds for s in run.stats]
                    print(
                        f"{layout} {rate:.0f} img/s asked, {run.images} images in {len(run.stats)} shards of "
                        f"{args.shard_size} (end-to-end {run.rate:.1f} img/s, "
                        f"a shard's task {min(seconds):.1f}-"
                        f"{max(seconds):.1f}s): {total} requests for this job = "
                        f"{1000 * total / run.images:.2f} per 1,000 images "
                        f"({total / len(run.stats):.1f} per shard); other requests meanwhile "
                        f"(warm-up job, bucket checks): {len(seen) - total}"
                    )
                    for kind, n in sorted(kinds.items(), key=lambda kv: -kv[1]):
                        print(f"    {n:5d}  {n / len(run.stats):6.2f}/shard  {kind}")


def read_ahead_ablation(args) -> None:
    """JPEG end to end at one rate, read-ahead on then off (FEWSTEP_READ_AHEAD), same services."""
    print(machine())
    rate = args.read_ahead_ablation
    with local_services() as (svc, env), tempfile.TemporaryDirectory() as scratch:
        prompts = write_prompts(Path(scratch) / "prompts.tsv", args.images)
        logs = REPO / ".fewstep" / "bench-logs"
        logs.mkdir(parents=True, exist_ok=True)
        bare = bare_encoder_cpu(JPEG, 0.5)
        for read_ahead in (True, False):
            log = logs / f"read-ahead-{int(read_ahead)}.log"
            run, first = end_to_end(
                svc, env, prompts, rate, args, FORMATS["jpeg"][1], log, read_ahead=read_ahead
            )
            alone = model_only(1000 * args.batch_size / rate, args.batch_size, args.images)
            report(f"JPEG, read-ahead {'on ' if read_ahead else 'off'}", rate, alone, run, first, bare)


def sweep(args) -> None:
    """Every format x layout x rate, end to end against model-only, in one process run."""
    print(machine())
    labels = [name for name in args.formats.split(",") if name]
    bare = {label: bare_encoder_cpu(FORMATS[label][0]) for label in dict.fromkeys(["jpeg", *labels])}
    print("bare encoder, one thread, 512x512 synthetic image, CPU per image: " + ", ".join(
        f"{label} ({encoder_label(FORMATS[label][0])}) {1000 * cpu:.2f} ms = {cpu / bare['jpeg']:.2f} x JPEG"
        for label, cpu in bare.items()
    ))  # fmt: skip
    cores = len(os.sched_getaffinity(0))
    if args.pool_rates:
        rates = pool_rates(cores, 400, labels)
        print(f"encoding pool of {cores}: " + ", ".join(f"{k} {v:.0f} img/s" for k, v in rates.items()))
    with local_services() as (svc, env), tempfile.TemporaryDirectory() as scratch:
        prompts = write_prompts(Path(scratch) / "prompts.tsv", args.images)
        logs = REPO / ".fewstep" / "bench-logs"
        logs.mkdir(parents=True, exist_ok=True)
        for label in labels:
            for layout in [name for name in args.layouts.split(",") if name]:
                best = None
                for rate in [float(r) for r in args.rates.split(",") if r]:
                    log = logs / f"{label}-{layout}-{rate:.0f}.log"
                    run, first = end_to_end(
                        svc, env, prompts, rate, args, FORMATS[label][1], log, layout=layout
                    )
                    alone = model_only(1000 * args.batch_size / rate, args.batch_size, args.images)
                    if report(f"{label} {layout}", rate, alone, run, first, bare["jpeg"]) >= TARGET:
                        best = max(best or 0.0, alone)
                print(f"{label} {layout}: highest rate held at >= {TARGET} x model-only: "
                      + (f"{best:.0f} img/s" if best else "none of those tried"))  # fmt: skip


def main() -> None:
    """Run the sweep (or the request count, or the read-ahead ablation) and print the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", default="jpeg,png", help=f"Comma list of {', '.join(FORMATS)}.")
    parser.add_argument("--rates", default="100,300", help="Synthetic model rates (img/s).")
    parser.add_argument(
        "--layouts", default="webdataset,parquet", help="Layouts: files, webdataset, parquet."
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--images", type=int, default=3072, help="Images per measured job.")
    parser.add_argument(
        "--pool-rates", action="store_true", help="Also time threads vs processes for encoding."
    )
    parser.add_argument(
        "--count-requests",
        action="store_true",
        help="Count the worker's storage requests at a gateway instead.",
    )
    parser.add_argument(
        "--read-ahead-ablation",
        type=float,
        metavar="RATE",
        help="Only this: JPEG at RATE img/s through a worker with the next-shard read-ahead on, then off.",
    )
    args = parser.parse_args()
    if args.read_ahead_ablation:
        read_ahead_ablation(args)
    elif args.count_requests:
        count_requests(args)
    else:
        sweep(args)


if __name__ == "__main__":
    main()
