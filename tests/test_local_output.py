"""A local directory as --output: the embedded default, same layout as S3."""

from __future__ import annotations

from tests.support import cli_json, committed_metadata, start_worker, wait_done
from tests.test_end_to_end import SAMPLE


def test_local_directory_output_runs_end_to_end(env, tmp_path):
    output = str(tmp_path / "datasets")
    summary = cli_json(
        "producer", "enqueue", "partiprompts", "--path", str(SAMPLE), "--model", "tiny",
        "--job", "local", "--output", output, "--shard-size", "16", "--format", "jpeg",
        "--layout", "files", env=env,
    )  # fmt: skip
    assert summary["job_url"] == (tmp_path / "datasets" / "local").as_uri()
    worker = start_worker(env, "--exit-when-idle", "2")
    try:
        status = wait_done("local", output, env)
        assert worker.wait(timeout=60) == 0
    finally:
        worker.kill()
    assert status["images_done"] == 32
    table = committed_metadata(summary["job_url"])
    assert table.num_rows == 32 and set(table.column("format").to_pylist()) == {"jpeg"}
    for key in table.column("image_key").to_pylist():
        assert (tmp_path / "datasets" / "local" / key).is_file()
        assert key.endswith(".jpg")
    names = {p.name for p in (tmp_path / "datasets" / "local").iterdir()}
    assert {"images", "job.json", "manifests", "metadata"} <= names <= {
        "attempts", "images", "job.json", "manifests", "metadata", "stats", "workers",
    }  # fmt: skip
