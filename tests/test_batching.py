"""Batch size per resolution and out-of-memory recovery (worker/batching.py).

The worker tests run a real worker process with the tiny model on the CPU; an out-of-memory
error is injected by the ``out-of-memory-above:N`` failpoint in ``Model.generate``, which
raises the very ``torch.OutOfMemoryError`` a CUDA device raises.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from fewstep.contract import ShardStats, manifest_key, stats_key
from fewstep.storage import open_store, read_table
from tests.support import committed_metadata, config_dir, run_worker_until_done, verify_job
from tests.test_end_to_end import SAMPLE, enqueue
from worker.batching import BatchSizes


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


def test_worker_out_of_memory_halves_the_batch_and_commits_every_row_once_with_its_seed(
    env, output, tmp_path
):
    job = enqueue(SAMPLE, "oom", output, env, "--shard-size", "4", "--limit", "8", "--width", "64",
                  "--height", "64")  # fmt: skip
    log_path = tmp_path / "worker.log"
    worker_env = {**env, "FEWSTEP_FAILPOINT": "out-of-memory-above:2"}
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
    assert "out of memory at batch size 8 for 64x64: retrying these rows at 4" in log
    assert "out of memory at batch size 4 for 64x64: retrying these rows at 2" in log


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
