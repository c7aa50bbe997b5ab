"""Image-conditioned jobs, the producer's side: rows that name a conditioning image (local paths,
S3 keys under an S3 --image-root, bytes in an HF datasets parquet, JourneyDB's img_path) become
manifest references, checked before enqueueing (missing, unreadable, skipped, refused); another
job's committed rows become a chained job (files, webdataset and parquet layouts, a real worker run for
the source jobs); the conditioning options are checked against the preset and are part of the
job's identity. The conditioning images are real photographs shipped in scikit-image's wheel.

Lean on purpose (CI budget): one real worker start for the three source jobs, and the option checks
in this process.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shutil
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fewstep import UserError
from fewstep.contract import condition_images_key
from fewstep.presets import presets
from fewstep.storage import S3Store, open_store
from producer.conditioning import ConditioningOptions
from producer.enqueue import JobOptions, enqueue
from producer.finalize import finalize
from producer.sources.formats import open_file
from producer.sources.job import JobSource
from tests.conftest import BUCKET
from tests.prompt_files import write_journeydb
from tests.support import cli, committed_metadata, config_dir, layout_or_files, run_worker_until_idle
from tests.test_cli_errors import assert_one_line_error

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "camera.png")
SKETCH = "sdxs-512-dreamshaper-sketch"
JPEGS = ("rocket.jpg", "retina.jpg", "hubble_deep_field.jpg")  # JourneyDB's images are JPEGs


def _skimage_file(name: str) -> Path:
    from skimage import data

    return Path(data.__file__).parent / name


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def photos(tmp_path) -> Path:
    """The real photographs as files: four at the top, one in a subfolder."""
    folder = tmp_path / "photos"
    (folder / "cats").mkdir(parents=True)
    for name in PHOTOS:
        shutil.copy(_skimage_file(name), folder / name)
    shutil.copy(_skimage_file("chelsea.png"), folder / "cats" / "chelsea.png")
    return folder


def _enqueue(env, output, job, source, *args, check=True, model="tiny"):
    return cli(
        "producer", "enqueue", *source, "--model", model, "--job", job, "--output", output,
        *layout_or_files(args), env=env, check=check,
    )  # fmt: skip


def _json(env, output, job, source, *args, model="tiny") -> dict:
    return json.loads(_enqueue(env, output, job, source, *args, "--json", model=model).stdout)


def _manifests(job_url: str) -> list[dict]:
    store = open_store(job_url)
    rows = []
    for key, _ in sorted(store.list("manifests/")):
        if not key.endswith(".images.parquet"):
            rows += pq.read_table(io.BytesIO(store.get(key))).to_pylist()
    return rows


def _read_ref(row: dict) -> bytes:
    """What a worker reads for a manifest row's reference (whole object or a ranged GET)."""
    ref = row["cond_ref"]
    if ref.startswith("s3://"):
        parts = urlsplit(ref)
        store, key = S3Store(parts.netloc), parts.path.lstrip("/")
    else:
        store, key = open_store(str(Path(ref.removeprefix("file://")).parent)), Path(ref).name
    if row["cond_offset"] is not None:
        return store.get_range(key, row["cond_offset"], row["cond_length"])
    if row["cond_row"] is not None:  # a row of a parquet's image column
        return pq.read_table(io.BytesIO(store.get(key))).column("image")[row["cond_row"]].as_py()["bytes"]
    return store.get(key)


