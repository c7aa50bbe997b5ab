"""`--layout webdataset|parquet`: one tar or one parquet per shard attempt, written by a real
worker to real SeaweedFS, read back with the real `webdataset` library, `tarfile` and HF
`datasets`, checked by `producer verify`, finalized, shown by `producer gallery`, and a
worker killed halfway through a shard's tar leaves nothing readable behind."""

from __future__ import annotations

import io
import json
import os
import tarfile
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from fewstep.storage import open_store, s3_client
from tests.conftest import BUCKET
from tests.support import (
    attempt_records,
    cli,
    cli_json,
    committed_metadata,
    config_dir,
    run_worker_until_done,
    start_worker,
    verify_job,
)

LAYOUTS = ("webdataset", "parquet")
ROWS = 8  # two shards of 4, 64x64 images: the tiny model on a shared CPU


def _env(local_services, model_cache) -> dict[str, str]:
    return {
        **os.environ,
        **local_services.env(),
        "HF_HUB_OFFLINE": "1",
        "FEWSTEP_MODEL_CACHE": str(model_cache),
        "FEWSTEP_QUEUE_PREFIX": "t" + uuid.uuid4().hex[:10],
        "PYTHONUNBUFFERED": "1",
    }


def _enqueue(env, parti: Path, job: str, output: str, layout: str, *extra: str) -> dict:
    return cli_json(
        "producer", "enqueue", "partiprompts", "--path", str(parti), "--model", "tiny", "--job", job,
        "--output", output, "--layout", layout, "--format", "jpeg", "--shard-size", "4",
        "--width", "64", "--height", "64",
        "--limit", str(ROWS), *extra, env=env,
    )  # fmt: skip


@pytest.fixture(scope="module")
def jobs(local_services, model_cache, parti_path, tmp_path_factory):
    """A webdataset job and a parquet job of 2 shards of real PartiPrompts each, run by one worker."""
    env = _env(local_services, model_cache)
    output = f"s3://{BUCKET}/runs/{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as patch:  # this process reads storage with the same settings
        for key, value in env.items():
            patch.setenv(key, value)
        made = {layout: _enqueue(env, parti_path, layout, output, layout) for layout in LAYOUTS}
        log = tmp_path_factory.mktemp("layouts") / "worker.log"
        run_worker_until_done(env, output, *made, log_path=log)
        # The reference: the file's first rows split on newlines and tabs only (no quoting rules).
        lines = parti_path.read_bytes().decode().split("\n")[1 : ROWS + 1]
        yield env, output, made, [line.split("\t")[0] for line in lines]


def test_webdataset_job_writes_one_tar_per_shard_readable_by_webdataset_and_tarfile_prompts_byte_exact(
    jobs,
):
    import webdataset as wds

    env, output, made, prompts = jobs
    url = made["webdataset"]["job_url"]
    store = open_store(url)
    meta = committed_metadata(url)
    assert meta.column("prompt").to_pylist() == prompts
    tars = sorted(set(meta.column("image_key").to_pylist()))
    assert [t.rsplit("/", 2)[1] for t in tars] == ["part-000001", "part-000002"] and all(
        t.endswith(".tar") for t in tars
    )
    status = cli_json("producer", "status", "webdataset", "--output", output, env=env)
    assert (status["layout"], status["state"], status["images_done"]) == ("webdataset", "done", ROWS)
    seen_txt, seen_json = [], []
    for key in tars:
        data = store.get(key)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            names = tar.getnames()
        rows = meta.filter(pc.equal(meta["image_key"], key))
        stems = [f"{r:012d}" for r in rows.column("row_id").to_pylist()]
        assert names == [f"{s}.{ext}" for s in stems for ext in ("jpg", "json", "txt")]
        # One ranged GET of the recorded span is the image, with the recorded sha256.
        for offset, size, name in zip(rows["image_offset"].to_pylist(), rows["bytes"].to_pylist(),
                                      rows["image_name"].to_pylist(), strict=True):  # fmt: skip
            assert store.get_range(key, offset, size) == data[offset : offset + size]
            assert name.endswith(".jpg")
        local = Path(f"/tmp/{uuid.uuid4().hex}.tar")
        local.write_bytes(data)
        try:
            for sample in wds.WebDataset(str(local), shardshuffle=False):
                assert sample["jpg"][:2] == b"\xff\xd8"
                seen_txt.append(sample["txt"].decode("utf-8"))
                seen_json.append(json.loads(sample["json"])["prompt"])
        finally:
            local.unlink()
    assert seen_txt == prompts and seen_json == prompts


def test_parquet_job_loads_with_hf_datasets_as_pil_images_with_byte_exact_prompts(jobs, tmp_path):
    import datasets
    from PIL import Image

    _env, _output, made, prompts = jobs
    url = made["parquet"]["job_url"]
    store = open_store(url)
    meta = committed_metadata(url)
    files = []
    for key in sorted(set(meta.column("image_key").to_pylist())):
        assert key.endswith(".parquet")
        files.append(tmp_path / key.replace("/", "_"))
        files[-1].write_bytes(store.get(key))
    loaded = datasets.load_dataset(
        "parquet", data_files=[str(f) for f in files], split="train", cache_dir=str(tmp_path / "cache")
    )
    assert isinstance(loaded.features["image"], datasets.Image)
    assert loaded["prompt"] == prompts == meta.column("prompt").to_pylist()
    first = loaded[0]
    assert isinstance(first["image"], Image.Image)
    assert first["image"].size == (first["width"], first["height"]) == (64, 64)
    assert loaded["sha256"] == meta.column("sha256").to_pylist()


