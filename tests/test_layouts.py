"""`--layout webdataset|parquet`: one tar or one parquet per shard attempt, written by a real
worker to real SeaweedFS, read back with the real `webdataset` library, `tarfile` and HF
`datasets`, checked by `producer verify`, finalized, shown by `producer gallery`, collected
by `producer gc`; and a worker killed halfway through a shard's tar leaves nothing readable.

Lean on purpose (CI budget): one module fixture crashes one worker mid-tar and then runs one
worker for that job and a webdataset and a parquet job of 2 shards each, from a PartiPrompts
file written here (prompts with quotes, non-ASCII and emoji, so "byte exact" means something;
no dependence on the developers' ../shared/data); the job-level commands run in this process.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
import tomllib
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from fewstep.storage import open_store, s3_client
from producer.finalize import finalize
from producer.gallery import make_gallery
from producer.gc import collect
from producer.reconcile import reconcile
from producer.verify import verify
from tests.conftest import BUCKET
from tests.s3_gateway import S3Gateway
from tests.support import (
    attempt_records,
    cli,
    cli_json,
    committed_metadata,
    config_dir,
    module_env,
    run_worker_until_done,
    start_worker,
    wait_for,
)
from worker.writer import PartSender

LAYOUTS = ("webdataset", "parquet")
# A killed worker's shard is restored seconds after the kill, not half a minute.
FAST_RECOVERY = {"liveness_seconds": 1, "liveness_ttl": 3, "restore_after": 4, "scan_seconds": 1}
ROWS = 8  # two shards of 4, 64x64 images: the tiny model on a shared CPU
#: The prompts of the generated PartiPrompts file, in its row order.
PROMPTS = [
    "a red bicycle leaning against a brick wall",
    'a sign that says "Café ouvert", with a croissant',
    "ein Fuchs im Schnee, Aquarell",
    "東京の夜景、雨上がり",
    "a cat wearing sunglasses 😎 on a beach",
    "a lighthouse on a rocky coast at dusk, 50% fog",
    "Ünïcödé typography on an old poster",
    "a bowl of ramen — steam rising, top view",
]


def write_parti_file(path) -> str:
    """A PartiPrompts-format TSV (Prompt, Category, Challenge, Note) of ``PROMPTS``."""
    lines = ["Prompt\tCategory\tChallenge\tNote", *(f"{p}\tArts\tBasic\t" for p in PROMPTS)]
    path.write_bytes(("\n".join(lines) + "\n").encode())
    return str(path)


def _enqueue(env, parti, job: str, output: str, layout: str) -> dict:
    return cli_json(
        "producer", "enqueue", "partiprompts", "--path", str(parti), "--model", "tiny", "--job", job,
        "--output", output, "--layout", layout, "--format", "jpeg", "--shard-size", "4",
        "--width", "64", "--height", "64", "--limit", str(ROWS), env=env,
    )  # fmt: skip


def _crash_mid_tar(env: dict[str, str], output: str, job: str, parti, tmp_path) -> dict:
    """Enqueue ``job`` (webdataset) and run a worker that kills itself halfway through part 1's
    tar, with parts of 4 KiB so the tar is under way in storage; what storage holds then."""
    url = _enqueue(env, parti, job, output, "webdataset")["job_url"]
    store = open_store(url)
    (tmp_path / "crash").mkdir()
    small_parts = config_dir(tmp_path / "crash", output={"part_bytes": 4096}, recovery=FAST_RECOVERY)
    crashing = {**env, "FEWSTEP_CONFIG_DIR": small_parts, "FEWSTEP_FAILPOINT": "mid-upload:part-000001"}
    worker = start_worker(crashing, log_path=tmp_path / "crash.log")
    try:
        exit_code = worker.wait(timeout=120)
    finally:
        worker.kill()
    uploads = s3_client().list_multipart_uploads(Bucket=store.bucket, Prefix=f"{store.prefix}/images/")
    seen = {
        "exit_code": exit_code,
        "log": (tmp_path / "crash.log").read_text(),
        "metadata": [k for k, _ in store.list("metadata/")],
        "images": [k for k, _ in store.list("images/")],
        "uploads": len(uploads.get("Uploads", [])),
        "reconcile": reconcile(store, abandoned_after=0),
    }
    # The dead worker's message goes back on the queue once its liveness key has expired.
    wait_for(
        lambda: reconcile(store, abandoned_after=0)["restored_from_dead_workers"], 30, "the shard restored", 1
    )
    return seen


@pytest.fixture(scope="module")
def jobs(local_services, model_cache, tmp_path_factory):
    """(env, output, {layout: enqueue summary}, the source's prompts, what the crash left)."""
    env = module_env(local_services, model_cache)
    output = f"s3://{BUCKET}/runs/{uuid.uuid4().hex[:8]}"
    tmp_path = tmp_path_factory.mktemp("layouts")
    env["FEWSTEP_CONFIG_DIR"] = config_dir(tmp_path, recovery=FAST_RECOVERY)
    parti_path = write_parti_file(tmp_path / "parti.tsv")
    with pytest.MonkeyPatch.context() as patch:  # this process reads storage with the same settings
        for key, value in env.items():
            patch.setenv(key, value)
        crash = _crash_mid_tar(env, output, "killed", parti_path, tmp_path)
        made = {layout: _enqueue(env, parti_path, layout, output, layout) for layout in LAYOUTS}
        run_worker_until_done(env, output, "killed", *made, log_path=tmp_path / "worker.log")
        # Committed by the next worker: now the dead attempt's upload is proven abandoned.
        crash["reconcile_after_commit"] = reconcile(_store(output, "killed"), abandoned_after=0)
        yield env, output, made, PROMPTS, crash


def _store(output: str, job: str):
    return open_store(f"{output}/{job}")


def test_an_enqueue_without_layout_or_shard_size_makes_a_webdataset_job_of_that_layouts_shard_size(
    env, output, tmp_path
):
    """The configured default (README, "Which layout"): `producer enqueue` without --layout or
    --shard-size records layout webdataset in job.json and cuts shards of the webdataset size
    that config/defaults.toml gives (read here with tomllib, not the project's settings code).
    Enqueue only, no worker: the tasks stay in this test's own queue."""
    config = tomllib.loads((Path(__file__).resolve().parent.parent / "config/defaults.toml").read_text())
    size = config["producer"]["shard_size_by_layout"]["webdataset"]
    assert size != config["producer"]["shard_size"]  # so the shard size tells the layouts apart
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(size + 1)))
    summary = cli_json(
        "producer", "enqueue", "file", str(prompts), "--model", "tiny", "--job", "default",
        "--output", output, env=env,
    )  # fmt: skip
    job = open_store(summary["job_url"])
    spec = json.loads(job.get("job.json"))
    assert (spec["layout"], spec["shard_size"], summary["shards"]) == ("webdataset", size, 2)
    manifests = sorted(key for key, _ in job.list("manifests/"))
    rows = [pq.read_table(io.BytesIO(job.get(key))).num_rows for key in manifests]
    assert rows == [size, 1]


