"""The overlapped shard pipeline: bounded batches in flight, commit after every upload,
read-ahead of the next shard, per-shard stats, formats with their settings recorded."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewstep import UserError
from fewstep.contract import (
    ShardMessage,
    ShardStats,
    image_key,
    manifest_key,
    metadata_key,
    new_attempt_id,
    stats_key,
)
from fewstep.queue import pending_messages, queue_length, redis_client
from fewstep.storage import open_store
from tests.support import (
    cli_json,
    committed_metadata,
    layout_or_files,
    run_worker_until_done,
    start_worker,
    stop_worker,
    verify_job,
    wait_done,
    wait_for,
)
from tests.test_end_to_end import SAMPLE
from worker.encode import choose_jpeg_encoder
from worker.model import load_model
from worker.shard import ShardRunner

BATCH_BYTES = 8 * 512 * 512 * 3


def enqueue(job: str, output: str, env, *extra: str, model: str = "synthetic", path: Path = SAMPLE) -> dict:
    """``producer enqueue`` (the synthetic model is benchmark-only: opted in, harmless for others),
    files layout unless ``extra`` names one."""
    return cli_json(
        "producer", "enqueue", "partiprompts", "--path", str(path), "--model", model,
        "--allow-synthetic", "--job", job, "--output", output, *layout_or_files(extra), env=env,
    )  # fmt: skip


def prompts(tmp_path: Path, count: int) -> Path:
    path = tmp_path / "prompts.tsv"
    lines = ["Prompt\tCategory\tChallenge\tNote"] + [f"prompt {i}\tTest\tBasic\t" for i in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return path


def synthetic(batch_seconds: float = 0.0):
    model = load_model("synthetic")
    model.batch_seconds = batch_seconds
    return model


def test_generation_waits_when_storage_is_slower_and_memory_stays_flat(env, output, tmp_path):
    job = enqueue("slow-storage", output, env, "--format", "jpeg", "--shard-size", "256",
                  path=prompts(tmp_path, 512))  # fmt: skip
    runner = ShardRunner(synthetic(0.0), batch_size=8, max_batches_in_flight=2)
    try:
        runner.run(ShardMessage(job["job_url"], 1, manifest_key(1)))  # loads boto3's lazy data
        tracemalloc.start()
        result = runner.run(ShardMessage(job["job_url"], 2, manifest_key(2)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        runner.close()
    # A model with no latency outruns storage: generation waited for free slots, never more
    # than two batches were in flight, and the shard (256 images, 200 MB of pixels) was
    # never held whole: a few batches at most.
    assert result.committed and result.images == 256
    assert result.stats.wait_s > 0
    assert result.stats.peak_batches_in_flight == result.stats.max_batches_in_flight == 2
    assert peak < 5 * BATCH_BYTES, f"{peak / 1e6:.0f} MB traced"


def test_a_failed_upload_stops_generation_and_nothing_is_committed(env, tmp_path):
    output = str(tmp_path / "out")
    job = enqueue("broken", output, env, "--format", "jpeg", "--shard-size", "256",
                  path=prompts(tmp_path, 256))  # fmt: skip
    # A directory where image 20 should go: that upload fails like a refused PUT.
    attempt = new_attempt_id()
    (Path(output) / "broken" / image_key(1, attempt, 20, "jpg")).mkdir(parents=True)
    runner = ShardRunner(synthetic(0.0), batch_size=8, max_batches_in_flight=2)
    try:
        with pytest.raises(OSError):
            runner.run(ShardMessage(job["job_url"], 1, manifest_key(1)), attempt_id=attempt)
    finally:
        runner.close()
    store = open_store(job["job_url"])
    assert not store.exists(metadata_key(1))
    assert not store.exists(stats_key(1))
    uploaded = [k for k, _ in store.list("images/")]
    assert 0 < len(uploaded) < 128, "generation went on after the failure"


def test_stats_object_records_the_shards_timings(env, output, tmp_path):
    job = enqueue("stats", output, env, "--format", "jpeg", "--quality", "80", "--shard-size", "64",
                  path=prompts(tmp_path, 64))  # fmt: skip
    runner = ShardRunner(synthetic(0.02), batch_size=16, max_batches_in_flight=3)
    try:
        result = runner.run(ShardMessage(job["job_url"], 1, manifest_key(1), attempt=2))
    finally:
        runner.close()  # waits for the stats upload
    stored = json.loads(open_store(job["job_url"]).get(stats_key(1)))
    stats = ShardStats.from_json(stored)
    assert stats == result.stats
    assert (stats.job, stats.shard, stats.attempt, stats.images, stats.model) == (
        "stats",
        1,
        2,
        64,
        "synthetic",
    )
    assert stats.worker == runner.worker_id
    assert stats.seconds > 0 and stats.generate_s >= 4 * 0.02
    assert stats.encode_s > 0 and stats.upload_s > 0 and stats.encode_cpu_s > 0
    assert 0 <= stats.gpu_idle_fraction <= 1
    assert stats.images_per_s == pytest.approx(64 / stats.seconds, rel=1e-3)
    assert stats.format == {"name": "jpeg", "quality": 80, "png_level": None}
    assert stats.encoder.startswith("pillow-")
    finished = dt.datetime.fromisoformat(stats.finished_at)
    assert dt.datetime.fromisoformat(stats.started_at) < finished <= dt.datetime.now(dt.UTC)
    assert dt.datetime.fromisoformat(stats.first_batch_at) < finished


def test_next_shard_is_read_ahead_and_every_message_acked_after_its_commit(env, output, tmp_path):
    job = enqueue("ahead", output, env, "--format", "jpeg", "--shard-size", "32",
                  path=prompts(tmp_path, 128))  # fmt: skip
    worker_env = {**env, "FEWSTEP_SYNTHETIC_BATCH_MS": "50"}
    run_worker_until_done(worker_env, output, "ahead", args=("--batch-size", "8"), model="synthetic",
                          log_path=tmp_path / "worker.log")  # fmt: skip
    store = open_store(job["job_url"])
    stats = {s: ShardStats.from_json(json.loads(store.get(stats_key(s)))) for s in range(1, 5)}
    assert stats[1].batches_ahead == 0  # nothing came before it
    assert all(stats[s].batches_ahead > 0 for s in (2, 3, 4)), {
        s: st.batches_ahead for s, st in stats.items()
    }
    table = committed_metadata(job["job_url"])
    assert table.column("row_id").to_pylist() == list(range(128))
    client = redis_client()
    assert queue_length(client, job["queue"]) == 0
    assert not list(pending_messages(client, job["queue"]))  # acked, none left unacked


def test_two_workers_reading_ahead_commit_every_row_once(env, output, tmp_path):
    worker_env = {**env, "FEWSTEP_SYNTHETIC_BATCH_MS": "40"}
    # Idle long enough to outlast the enqueue that follows "ready" on a loaded machine (5 s did
    # not: both workers left before the job existed).
    args = ("--exit-when-idle", "20", "--batch-size", "4")
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    workers = [start_worker(worker_env, *args, model="synthetic", log_path=log) for log in logs]
    try:
        # Both wait on the queue before the job exists.
        wait_for(lambda: all("ready." in log.read_text() for log in logs), 120, "both workers to be ready")
        job = enqueue("racing", output, env, "--format", "jpeg", "--shard-size", "16",
                      path=prompts(tmp_path, 128))  # fmt: skip
        wait_done("racing", output, env)
        assert [w.wait(timeout=60) for w in workers] == [0, 0]
    finally:
        for w in workers:
            w.kill()
    # Both peek at the same next message; whoever does not get it drops what it generated.
    table = committed_metadata(job["job_url"])
    assert table.column("row_id").to_pylist() == list(range(128))
    assert len(set(table.column("worker").to_pylist())) == 2
    store = open_store(job["job_url"])
    for row in table.to_pylist():
        assert hashlib.sha256(store.get(row["image_key"])).hexdigest() == row["sha256"]


FORMATS = {  # job → flags, Pillow's name, quality, PNG level, encoder label's start
    "as-jpeg": (("--format", "jpeg", "--quality", "75"), "JPEG", 75, None, "pillow-"),
    "as-webp": (("--format", "webp", "--quality", "80"), "WEBP", 80, None, "pillow-"),
    "as-png": (("--format", "png", "--png-level", "1"), "PNG", None, 1, "pillow-"),
    "as-fpng": (("--format", "png"), "PNG", None, None, "fpng-"),  # the default PNG encoder
    "as-jxl": (("--format", "jxl"), "JXL", None, None, "imagecodecs-"),  # lossless by default
}
LOSSLESS = ("as-png", "as-fpng", "as-jxl")


def test_formats_decode_and_record_their_settings(env, output, tmp_path):
    urls = {
        job: enqueue(job, output, env, *flags, "--shard-size", "8", "--limit", "8", model="tiny")["job_url"]
        for job, (flags, *_) in FORMATS.items()
    }
    run_worker_until_done(env, output, *FORMATS, log_path=tmp_path / "worker.log")
    pixels: dict[str, dict[int, np.ndarray]] = {}
    for job, (flags, pil_format, quality, png_level, encoder) in FORMATS.items():
        store = open_store(urls[job])
        spec = json.loads(store.get("job.json"))["generation"]
        assert (spec["format"], spec.get("quality"), spec.get("png_level")) == (flags[1], quality, png_level)
        pixels[job] = {}
        for row in committed_metadata(urls[job]).to_pylist():
            image = Image.open(io.BytesIO(store.get(row["image_key"])))
            image.load()
            assert image.format == pil_format and image.size == (128, 128)
            assert (row["format"], row["format_quality"], row["png_level"]) == (flags[1], quality, png_level)
            assert (
                row["encoder"].startswith(encoder) and row["dtype"] == "float32" and row["vae"] == "default"
            )
            pixels[job][row["row_id"]] = np.asarray(image.convert("RGB"))
    # Same spec but the format, same seeds: the lossless encoders stored the very same pixels.
    for job in LOSSLESS[1:]:
        assert pixels[job].keys() == pixels["as-png"].keys()
        for row_id, reference in pixels["as-png"].items():
            assert np.array_equal(pixels[job][row_id], reference), (job, row_id)


def test_a_jxl_job_verifies_shows_in_gallery_and_report_and_conditions_a_chained_job(env, output, tmp_path):
    flags = ("--format", "jxl", "--layout", "webdataset", "--score", "tiny", "--shard-size", "4")
    source = enqueue(
        "jxl-src", output, env, *flags, "--limit", "4", "--width", "64", "--height", "64", model="tiny"
    )
    worker = start_worker(env, "--exit-when-idle", "30", log_path=tmp_path / "worker.log")
    try:
        wait_done("jxl-src", output, env)
        chained = cli_json("producer", "enqueue", "job", "jxl-src", "--model", "tiny", "--job", "jxl-chain",
                           "--output", output, "--strength", "1.0", "--format", "jpeg", env=env)  # fmt: skip
        wait_done("jxl-chain", output, env)
    finally:
        stop_worker(worker)
    verify_job("jxl-src", output, env)
    gallery = cli_json("producer", "gallery", "jxl-src", "--output", output, "--json", env=env)
    report = cli_json("producer", "report", "jxl-src", "--output", output, "--json", env=env)
    assert gallery["images"] == 4 and report["thumbnails"] > 0
    cli_json("producer", "finalize", "jxl-src", "--output", output, "--json", env=env)
    store = open_store(source["job_url"])
    assert "imagecodecs.jpegxl_decode" in store.get("README.md").decode()  # the card says how to read them
    thumbs = [k for k, _ in store.list("gallery/thumbs/")]
    assert len(thumbs) == 4 and all(Image.open(io.BytesIO(store.get(k))).size[0] > 0 for k in thumbs)
    made = {m["source_row"]: m for m in committed_metadata(chained["job_url"]).to_pylist()}
    for row in committed_metadata(source["job_url"]).to_pylist():
        # The worker decoded the JPEG XL it was given: the digest of those very bytes is recorded.
        assert made[row["row_id"]]["cond_sha256"] == row["sha256"] and row["format"] == "jxl"
        assert made[row["row_id"]]["condition"] == "init"


def test_synthetic_model_holds_its_latency_with_the_gil_released():
    model = synthetic(0.3)
    start, cpu = time.perf_counter(), time.thread_time()
    batch = model.generate(["a", "b"], [1, 17], steps=1, guidance=0.0, width=512, height=512)
    # The wall time passes in a sleep (the GIL released, no CPU used), as on a device.
    assert time.perf_counter() - start >= 0.3 and batch.seconds >= 0.3
    assert time.thread_time() - cpu < 0.15
    assert batch.images.shape == (2, 512, 512, 3) and batch.images.dtype == np.uint8
    assert np.array_equal(batch.images[0], batch.images[1])  # seeds 1 and 17 pick the same picture
    other = model.generate(["c"], [2], steps=1, guidance=0.0, width=512, height=512)
    assert not np.array_equal(batch.images[0], other.images[0])


def test_jpeg_goes_to_the_gpu_only_on_cuda_with_torchvision():
    assert choose_jpeg_encoder("auto", "cpu") is None
    assert choose_jpeg_encoder("cpu", "cuda") is None
    with pytest.raises(UserError, match="--jpeg-encoder gpu"):
        choose_jpeg_encoder("gpu", "cpu")
