"""`producer finalize`: committed shards → metadata.parquet, card, DiffusionDB JSON, WebDataset tars,
loadable in one line with Hugging Face datasets and pyarrow.dataset."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fewstep.contract import metadata_schema
from fewstep.presets import presets
from fewstep.storage import LocalStore, open_store
from producer.finalize import MetadataFiles
from tests.support import cli, cli_json, committed_metadata, run_job, run_worker_until_idle
from tests.test_cli_errors import assert_one_line_error
from tests.test_end_to_end import SAMPLE, enqueue

PARTI_FIELDS = {"category": "string", "challenge": "string", "note": "string"}


def load_with_datasets(files: list[str], cache):
    """Hugging Face datasets' one-liner (offline: local files and its packaged parquet builder)."""
    import datasets

    return datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(cache))


def test_incomplete_job_is_refused_partial_says_what_is_missing_and_the_finished_job_loads(
    env, output, tmp_path
):
    job = run_job(env, output, "final", SAMPLE, tmp_path, "--shard-size", "8")
    store = open_store(job["job_url"])
    # Part 3 lost its commit (as if its message vanished with a flushed Redis); part 4 was given up on.
    store.delete("metadata/part-000003.parquet")
    store.delete("metadata/part-000004.parquet")
    store.put("failed/part-000004.json", json.dumps({"shard": 4, "error": "boom"}).encode())

    refused = cli("producer", "finalize", "final", "--output", output, env=env, check=False)
    assert_one_line_error(
        refused, "job final is incomplete: 2 of 4 shards", "1 failed (part-000004)",
        "1 not yet committed (part-000003)", "--partial",
    )  # fmt: skip

    partial = cli_json("producer", "finalize", "final", "--output", output, "--partial", env=env)
    assert (partial["rows"], partial["shards"], partial["missing_shards"], partial["partial"]) == (
        16,
        2,
        [3, 4],
        True,
    )
    assert partial["missing"] == "1 failed (part-000004), 1 not yet committed (part-000003)"
    assert "## Missing (finalized with --partial)" in store.get("README.md").decode()
    rows = pq.read_table(io.BytesIO(store.get("metadata.parquet")))
    assert rows.column("row_id").to_pylist() == list(range(16))
    jobs = cli_json("producer", "jobs", "--output", output, env=env)["jobs"]
    assert [(j["job"], j["finalized_partial"]) for j in jobs] == [("final", True)]

    # `producer retry` clears failed markers; enqueue resumes what is neither committed nor queued.
    store.delete("failed/part-000004.json")
    assert enqueue(SAMPLE, "final", output, env, "--shard-size", "8")["enqueued"] == 2
    run_worker_until_idle(env, tmp_path / "worker-2.log")
    done = cli_json(
        "producer", "finalize", "final", "--output", output, "--json-parts", "--webdataset", env=env
    )
    assert (done["rows"], done["partial"], done["missing_shards"], done["files"]) == (
        32,
        False,
        [],
        ["metadata.parquet"],
    )
    card = store.get("README.md").decode()
    assert "Missing" not in card
    for fact in (
        "32 of 32 prompts",
        "`tiny` (preset)",
        f"revision `{presets()['tiny']['revision']}`",
        "random weights, no licence restrictions",
        "prompt set `partiprompts`: Apache-2.0",
        'data_files: "metadata.parquet"',
        "steps 1, guidance 0.0",
    ):
        assert fact in card, fact  # fmt: skip

    # The consolidated file is the committed shards, row for row, in the job's one schema.
    expected = committed_metadata(job["job_url"])
    table = pq.read_table(io.BytesIO(store.get("metadata.parquet")))
    assert table.schema.remove_metadata() == metadata_schema(PARTI_FIELDS)
    assert table.equals(expected.cast(table.schema))
    assert json.loads(table.schema.metadata[b"fewstep.job"])["job"] == "final"

    # pyarrow.dataset straight from S3, in one line.
    s3 = pafs.S3FileSystem(
        access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
        endpoint_override=env["AWS_ENDPOINT_URL_S3"], region=env["AWS_DEFAULT_REGION"],
    )  # fmt: skip
    path = job["job_url"].removeprefix("s3://") + "/metadata.parquet"
    assert ds.dataset(path, filesystem=s3).to_table().equals(table)

    # Hugging Face datasets from a local copy, offline, in one line.
    local = tmp_path / "final"
    local.mkdir()
    (local / "metadata.parquet").write_bytes(store.get("metadata.parquet"))
    hf = load_with_datasets([str(local / "metadata.parquet")], tmp_path / "hf-cache")
    assert hf.num_rows == 32 and hf.column_names == table.schema.names
    assert hf["prompt"] == table.column("prompt").to_pylist()
    assert hf[5]["category"] == table.column("category")[5].as_py()

    # DiffusionDB's per-part JSON, next to the part's images.
    part = json.loads(store.get("images/part-000002/part-000002.json"))
    row = table.filter(pa.compute.equal(table["row_id"], 9)).to_pylist()[0]
    assert part[row["image_name"]] == {
        "p": row["prompt"], "se": row["seed"], "c": row["cfg"], "st": row["step"], "sa": row["sampler"],
    }  # fmt: skip
    assert len(part) == 8

    check_webdataset(store, table, done["webdataset"], tmp_path)
    # Finalized again without --webdataset: the earlier tars go, as finalized.json says.
    again = cli_json("producer", "finalize", "final", "--output", output, env=env)
    assert again["webdataset"] == [] and list(store.list("webdataset/")) == []