def test_csv_of_local_paths_enqueues_file_references_with_the_spec_and_identity(env, output, photos):
    prompts = photos / "prompts.csv"
    with prompts.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "image"])
        writer.writerow(["an astronaut, oil painting", str(photos / "astronaut.png")])  # absolute
        writer.writerow(["a cat", "cats/chelsea.png"])  # relative to the CSV's folder
        writer.writerow(["coffee", f"file://{photos / 'coffee.png'}"])
    summary = _json(env, output, "csv", ["file", str(prompts)], "--image-column", "image")
    assert (summary["prompts"], summary["missing_images"], summary["unreadable_images"]) == (3, 0, 0)
    rows = _manifests(summary["job_url"])
    assert [r["cond_ref"] for r in rows] == [
        f"file://{photos / 'astronaut.png'}", f"file://{photos / 'cats' / 'chelsea.png'}",
        f"file://{photos / 'coffee.png'}",
    ]  # fmt: skip
    assert [r["cond_source"] for r in rows] == [
        str(photos / "astronaut.png"), "cats/chelsea.png", f"file://{photos / 'coffee.png'}",
    ]  # fmt: skip
    assert {r["cond_sha256"] for r in rows} == {None}  # unknown until the worker reads them
    assert [_sha(_read_ref(r)) for r in rows] == [
        _sha(_skimage_file(n).read_bytes()) for n in ("astronaut.png", "chelsea.png", "coffee.png")
    ]
    spec = json.loads(open_store(summary["job_url"]).get("job.json"))
    assert spec["conditioning"] == {
        "condition": "init", "image_column": "image", "image_root": str(photos), "source_job": None,
        "resize": "center-crop", "strength": 0.5, "controlnet_scale": None, "canny": None,
        "save_control": False,
    }  # fmt: skip
    assert spec["generation"]["steps"] == 2  # [tiny.img2img] steps: int(2 x 0.5) = 1 denoising step
    assert (spec["counts"]["missing_images"], spec["counts"]["unreadable_images"]) == (0, 0)
    # The same enqueue resumes; other conditioning under the same name is refused.
    assert _json(env, output, "csv", ["file", str(prompts)], "--image-column", "image")["resumed"]
    changed = _enqueue(
        env, output, "csv", ["file", str(prompts)], "--image-column", "image", "--strength", "1", check=False
    )
    assert_one_line_error(changed, "different spec", "conditioning.strength (0.5 there, 1.0 now)")


def test_parquet_of_s3_keys_under_an_s3_image_root_and_journeydb_img_paths(env, output, photos, tmp_path):
    prefix = f"photos-{uuid.uuid4().hex[:8]}"
    bucket = S3Store(BUCKET, prefix)
    for path in sorted(photos.rglob("*.png")):
        bucket.put(str(path.relative_to(photos)), path.read_bytes())
    table = pa.table(
        {
            "prompt": ["an astronaut", "a cat", "a camera"],
            "key": ["astronaut.png", "./cats/chelsea.png", f"s3://{BUCKET}/{prefix}/camera.png"],
        }
    )
    pq.write_table(table, tmp_path / "keys.parquet")
    root = f"s3://{BUCKET}/{prefix}"
    summary = _json(
        env, output, "keys", ["file", str(tmp_path / "keys.parquet")], "--image-column", "key",
        "--image-root", root,
    )  # fmt: skip
    rows = _manifests(summary["job_url"])
    assert [r["cond_ref"] for r in rows] == [
        f"{root}/astronaut.png",
        f"{root}/cats/chelsea.png",
        f"{root}/camera.png",
    ]
    assert [_sha(_read_ref(r)) for r in rows] == [
        _sha(_skimage_file(n).read_bytes()) for n in ("astronaut.png", "chelsea.png", "camera.png")
    ]
    # The same parquet stored beside the photos: relative keys start at its own folder.
    bucket.put("keys.parquet", (tmp_path / "keys.parquet").read_bytes())
    dry = _json(env, output, "keys2", ["file", f"{root}/keys.parquet"], "--image-column", "key", "--dry-run")
    assert (dry["prompts"], dry["missing_images"], dry["unreadable_images"]) == (3, 0, 0)
    # JourneyDB: img_path (./000/0001.jpg) under an S3 root holding real JPEGs.
    for name, key in zip(JPEGS, ("000/0001.jpg", "000/0002.jpg", "001/0003.jpg"), strict=True):
        bucket.put(f"jdb/{key}", _skimage_file(name).read_bytes())
    jdb = write_journeydb(tmp_path / "train_anno.jsonl")
    summary = _json(env, output, "jdb", ["journeydb", "--path", str(jdb)], "--image-column", "img_path",
                    "--image-root", f"{root}/jdb/", "--condition", "init", "--strength", "0.75")  # fmt: skip
    rows = _manifests(summary["job_url"])
    assert [r["cond_ref"] for r in rows] == [f"{root}/jdb/000/0001.jpg", f"{root}/jdb/000/0002.jpg",
                                             f"{root}/jdb/001/0003.jpg"]  # fmt: skip
    assert [r["img_path"] for r in rows] == [r["cond_source"] for r in rows]  # carried as a field too