def test_webdataset_job_writes_one_tar_per_shard_readable_by_webdataset_and_tarfile_prompts_byte_exact(
    jobs, tmp_path
):
    import webdataset as wds

    env, output, made, prompts, _crash = jobs
    url = made["webdataset"]["job_url"]
    store = open_store(url)
    meta = committed_metadata(url)
    assert meta.column("prompt").to_pylist() == prompts
    tars = sorted(set(meta.column("image_key").to_pylist()))
    assert [t.split("/")[1] for t in tars] == ["part-000001", "part-000002"]
    assert all(t.endswith(".tar") for t in tars)
    status = cli_json("producer", "status", "webdataset", "--output", output, env=env)
    assert (status["layout"], status["state"], status["images_done"]) == ("webdataset", "done", ROWS)
    seen_txt, seen_json = [], []
    for n, key in enumerate(tars):
        data = store.get(key)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            names = tar.getnames()
        rows = meta.filter(pc.equal(meta["image_key"], key)).to_pylist()
        assert names == [f"{r['row_id']:012d}.{ext}" for r in rows for ext in ("jpg", "json", "txt")]
        for row in rows:  # one ranged GET of the recorded span is the image
            image = store.get_range(key, row["image_offset"], row["bytes"])
            assert hashlib.sha256(image).hexdigest() == row["sha256"] and image[:2] == b"\xff\xd8"
        local = tmp_path / f"{n}.tar"
        local.write_bytes(data)
        for sample in wds.WebDataset(str(local), shardshuffle=False):
            assert hashlib.sha256(sample["jpg"]).hexdigest() in set(meta.column("sha256").to_pylist())
            seen_txt.append(sample["txt"].decode("utf-8"))
            seen_json.append(json.loads(sample["json"])["prompt"])
    assert seen_txt == prompts and seen_json == prompts


def test_parquet_job_loads_with_hf_datasets_as_pil_images_with_byte_exact_prompts(jobs, tmp_path):
    import datasets
    from PIL import Image

    _env, _output, made, prompts, _crash = jobs
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
    _env, output, made, _prompts, _crash = jobs
    for layout in LAYOUTS:
        store = _store(output, layout)
        summary = verify(store)
        assert summary["ok"] and summary["images_checked"] == ROWS, summary
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
            summary = verify(store)
            assert not summary["ok"] and summary["mismatches"] == 1, summary
            assert "sha256 differs" in summary["problems"][0] and row["image_name"] in summary["problems"][0]
        finally:
            store.put(key, original)
        assert verify(store)["ok"]


