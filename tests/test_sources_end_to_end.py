"""DiffusionDB and JourneyDB jobs through a real worker process: source fields reach the metadata."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa

from tests.prompt_files import DIFFUSIONDB_ROWS, JOURNEYDB_RECORDS, write_diffusiondb, write_journeydb
from tests.support import cli_json, committed_metadata, start_worker, wait_done


def test_diffusiondb_and_journeydb_jobs_run_end_to_end(env, output, tmp_path):
    ddb_path = write_diffusiondb(tmp_path / "metadata.parquet")
    jdb_path = write_journeydb(tmp_path / "train_anno.jsonl.tgz")
    common = ["--model", "tiny", "--output", output, "--shard-size", "2", "--layout", "files"]
    ddb = cli_json("producer", "enqueue", "diffusiondb", "--path", str(ddb_path), "--job", "ddb", *common,
                   "--carry", "step", "--carry", "sampler", "--carry", "timestamp", "--carry", "image_name",
                   env=env)  # fmt: skip
    jdb = cli_json("producer", "enqueue", "journeydb", "--path", str(jdb_path), "--field", "caption",
                   "--job", "jdb", *common, env=env)  # fmt: skip
    worker = start_worker(env, "--exit-when-idle", "2", "--batch-size", "4", log_path=tmp_path / "worker.log")
    try:
        wait_done("ddb", output, env, timeout=300)
        wait_done("jdb", output, env, timeout=300)
        assert worker.wait(timeout=60) == 0
    finally:
        worker.kill()

    table = committed_metadata(ddb["job_url"])
    kept = [r for r in DIFFUSIONDB_ROWS if r[1].strip()]
    assert table.column("prompt").to_pylist() == [r[1] for r in kept]
    assert table.column("seed").to_pylist() == [r[3] for r in kept]  # pairs with the original images
    assert set(table.column("step").to_pylist()) == {1}  # the tiny preset's steps ...
    assert table.column("source_step").to_pylist() == [r[4] for r in kept]  # ... the source's recorded
    assert table.column("source_sampler").to_pylist() == ["k_lms", "ddim", "others", "k_euler_ancestral"]
    assert table.schema.field("source_timestamp").type == pa.timestamp("us", tz="UTC")
    assert table.column("source_timestamp").to_pylist()[:2] == [
        dt.datetime(2022, 8, 7, 12, tzinfo=dt.UTC),
        None,
    ]
    assert table.column("source").to_pylist() == ["diffusiondb"] * 4
    # Keys come from ids only, whatever the source's image_name says.
    assert table.column("source_image_name").to_pylist()[2] == "../../etc/passwd"
    attempt = table.column("attempt_id").to_pylist()[2]
    assert table.column("image_key").to_pylist()[2] == f"images/part-000002/{attempt}/000000000002.png"

    table = committed_metadata(jdb["job_url"])
    assert table.column("prompt").to_pylist() == [r["Task2"]["Caption"] for r in JOURNEYDB_RECORDS]
    assert table.column("source_prompt").to_pylist() == [r["prompt"] for r in JOURNEYDB_RECORDS]
    assert table.schema.field("Task1.Content").type == pa.list_(pa.string())
    assert table.column("Task1.Content").to_pylist() == [r["Task1"]["Content"] for r in JOURNEYDB_RECORDS]
    assert table.column("img_path").to_pylist() == [r["img_path"] for r in JOURNEYDB_RECORDS]