def check_webdataset(store, table: pa.Table, tars: list[str], tmp_path) -> None:
    """The tars read back with the webdataset package: one sample per row, image + json + txt."""
    import webdataset as wds

    assert tars == [f"webdataset/part-{s:06d}.tar" for s in range(1, 5)]
    paths = []
    for key in tars:
        path = tmp_path / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(store.get(key))
        paths.append(str(path))
    samples = list(wds.WebDataset(paths, shardshuffle=False, empty_check=False).decode("pil"))
    rows = table.to_pylist()
    assert [s["__key__"] for s in samples] == [f"{r['row_id']:012d}" for r in rows]
    for sample, row in zip(samples, rows, strict=True):
        assert sample["txt"] == row["prompt"]
        assert sample["json"]["sha256"] == row["sha256"] and sample["json"]["category"] == row["category"]
        assert sample["png"].size == (row["width"], row["height"])
    # The same part always gives the same tar bytes.
    assert store.get(tars[0]) == Path(paths[0]).read_bytes()


def test_large_metadata_is_split_into_row_groups_and_files_that_load_together(tmp_path):
    schema = pa.schema([("row_id", pa.int64()), ("prompt", pa.string())])
    store = LocalStore(tmp_path / "job")
    files = MetadataFiles(store, schema, total_rows=50, row_group_rows=7, file_rows=20)
    for lo in range(0, 50, 6):  # parts of 6 rows do not line up with groups or files
        ids = list(range(lo, min(lo + 6, 50)))
        files.add(pa.table({"row_id": ids, "prompt": [f"p{i}" for i in ids]}, schema=schema))
    keys = files.close()
    assert keys == [f"metadata-0000{i}-of-00003.parquet" for i in (1, 2, 3)]
    sizes = [pq.ParquetFile(tmp_path / "job" / k).metadata for k in keys]
    assert [m.num_rows for m in sizes] == [20, 20, 10]
    assert all(m.row_group(g).num_rows <= 7 for m in sizes for g in range(m.num_row_groups))
    hf = load_with_datasets([str(tmp_path / "job" / "metadata-*.parquet")], tmp_path / "hf-cache")
    assert hf["row_id"] == list(range(50))


def test_finalize_of_a_job_with_nothing_committed_is_a_clear_error(env, output):
    enqueue(SAMPLE, "nothing-yet", output, env, "--shard-size", "16")
    result = cli("producer", "finalize", "nothing-yet", "--output", output, "--partial", env=env, check=False)
    assert_one_line_error(result, "job nothing-yet has no committed shard yet")