def test_hf_datasets_parquet_bytes_are_stored_once_per_shard_beside_the_manifest(env, output, tmp_path):
    import datasets

    names = ("astronaut.png", "coffee.png", "chelsea.png")
    images = [{"bytes": _skimage_file(n).read_bytes(), "path": f"train/{n}"} for n in names]
    features = datasets.Features({"prompt": datasets.Value("string"), "image": datasets.Image()})
    dataset = datasets.Dataset.from_dict({"prompt": ["a", "b", "c"], "image": images}, features=features)
    dataset.to_parquet(str(tmp_path / "hf.parquet"))
    summary = _json(
        env,
        output,
        "hf",
        ["file", str(tmp_path / "hf.parquet")],
        "--image-column",
        "image",
        "--shard-size",
        "2",
    )
    store = open_store(summary["job_url"])
    manifest_one = pq.read_table(io.BytesIO(store.get("manifests/part-000001.parquet")))
    assert not any(pa.types.is_binary(f.type) or pa.types.is_struct(f.type) for f in manifest_one.schema)
    rows = _manifests(summary["job_url"])
    assert [r["cond_ref"] for r in rows] == [condition_images_key(1)] * 2 + [condition_images_key(2)]
    assert [r["cond_row"] for r in rows] == [0, 1, 0]
    assert [r["cond_source"] for r in rows] == [f"train/{n}" for n in names]
    for row, name in zip(rows, names, strict=True):
        sidecar = pq.read_table(io.BytesIO(store.get(row["cond_ref"])))
        assert sidecar.schema.names == ["row_id", "image"]
        stored = sidecar.column("image")[row["cond_row"]].as_py()
        assert sidecar.column("row_id")[row["cond_row"]].as_py() == row["row_id"]
        assert _sha(stored["bytes"]) == row["cond_sha256"] == _sha(_skimage_file(name).read_bytes())


def test_missing_and_unreadable_images_are_counted_refused_naming_the_row_or_skipped(env, output, photos):
    (photos / "truncated.png").write_bytes((photos / "coffee.png").read_bytes()[:20_000])
    (photos / "notes.png").write_text("not an image\n")
    prompts = photos / "prompts.csv"
    prompts.write_text(
        "prompt,image\n"
        "ok,astronaut.png\n"
        "cut,truncated.png\n"
        "text,notes.png\n"
        "gone,nothing-here.png\n"
        "escape,../../etc/passwd\n"
        "fine,camera.png\n"
    )
    source = ["file", str(prompts)]
    dry = _json(env, output, "bad", source, "--image-column", "image", "--dry-run")
    assert (dry["prompts"], dry["missing_images"], dry["unreadable_images"]) == (2, 1, 3)
    refused = _enqueue(env, output, "bad", source, "--image-column", "image", check=False)
    assert_one_line_error(
        refused, "source row 1", str(photos / "truncated.png"), "cut short", "--skip-missing-images"
    )
    assert not open_store(output).child("bad").exists("job.json")
    summary = _json(env, output, "bad", source, "--image-column", "image", "--skip-missing-images")
    assert (summary["prompts"], summary["missing_images"], summary["unreadable_images"]) == (2, 1, 3)
    spec = json.loads(open_store(summary["job_url"]).get("job.json"))
    assert (spec["counts"]["missing_images"], spec["counts"]["unreadable_images"]) == (1, 3)
    assert [r["source_row"] for r in _manifests(summary["job_url"])] == [0, 5]


def _tiny(output, job, prompts: Path, layout: str) -> dict:
    """A text-only tiny job of 64x64 JPEGs in shards of 2, enqueued in this process (CI time)."""
    opts = JobOptions(
        job, output, "tiny", shard_size=2, width=64, height=64, image_format="jpeg", layout=layout
    )
    return enqueue(open_file(str(prompts)), opts, progress=False)


