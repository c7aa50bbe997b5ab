"""Batch size per resolution and recovery from batches too large for the device
(worker/batching.py): out of memory, and CUDA kernels' 32-bit index limits.

The worker tests run a real worker process with the tiny model on the CPU; an out-of-memory
error is injected by the ``out-of-memory-above:N`` failpoint in ``Model.generate``, which
raises the very ``torch.OutOfMemoryError`` a CUDA device raises, and an index-limit error by
``index-limit-above:N`` (the ``RuntimeError`` PyTorch's CUDA upsampling raises past INT_MAX
elements).
"""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch

from fewstep.contract import ShardStats, manifest_key, stats_key
from fewstep.storage import open_store, read_table
from tests.conftest import REPO
from tests.support import committed_metadata, config_dir, run_worker_until_done, verify_job
from tests.test_end_to_end import SAMPLE, enqueue
from worker import speed
from worker.batching import INDEX_LIMIT_MESSAGE, BatchSizes, is_batch_too_large
from worker.model import load_model


def out_of_memory_above(limit: int, calls: list[int]):
    """A batch run that records its sizes and runs out of memory above ``limit`` images."""

    def run(size: int) -> str:
        calls.append(size)
        if size > limit:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return f"batch of {size}"

    return run


def test_out_of_memory_halves_the_batch_and_the_size_is_kept_for_that_resolution():
    sizes, calls = BatchSizes(fixed=6), []
    assert sizes.fit(512, 512, out_of_memory_above(2, calls)) == ("batch of 1", 1, (6, 3))
    assert calls == [6, 3, 1]
    assert sizes.size(512, 512) == 1  # later batches and shards start where it fitted
    assert sizes.size(1024, 512) == 6  # other resolutions keep theirs


def test_out_of_memory_at_batch_size_one_and_other_errors_are_raised():
    sizes, calls = BatchSizes(fixed=2), []
    with pytest.raises(torch.OutOfMemoryError):
        sizes.fit(512, 512, out_of_memory_above(0, calls))
    assert calls == [2, 1]

    def broken(size: int):
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError):
        BatchSizes(fixed=4).fit(512, 512, broken)


def test_a_kernel_index_limit_error_halves_the_batch_like_running_out_of_memory():
    sizes, calls = BatchSizes(fixed=64), []

    def run(size: int) -> str:
        calls.append(size)
        if size > 16:  # the SD VAE's decoder at 512x512: past 2**31 elements from a batch of 32
            raise RuntimeError(INDEX_LIMIT_MESSAGE.format(f"[{size}, 256, 512, 512]"))
        return f"batch of {size}"

    assert sizes.fit(512, 512, run) == ("batch of 16", 16, (64, 32))
    assert calls == [64, 32, 16] and sizes.size(512, 512) == 16


@pytest.mark.parametrize(
    "message",
    [
        "CUDA error: an illegal memory access was encountered",  # sticky: no retry can succeed
        "Input type (c10::Half) and bias type (float) should be the same",
        "mat1 and mat2 shapes cannot be multiplied (4x8 and 16x4)",
    ],
)
def test_runtime_errors_that_a_smaller_batch_cannot_fix_are_raised_at_once(message):
    calls = []

    def run(size: int):
        calls.append(size)
        raise RuntimeError(message)

    assert not is_batch_too_large(RuntimeError(message))
    with pytest.raises(RuntimeError, match=re.escape(message)):
        BatchSizes(fixed=8).fit(512, 512, run)
    assert calls == [8]


def test_auto_batch_size_stops_doubling_at_a_kernel_index_limit_error(monkeypatch):
    model = load_model("tiny", "cpu")
    monkeypatch.setenv("FEWSTEP_FAILPOINT", "index-limit-above:2")
    assert speed.auto_batch_size(model, limit=8, width=64, height=64) <= 2


def _device_models():
    spec = importlib.util.spec_from_file_location(
        "bench_device_models", REPO / "bench" / "device" / "models.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sdxl_vae_is_float16_again_after_running_out_of_memory_in_its_float32_decode(tmp_path, monkeypatch):
    """diffusers upcasts SDXL's float16 VAE to float32 to decode; an out-of-memory error there must
    not leave it float32, or every later call (the halved retry too) fails on float16 latents."""
    models = _device_models()
    directory = models.build("sdxl-turbo", tmp_path / "sdxl", smoke=True, device="cpu", dtype="float32")
    settings = models.config_dir(tmp_path / "cfg", models.spec("sdxl-turbo"), True, {})
    monkeypatch.setenv("FEWSTEP_CONFIG_DIR", str(settings))
    model = load_model(str(directory), "cpu")
    model.pipeline.to(dtype=torch.float16)  # as on a GPU (the CPU default is float32)
    vae = model.pipeline.vae
    assert vae.config.force_upcast
    decode = vae.decode

    def out_of_memory_in_the_float32_decode(*args, **kwargs):
        if vae.dtype == torch.float32:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated in the upcast decode)")
        return decode(*args, **kwargs)

    def generate():
        return model.generate(["a lighthouse"], [1], steps=1, guidance=0.0, width=64, height=64)

    monkeypatch.setattr(vae, "decode", out_of_memory_in_the_float32_decode)
    with pytest.raises(torch.OutOfMemoryError):
        generate()
    assert vae.dtype == torch.float16
    monkeypatch.setattr(vae, "decode", decode)
    assert generate().images.shape == (1, 64, 64, 3)  # the next call runs