def test_finalize_gallery_and_gc_work_on_webdataset_and_parquet_jobs(jobs):
    _env, output, made, prompts, _crash = jobs
    for layout in LAYOUTS:
        store = _store(output, layout)
        objects = sorted(set(committed_metadata(made[layout]["job_url"]).column("image_key").to_pylist()))
        summary = finalize(store, webdataset=True)
        assert summary["rows"] == ROWS and summary["layout"] == layout and summary["image_files"] == objects
        card = store.get("README.md").decode()
        assert f"layout: **{layout}**" in card and all(key in card for key in objects)
        if layout == "parquet":  # tars made from the parquets on request
            assert summary["webdataset"] == ["webdataset/part-000001.tar", "webdataset/part-000002.tar"]
            with tarfile.open(fileobj=io.BytesIO(store.get("webdataset/part-000001.tar"))) as tar:
                assert tar.extractfile("000000000000.txt").read().decode() == prompts[0]
        else:  # the worker's tars are the shards: nothing rewritten
            assert summary["webdataset"] == objects and not list(store.list("webdataset/"))
            said = cli("producer", "finalize", layout, "--output", output, "--webdataset", env=_env).stdout
            assert "the job's own 2 tar shards" in said and f"{store.url}/images/" in said
            assert f"{store.url}/webdataset/" not in said  # no such folder: nothing was written there
        gallery = make_gallery(store, n=4)
        thumbs = [k for k, _ in store.list("gallery/thumbs/")]
        assert gallery["images"] == 4 and len(thumbs) == 4
        # A losing attempt's object is garbage; the committed ones stay.
        folder, ext = objects[0].rsplit("/", 1)[0], objects[0].rsplit(".", 1)[1]
        loser = f"{folder}/20200101T000000.000000Z-loser.{ext}"
        store.put(loser, store.get(objects[0]))
        garbage = collect(store, min_age=3600, delete=True)
        assert [(f["shard"], f["attempt"], f["objects"]) for f in garbage["folders"]] == [
            (1, "20200101T000000.000000Z-loser", 1)
        ]
        assert garbage["kept_committed_objects"] == 2 and not store.exists(loser)
        assert verify(store)["ok"]


def test_a_worker_killed_mid_tar_leaves_no_committed_shard_and_no_readable_tar(jobs):
    _env, output, _made, _prompts, crash = jobs
    assert crash["exit_code"] != 0 and "failpoint mid-upload reached for part-000001" in crash["log"]
    assert crash["metadata"] == []  # nothing committed
    assert crash["images"] == []  # no tar, partial or not, is an object
    assert crash["uploads"] == 1  # its parts were sent: an unfinished multipart upload
    # Its record still says running (nothing proves the attempt over): kept, however old ...
    assert crash["reconcile"]["aborted_uploads"] == 0
    assert crash["reconcile"]["kept_uploads_of_live_attempts"] == 1
    # ... until the shard is committed by another attempt: then aborted.
    assert crash["reconcile_after_commit"]["aborted_uploads"] == 1
    # The next worker redid the shard from scratch and committed it.
    store = _store(output, "killed")
    assert verify(store)["ok"] and verify(store)["images_checked"] == ROWS
    assert [r["state"] for r in attempt_records(store.url, 1)] == ["running", "committed"]


@pytest.mark.parametrize("kind", ["s3", "local"])
def test_a_streamed_upload_sends_bounded_parts_and_shows_nothing_until_finished(env, output, tmp_path, kind):
    store = open_store(output if kind == "s3" else str(tmp_path / "out"))
    part = 5 * 1024 * 1024  # S3's smallest part but the last
    upload = store.upload("images/part-000001/x.tar", part)
    data = os.urandom(2 * part + 123)
    for at in range(0, len(data), 1 << 20):
        upload.write(data[at : at + (1 << 20)])
        assert len(upload._buffer) < part  # never more than one part held
    assert upload.started and list(store.list("images/")) == []
    assert upload.finish() == len(data) and store.get("images/part-000001/x.tar") == data
    if kind == "s3":
        assert upload.requests == 5  # start, 3 parts, complete
    small = store.upload("images/part-000001/y.tar", part)
    small.write(b"small")
    assert not small.started and small.finish() == 5 and store.get("images/part-000001/y.tar") == b"small"
    aborted = store.upload("images/part-000001/z.tar", part)
    aborted.write(data)
    aborted.abort()
    assert not store.exists("images/part-000001/z.tar")


def test_rows_appended_while_a_slow_part_is_sent_do_not_wait_for_it(local_services, monkeypatch):
    svc = local_services
    part = 5 * 1024 * 1024
    data = os.urandom(2 * part + 123)
    with S3Gateway(svc.s3_endpoint, svc.access_key, svc.secret_key, slow_parts=2.0) as gateway:
        for name, value in {**svc.env(), "AWS_ENDPOINT_URL_S3": gateway.url}.items():
            monkeypatch.setenv(name, value)
        store = open_store(f"s3://{BUCKET}/part-sender-{uuid.uuid4().hex[:8]}")
        sender = PartSender(store.upload("images/part-000001/x.tar", part))
        start = time.monotonic()
        for at in range(0, len(data), 1 << 20):
            sender.write(data[at : at + (1 << 20)])
        appended = time.monotonic() - start
        assert sender.finish() == len(data)
        finished = time.monotonic() - start
    # Two parts of 2 s each went out while the writer went on: it waited for neither.
    assert appended < 1.5 and finished >= 4.0, (appended, finished)
    assert store.get("images/part-000001/x.tar") == data
    assert sender.upload.requests == 5  # start, 3 parts (the last one the 123 bytes left), complete
    assert [m for m, _p, q in gateway.requests if "partNumber=" in q] == ["PUT"] * 3