def test_enqueue_job_chains_every_layout_and_the_worker_reads_the_references_enqueue_wrote(
    env, output, tmp_path, photos
):
    prompts = tmp_path / "prompts.csv"
    texts = ["a red fox  ", 'ünïcödé, "quoted", and a\nnewline', "a lighthouse at dusk"]
    with prompts.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "category"])
        writer.writerows(zip(texts, ["animal", "text", "place"], strict=True))
    parents = {
        layout: _tiny(output, f"src-{layout}", prompts, layout)
        for layout in ("files", "webdataset", "parquet")
    }
    early = _enqueue(env, output, "early", ["job", "src-files"], check=False)
    assert_one_line_error(early, "job src-files is not finished", "0 of 2 shards committed", "--partial")
    # One real worker for the three source jobs; it exits once their queue is empty.
    run_worker_until_idle(env, tmp_path / "worker.log")
    for layout, parent in parents.items():
        chained = JobOptions(
            f"chain-{layout}", output, "tiny", conditioning=ConditioningOptions(strength=1.0)
        )
        summary = enqueue(JobSource(output, f"src-{layout}"), chained, progress=False)
        assert (summary["prompts"], summary["source_rows_not_committed"]) == (3, 0)
        meta = committed_metadata(parent["job_url"]).to_pylist()
        rows = _manifests(summary["job_url"])
        assert [r["prompt"] for r in rows] == [m["prompt"] for m in meta] == texts  # byte-exact
        assert [r["source_row"] for r in rows] == [m["row_id"] for m in meta]
        assert [r["parent_source_row"] for r in rows] == [m["source_row"] for m in meta]
        assert [r["category"] for r in rows] == ["animal", "text", "place"]
        assert [r["cond_sha256"] for r in rows] == [m["sha256"] for m in meta]
        assert [r["cond_source"] for r in rows] == [f"job:src-{layout}/row {m['row_id']}" for m in meta]
        for row, m in zip(rows, meta, strict=True):
            assert row["cond_ref"] == f"{parent['job_url']}/{m['image_key']}"
            if layout == "webdataset":  # a span of the shard's tar
                assert (row["cond_offset"], row["cond_length"]) == (m["image_offset"], m["bytes"])
            if layout == "parquet":  # a row of the shard's parquet
                assert (row["cond_row"], row["cond_offset"]) == (m["image_row"], None)
            assert _sha(_read_ref(row)) == row["cond_sha256"]
        spec = json.loads(open_store(summary["job_url"]).get("job.json"))
        assert spec["conditioning"]["source_job"] == parent["job_url"]
        assert (spec["conditioning"]["image_column"], spec["conditioning"]["strength"]) == (None, 1.0)
        assert spec["source"]["name"] == "job" and spec["source"]["layout"] == layout
    # The producer's references as the worker reads them: the chained jobs and a CSV job of
    # local photographs (through the CLI) run on a real worker, whose metadata records the
    # digest of the very bytes each row named.
    local = photos / "local.csv"
    local.write_text("prompt,image\nan astronaut,astronaut.png\na cat,cats/chelsea.png\n")
    csv_job = _json(
        env, output, "photo-init", ["file", str(local)], "--image-column", "image", "--save-control",
        "--width", "64", "--height", "64",
    )  # fmt: skip
    run_worker_until_idle(env, tmp_path / "worker-2.log")
    for layout, parent in parents.items():
        source = {m["row_id"]: m for m in committed_metadata(parent["job_url"]).to_pylist()}
        made = committed_metadata(f"{output}/chain-{layout}").to_pylist()
        assert len(made) == 3
        for m in made:
            assert m["cond_sha256"] == source[m["source_row"]]["sha256"]
            assert m["cond_key"] == f"job:src-{layout}/row {m['source_row']}"
            assert (m["condition"], m["strength"], m["resize"]) == ("init", 1.0, "center-crop")
    made = committed_metadata(csv_job["job_url"]).to_pylist()
    assert [m["cond_key"] for m in made] == ["astronaut.png", "cats/chelsea.png"]
    assert [m["cond_sha256"] for m in made] == [
        _sha(_skimage_file(n).read_bytes()) for n in ("astronaut.png", "chelsea.png")
    ]
    assert all(m["control_key"] and m["control_bytes"] for m in made)
    photo_store = open_store(csv_job["job_url"])
    finalize(photo_store)
    assert "conditioning: **init** from column `image` under" in photo_store.get("README.md").decode()


# Until the worker side's real ControlNet preset is in config/models.toml, a minimal one with the
# same [NAME.control] table (docs/CONDITIONING.md) stands in for these producer-side checks.
SKETCH_PRESET = """
[sdxs-512-dreamshaper-sketch]
repo = "IDKiro/sdxs-512-dreamshaper"
revision = "d932dd3073147cc67676d16a641513a2e9810741"
pipeline = "StableDiffusionControlNetPipeline"
steps = 1
guidance = 0.0
width = 512
height = 512
sampler = "euler-trailing"
[sdxs-512-dreamshaper-sketch.scheduler]
class = "EulerDiscreteScheduler"
timestep_spacing = "trailing"
[sdxs-512-dreamshaper-sketch.control]
modes = ["sketch", "canny", "as-is"]
default = "sketch"
scale = 1.0
"""


def _check(source, model: str, **options) -> dict:
    steps = options.pop("steps", None)
    opts = JobOptions("checks", "unused", model, steps=steps, conditioning=ConditioningOptions(**options))
    return enqueue(source, opts, dry_run=True, progress=False)