def test_verify_passes_then_detects_a_corrupted_tar_member_and_parquet_image(jobs):
    env, output, made, _prompts = jobs
    for layout in LAYOUTS:
        verify_job(layout, output, env)
        store = open_store(made[layout]["job_url"])
        row = committed_metadata(made[layout]["job_url"]).to_pylist()[5]  # part 2, its second image
        key, original = row["image_key"], store.get(row["image_key"])
        if layout == "webdataset":
            at = row["image_offset"] + row["bytes"] // 2  # one byte inside one image member
            store.put(key, original[:at] + bytes([original[at] ^ 0xFF]) + original[at + 1 :])
        else:
            table = pq.read_table(io.BytesIO(original))
            images = table.column("image").to_pylist()
            images[row["image_row"]]["bytes"] = images[row["image_row"]]["bytes"][:-1] + b"\0"
            damaged = table.set_column(0, "image", pa.array(images, table.schema.field("image").type))
            out = io.BytesIO()
            pq.write_table(damaged, out)
            store.put(key, out.getvalue())
        try:
            result = cli("producer", "verify", layout, "--output", output, "--json", env=env, check=False)
            summary = json.loads(result.stdout)
            assert result.returncode == 1 and summary["mismatches"] == 1, summary
            assert "sha256 differs" in summary["problems"][0] and row["image_name"] in summary["problems"][0]
        finally:
            store.put(key, original)
        verify_job(layout, output, env)


def test_finalize_gallery_and_gc_work_on_webdataset_and_parquet_jobs(jobs):
    env, output, made, prompts = jobs
    for layout in LAYOUTS:
        url = made[layout]["job_url"]
        store = open_store(url)
        meta = committed_metadata(url)
        objects = sorted(set(meta.column("image_key").to_pylist()))
        summary = cli_json("producer", "finalize", layout, "--output", output, "--webdataset", env=env)
        assert summary["rows"] == ROWS and summary["layout"] == layout and summary["image_files"] == objects
        card = store.get("README.md").decode()
        assert f"layout: **{layout}**" in card and objects[0] in card
        if layout == "parquet":  # a files-style tar made from the parquet on request
            assert summary["webdataset"] == ["webdataset/part-000001.tar", "webdataset/part-000002.tar"]
            with tarfile.open(fileobj=io.BytesIO(store.get("webdataset/part-000001.tar"))) as tar:
                assert tar.extractfile("000000000000.txt").read().decode() == prompts[0]
        else:  # the worker's tars are the dataset's: nothing rewritten
            assert summary["webdataset"] == objects
        gallery = cli_json("producer", "gallery", layout, "--output", output, "--n", "4", env=env)
        thumbs = [k for k, _ in store.list("gallery/thumbs/")]
        assert gallery["images"] == 4 and len(thumbs) == 4
        # A losing attempt's object is garbage; the committed ones stay.
        folder, ext = objects[0].rsplit("/", 1)[0], objects[0].rsplit(".", 1)[1]
        loser = f"{folder}/20200101T000000.000000Z-loser.{ext}"
        store.put(loser, store.get(objects[0]))
        garbage = cli_json("producer", "gc", layout, "--output", output, "--delete", env=env)
        assert [(f["shard"], f["attempt"], f["objects"]) for f in garbage["folders"]] == [
            (1, "20200101T000000.000000Z-loser", 1)
        ]
        assert garbage["kept_committed_objects"] == 2 and not store.exists(loser)
        verify_job(layout, output, env)


def test_a_worker_killed_mid_tar_leaves_no_committed_shard_and_no_readable_tar(env, parti_path, tmp_path):
    output = f"s3://{BUCKET}/runs/{uuid.uuid4().hex[:8]}"
    url = _enqueue(env, parti_path, "killed", output, "webdataset")["job_url"]
    store = open_store(url)
    # Parts of 16 KiB, so the tar is under way in storage (parts sent, multipart upload not
    # completed) when the worker dies halfway through part 1's rows.
    crashing = {
        **env,
        "FEWSTEP_CONFIG_DIR": config_dir(tmp_path, output={"part_bytes": 16384}),
        "FEWSTEP_FAILPOINT": "mid-upload:part-000001",
    }
    worker = start_worker(crashing, log_path=tmp_path / "a.log")
    try:
        assert worker.wait(timeout=120) != 0
    finally:
        worker.kill()
    assert "failpoint mid-upload reached for part-000001" in (tmp_path / "a.log").read_text()
    assert [k for k, _ in store.list("metadata/")] == []  # nothing committed
    assert [k for k, _ in store.list("images/")] == []  # no tar, partial or not
    uploads = s3_client().list_multipart_uploads(Bucket=store.bucket, Prefix=f"{store.prefix}/images/")
    assert len(uploads.get("Uploads", [])) == 1  # its parts were sent
    summary = cli_json(
        "producer", "reconcile", "killed", "--output", output, "--abandoned-after", "0", env=env
    )
    assert summary["aborted_uploads"] == 1
    run_worker_until_done(env, output, "killed", log_path=tmp_path / "b.log")
    verify_job("killed", output, env)
    assert [r["state"] for r in attempt_records(url, 1)] == ["running", "committed"]