def test_auto_measures_once_per_resolution_and_a_fixed_size_never():
    measured = []

    def measure(width: int, height: int) -> int:
        measured.append((width, height))
        return 16 if width < 1024 else 4

    sizes = BatchSizes(measure=measure)
    assert not sizes.known(512, 512)
    assert [sizes.size(512, 512), sizes.size(1024, 1024), sizes.size(512, 512)] == [16, 4, 16]
    assert measured == [(512, 512), (1024, 1024)] and sizes.known(512, 512)
    fixed = BatchSizes(fixed=3)
    assert fixed.known(2048, 2048) and fixed.size(2048, 2048) == 3


def shard_stats(job_url: str, shards: int) -> list[ShardStats]:
    """The stats objects of shards 1..``shards``, in the order the worker started them."""
    store = open_store(job_url)
    stats = [ShardStats.from_json(json.loads(store.get(stats_key(s)))) for s in range(1, shards + 1)]
    return sorted(stats, key=lambda s: s.started_at)


@pytest.mark.parametrize(
    ("failpoint", "reason"),
    [("out-of-memory-above", "out of memory"), ("index-limit-above", "too large for a kernel")],
)
def test_worker_too_large_batch_is_halved_and_every_row_committed_once_with_its_seed(
    env, output, tmp_path, failpoint, reason
):
    job = enqueue(SAMPLE, "oom", output, env, "--shard-size", "4", "--limit", "8", "--width", "64",
                  "--height", "64")  # fmt: skip
    log_path = tmp_path / "worker.log"
    worker_env = {**env, "FEWSTEP_FAILPOINT": f"{failpoint}:2"}
    run_worker_until_done(worker_env, output, "oom", args=("--batch-size", "8"), log_path=log_path)

    table = committed_metadata(job["job_url"])
    assert table.column("row_id").to_pylist() == list(range(8))  # every row, exactly once
    store = open_store(job["job_url"])
    manifests = [read_table(store, manifest_key(s)).to_pydict() for s in (1, 2)]
    assert table.column("seed").to_pylist() == [seed for m in manifests for seed in m["seed"]]
    assert table.column("source_row").to_pylist() == [r for m in manifests for r in m["source_row"]]
    verify_job("oom", output, env)  # every image's sha256 matches its metadata

    first, second = shard_stats(job["job_url"], 2)
    # 8 ran out of memory, then 4; 2 fitted and was kept for 64x64, so the next shard
    # started there.
    assert (first.batch_size, first.min_batch_size, first.oom_retries) == (8, 2, 2)
    assert (second.batch_size, second.min_batch_size, second.oom_retries) == (2, 2, 0)
    log = log_path.read_text()
    assert f"{reason} at batch size 8 for 64x64: retrying these rows at 4" in log
    assert f"{reason} at batch size 4 for 64x64: retrying these rows at 2" in log


def test_auto_batch_size_is_measured_once_per_resolution_a_job_asks_for(env, output, tmp_path):
    env = {**env, "FEWSTEP_CONFIG_DIR": config_dir(tmp_path, worker={"auto_batch_max": 2})}
    small = enqueue(SAMPLE, "small", output, env, "--shard-size", "2", "--limit", "4", "--width", "64",
                    "--height", "64")  # fmt: skip
    large = enqueue(SAMPLE, "large", output, env, "--shard-size", "2", "--limit", "4", "--width", "96",
                    "--height", "96")  # fmt: skip
    log_path = tmp_path / "worker.log"
    run_worker_until_done(env, output, "small", "large", args=("--batch-size", "auto"), log_path=log_path)

    chosen = re.findall(r"batch size (\d+) chosen by measurement at (\d+x\d+)", log_path.read_text())
    assert sorted(resolution for _, resolution in chosen) == ["64x64", "96x96"]  # once each, none else
    size = {resolution: int(n) for n, resolution in chosen}
    for job, resolution in ((small, "64x64"), (large, "96x96")):
        stats = shard_stats(job["job_url"], 2)
        assert [s.batch_size for s in stats] == [size[resolution]] * 2, resolution
        assert all(s.oom_retries == 0 and s.min_batch_size == s.batch_size for s in stats)
        table = committed_metadata(job["job_url"])
        assert table.column("row_id").to_pylist() == list(range(4))
        assert set(table.column("width").to_pylist()) == {int(resolution.split("x")[0])}