def test_conditioning_options_are_checked_against_the_preset(tmp_path, monkeypatch):
    if SKETCH not in presets():
        config = Path(config_dir(tmp_path))
        (config / "models.toml").write_text((config / "models.toml").read_text() + SKETCH_PRESET)
        monkeypatch.setenv("FEWSTEP_CONFIG_DIR", str(config))
    shutil.copy(_skimage_file("astronaut.png"), tmp_path / "a.png")
    (tmp_path / "p.csv").write_text("prompt,image\nan astronaut,a.png\n")

    def source():
        return open_file(str(tmp_path / "p.csv"))

    # SD-Turbo img2img: steps x strength must reach one denoising step.
    with pytest.raises(
        UserError, match=r"1 step\(s\) at strength 0.5 run int\(1 x 0.5\) = 0 denoising steps"
    ):
        _check(source(), "sd-turbo", image_column="image", steps=1)
    assert _check(source(), "sd-turbo", image_column="image", steps=2)["prompts"] == 1
    assert _check(source(), "sd-turbo", image_column="image", steps=1, strength=1.0)["prompts"] == 1
    refusals = [
        ("tiny", {"image_column": "image", "condition": "canny"}, "model tiny cannot run --condition canny"),
        (SKETCH, {}, "is a ControlNet preset and needs a conditioning image"),
        (SKETCH, {"image_column": "image", "condition": "init"}, "cannot run --condition init"),
        (SKETCH, {"image_column": "image", "strength": 0.5}, "--strength does not apply"),
        ("tiny", {"image_column": "image", "controlnet_scale": 0.5}, "--controlnet-scale does not apply"),
        (SKETCH, {"image_column": "image", "canny_low": 10}, "--canny-low does not apply"),
        (SKETCH, {"image_column": "image", "condition": "canny", "canny_low": 250},
         "0 <= low < high"),
        ("tiny", {"strength": 0.5}, "only for jobs with conditioning images"),
        ("tiny", {"image_column": "nope"}, "no text column of that name"),
        ("sd-turbo", {"image_column": "image", "strength": 1.5}, "--strength must be in (0, 1]"),
        ("pixart-alpha-512", {"image_column": "image"}, "takes no conditioning image"),
    ]  # fmt: skip
    for model, options, message in refusals:
        with pytest.raises(UserError, match=re.escape(message)):
            _check(source(), model, **options)
    sketch = _check(source(), SKETCH, image_column="image", condition="canny")
    assert sketch["prompts"] == 1


def test_image_checks_pass_whole_images_and_catch_cut_short_ones_of_every_common_format(tmp_path):
    from PIL import Image

    from producer.image_refs import MISSING, UNREADABLE, ImageRefs

    whole = {
        "rocket.jpg": _skimage_file("rocket.jpg").read_bytes(),
        "anim.gif": _skimage_file("no_time_for_that_tiny.gif").read_bytes(),
        "coffee.png": _skimage_file("coffee.png").read_bytes(),
    }
    webp = io.BytesIO()
    Image.open(_skimage_file("astronaut.png")).save(webp, "WEBP", quality=80)
    whole["astronaut.webp"] = webp.getvalue()
    cmyk = io.BytesIO()  # decodable, converted on the worker: the producer only checks the header
    Image.open(_skimage_file("chelsea.png")).convert("CMYK").save(cmyk, "JPEG")
    whole["cmyk.jpg"] = cmyk.getvalue()
    for name, data in whole.items():
        (tmp_path / name).write_bytes(data)
        (tmp_path / f"cut-{name}").write_bytes(data[: len(data) * 2 // 3])
    with ImageRefs(None, str(tmp_path), skip=True) as refs:
        found = {name: refs.check(refs.resolve(name, 0)) for name in [*whole, *(f"cut-{n}" for n in whole)]}
        found["absent.png"] = refs.check(refs.resolve("absent.png", 0))
        held = refs.check(refs.resolve({"bytes": whole["rocket.jpg"][:-10], "path": None}, 7))
    assert {n: f.problem for n, f in found.items() if not n.startswith("cut-")} == {
        **dict.fromkeys(whole),
        "absent.png": MISSING,
    }
    assert {n: (f.problem, f.reason.split(":")[0]) for n, f in found.items() if n.startswith("cut-")} == (
        dict.fromkeys((f"cut-{n}" for n in whole), (UNREADABLE, "cut short"))
    )
    assert (held.problem, held.source) == (UNREADABLE, "image of source row 7")
