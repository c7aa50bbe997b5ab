"""Image-conditioned jobs on real workers: img2img with ``tiny``, ControlNet (canny, sketch,
as-is) with ``tiny-controlnet``, conditioning images that are real photographs shipped in
scikit-image, read from local files, from SeaweedFS, from a sidecar of source bytes and from
another job's files, tar and parquet; odd and broken images.

Lean on purpose (CI budget): one module fixture enqueues every job (tests/conditioned_jobs.py)
and runs one worker per model; the first jobs' outputs feed a chained job while the workers
keep serving; the broken rows are one shard each and fail alone. The conversion rules are
checked in this process, on images made here with Pillow from the same photographs.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fewstep.storage import open_store
from producer.gallery import make_gallery
from producer.verify import verify
from tests.conditioned_jobs import Row, enqueue_conditioned
from tests.conftest import BUCKET
from tests.support import (
    attempt_records,
    committed_metadata,
    module_env,
    start_worker,
    stop_worker,
    wait_done,
    wait_for,
)
from worker.conditioning import decode, resize

SIZE = 64
CANNY = (60, 160)


def _photos():
    from skimage import data

    return {"astronaut": data.astronaut(), "chelsea": data.chelsea(), "coffee": data.coffee()}


def _png(array_or_image, **save) -> bytes:
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    out = io.BytesIO()
    image.save(out, format=save.pop("format", "PNG"), **save)
    return out.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _settled(url: str, timeout: float = 120) -> None:
    """Wait until every shard of the job is committed or marked failed."""
    from producer.progress import read_progress

    wait_for(
        lambda: (p := read_progress(open_store(url))) and len(p.committed) + len(p.failed) == p.shards_total,
        timeout,
        f"every shard of {url} committed or failed",
    )


@pytest.fixture(scope="module")
def jobs(local_services, model_cache, tmp_path_factory):
    """Every job run, and what the tests compare them with."""
    env = module_env(local_services, model_cache)
    output = f"s3://{BUCKET}/runs/{uuid.uuid4().hex[:8]}"
    tmp = tmp_path_factory.mktemp("conditioning")
    photos = _photos()
    files = {
        "astronaut.png": _png(photos["astronaut"]),
        "chelsea.jpg": _png(photos["chelsea"], format="JPEG", quality=90),
        "coffee.png": _png(photos["coffee"]),
    }
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    s3_source = f"s3://{BUCKET}/sources/{uuid.uuid4().hex[:8]}/chelsea.jpg"
    local, s3 = (tmp / "astronaut.png").as_uri(), s3_source
    # Broken and huge images: one shard each.
    jpeg = files["chelsea.jpg"]
    broken = {
        "corrupt.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "huge.png": _png(Image.new("L", (8100, 8100), 128), compress_level=1),  # 65.6 MP > 64 MP
        "large.png": _png(Image.new("RGB", (7100, 7100), (200, 30, 30)), compress_level=1),  # 50.4 MP
    }
    for name, data in broken.items():
        (tmp / name).write_bytes(data)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        bucket, _, key = s3_source.removeprefix("s3://").partition("/")
        open_store(f"s3://{bucket}").put(key, files["chelsea.jpg"])

        three = [
            Row("an astronaut", local, source="astronaut.png"),
            Row("a cat", s3, source=s3),
            Row("a cup of coffee", data=files["coffee.png"], source="row 2 of the source's image column"),
        ]
        common = {"shard_size": 3, "width": SIZE, "height": SIZE}
        init = {"condition": "init", **common}
        controlnet = "tiny-controlnet"
        saved = {"save_control": True}
        made = {
            "init": enqueue_conditioned(output, "init", "tiny", three, **init, **saved),
            "init-again": enqueue_conditioned(output, "init-again", "tiny", three, **init),
            "canny": enqueue_conditioned(
                output, "canny", controlnet, three, condition="canny", canny=CANNY, layout="webdataset",
                **saved, **common,
            ),
            "sketch": enqueue_conditioned(
                output, "sketch", controlnet, three, condition="sketch", layout="parquet", resize="pad",
                **saved, **common,
            ),
        }  # fmt: skip
        names = ("corrupt.png", "truncated.jpg", "huge.png", "missing.png", "wrong digest", "large.png")
        bad = [Row(n, (tmp / n).as_uri()) for n in names]
        bad[3] = Row("missing.png", (tmp / "missing.png").as_uri(), source="missing.png")  # as written
        bad[4] = Row("wrong digest", local, sha256="0" * 64)
        made["broken"] = enqueue_conditioned(
            output, "broken", controlnet, bad, condition="as-is", shard_size=1, width=SIZE, height=SIZE
        )
        workers = [
            start_worker(env, log_path=tmp / "tiny.log", model="tiny"),
            start_worker(env, log_path=tmp / "controlnet.log", model=controlnet),
        ]
        try:
            for job in ("init", "init-again", "canny", "sketch"):
                wait_done(job, output, env, timeout=180)
            # A chained job: the committed images of three earlier jobs (files, tar, parquet).
            rows = []
            for job in ("init", "canny", "sketch"):
                for r in committed_metadata(made[job]["job_url"]).to_pylist():
                    ranged = r["image_offset"] is not None
                    rows.append(
                        Row(
                            r["prompt"], f"{made[job]['job_url']}/{r['image_key']}",
                            source=f"{job} row {r['row_id']}", offset=r["image_offset"],
                            length=r["bytes"] if ranged else None, row=r["image_row"], sha256=r["sha256"],
                        )
                    )  # fmt: skip
            made["chained"] = enqueue_conditioned(
                output, "chained", controlnet, rows, condition="canny", canny=CANNY, **common
            )
            wait_done("chained", output, env, timeout=180)
            _settled(made["broken"]["job_url"])
            alive = [w.poll() is None for w in workers]
        finally:
            codes = [stop_worker(w) for w in workers]
        yield {"made": made, "files": files, "broken": broken, "alive": alive, "codes": codes}


def _meta(jobs, job: str) -> list[dict]:
    return committed_metadata(jobs["made"][job]["job_url"]).to_pylist()


def _expected(jobs, name: str, policy: str = "center-crop") -> Image.Image:
    image, _offset = resize(decode(jobs["files"][name], 10**9, (SIZE, SIZE)), SIZE, SIZE, policy)
    return image


def test_init_job_records_sources_digests_and_saves_the_init_image_beside_each_result(jobs):
    rows = _meta(jobs, "init")
    files = jobs["files"]
    assert [r["cond_key"] for r in rows][:2] == ["astronaut.png", rows[1]["cond_key"]]
    assert rows[1]["cond_key"].startswith("s3://") and rows[2]["cond_key"].startswith("row 2")
    # cond_sha256 is the sha256 of the source file's bytes, wherever they were read from.
    assert [r["cond_sha256"] for r in rows] == [
        _sha(files[n]) for n in ("astronaut.png", "chelsea.jpg", "coffee.png")
    ]
    for r in rows:
        assert (r["condition"], r["strength"], r["controlnet_scale"], r["resize"]) == (
            "init",
            0.5,
            None,
            "center-crop",
        )
        assert r["step"] == 2  # the preset's img2img steps: 2 x 0.5 = one denoising step
        assert r["control_key"] == r["image_key"].rsplit("/", 1)[0] + f"/{r['row_id']:012d}.control.png"
    store = open_store(jobs["made"]["init"]["job_url"])
    saved = np.asarray(Image.open(io.BytesIO(store.get(rows[0]["control_key"]))))
    assert np.array_equal(saved, np.asarray(_expected(jobs, "astronaut.png")))  # the init image the model saw
    assert verify(store)["ok"]
    # verify checks the saved maps: a damaged one is reported, by key.
    key, original = rows[0]["control_key"], store.get(rows[0]["control_key"])
    store.put(key, original[:-10])
    try:
        report = verify(store)
    finally:
        store.put(key, original)
    assert not report["ok"] and report["problems"] == [
        f"{key}: control map of {len(original) - 10} bytes, metadata says {len(original)}"
    ]


def test_same_spec_gives_the_same_conditioning_and_the_same_bytes(jobs):
    first, again = _meta(jobs, "init"), _meta(jobs, "init-again")
    assert [r["sha256"] for r in first] == [r["sha256"] for r in again]
    assert [r["cond_sha256"] for r in first] == [r["cond_sha256"] for r in again]
    assert again[0]["control_key"] is None  # no --save-control there
    # The init image matters: another photograph gives another image from the same seed.
    assert len({r["sha256"] for r in first}) == 3


def test_canny_map_saved_in_the_tar_equals_cv2_canny_of_the_resized_image(jobs, tmp_path):
    import cv2

    rows = _meta(jobs, "canny")
    store = open_store(jobs["made"]["canny"]["job_url"])
    for r, name in zip(rows, ("astronaut.png", "chelsea.jpg", "coffee.png"), strict=True):
        assert (r["condition"], r["controlnet_scale"], r["control_key"]) == ("canny", 1.0, r["image_key"])
        png = store.get_range(r["control_key"], r["control_offset"], r["control_bytes"])
        edges = cv2.Canny(np.asarray(_expected(jobs, name)), *CANNY)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), np.stack([edges] * 3, axis=-1))
    # The control map is the member right after its image in the tar.
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(store.get(rows[0]["image_key"]))) as tar:
        names = tar.getnames()
    assert names[:4] == [f"000000000000.{s}" for s in ("png", "control.png", "json", "txt")]
    # WebDataset groups it with its sample, as the "control.png" field.
    import webdataset as wds

    local = tmp_path / "part.tar"
    local.write_bytes(store.get(rows[0]["image_key"]))
    sample = next(iter(wds.WebDataset(str(local), shardshuffle=False)))
    first = rows[0]
    assert sample["control.png"] == store.get_range(
        first["control_key"], first["control_offset"], first["control_bytes"]
    )
    assert verify(store)["ok"]


def test_sketch_job_pads_and_stores_white_strokes_on_black_in_the_parquet_control_column(jobs, tmp_path):
    import datasets

    rows = _meta(jobs, "sketch")
    store = open_store(jobs["made"]["sketch"]["job_url"])
    table = pq.read_table(io.BytesIO(store.get(rows[2]["image_key"])))
    assert table.column_names[:2] == ["image", "control_image"]
    local = tmp_path / "part.parquet"
    local.write_bytes(store.get(rows[2]["image_key"]))
    loaded = datasets.load_dataset("parquet", data_files=[str(local)], split="train", cache_dir=str(tmp_path))
    assert isinstance(loaded.features["control_image"], datasets.Image)  # HF datasets decodes both
    assert loaded[0]["control_image"].size == loaded[0]["image"].size == (SIZE, SIZE)
    control = table.column("control_image").to_pylist()[rows[2]["control_offset"]]
    sketch = np.asarray(Image.open(io.BytesIO(control["bytes"])))
    assert set(np.unique(sketch)) <= {0, 255} and 0 < sketch.mean() < 128  # strokes, mostly black
    # coffee is 600x400: padded top and bottom, black there.
    assert sketch[:5].max() == 0 and sketch[-5:].max() == 0
    assert {r["resize"] for r in rows} == {"pad"} and verify(store)["ok"]


def test_chained_job_reads_earlier_jobs_files_tars_and_parquets_and_checks_their_digests(jobs):
    rows = _meta(jobs, "chained")
    earlier = [r for job in ("init", "canny", "sketch") for r in _meta(jobs, job)]
    assert len(rows) == 9 and [r["cond_sha256"] for r in rows] == [r["sha256"] for r in earlier]
    assert all(r["condition"] == "canny" for r in rows)


def test_broken_rows_fail_their_shard_with_one_clear_line_and_the_worker_keeps_serving(jobs):
    url = jobs["made"]["broken"]["job_url"]
    store = open_store(url)
    failed = {}
    for shard in range(1, 6):
        marker = json.loads(store.get(f"failed/part-{shard:06d}.json"))
        assert marker["attempts"] == 1  # not retried: the same bytes would fail again
        failed[shard] = marker["last_error"]
        assert attempt_records(url, shard)[-1]["state"] == "error"
        assert "\n" not in marker["last_error"] and "Traceback" not in marker["last_error"]
    assert failed[1].startswith("ConditionError: row 0 (file://") and "not an image in a format" in failed[1]
    assert (
        "row 1 (" in failed[2]
        and "cannot decode the conditioning image: OSError: image file is truncated" in failed[2]
    )
    assert "row 2 (" in failed[3] and "8100x8100 image (65.6 MP) is above the limit of 64.0 MP" in failed[3]
    assert "row 3 (" in failed[4] and "missing.png): conditioning image not found" in failed[4]
    assert "looked for at /" in failed[4]  # the path as written, and where it was looked for
    assert (
        "row 4 (" in failed[5]
        and f"has sha256 {_sha(jobs['files']['astronaut.png'])}, the manifest expects 0000" in failed[5]
    )
    # The 50 MP image is within the limit: converted and generated.
    (large,) = _meta(jobs, "broken")
    assert large["row_id"] == 5 and large["cond_sha256"] == _sha(jobs["broken"]["large.png"])
    assert jobs["alive"] == [True, True] and jobs["codes"] == [0, 0]


def test_gallery_shows_each_result_beside_its_control_map(jobs):
    store = open_store(jobs["made"]["canny"]["job_url"])
    summary = make_gallery(store, n=3)
    page = store.get("gallery/index.html").decode()
    assert summary["images"] == 3 and page.count('class="pair"') == 3 and 'title="control map"' in page
    assert store.exists("gallery/thumbs/000000000000.condition.jpg")
    plain = open_store(jobs["made"]["init-again"]["job_url"])  # nothing saved: the conditioning image
    make_gallery(plain, n=3)
    assert 'title="conditioning image"' in plain.get("gallery/index.html").decode()


# --- the conversion rules, in this process -------------------------------------------------------


def test_conversion_rules_for_cmyk_16_bit_alpha_palette_animation_and_orientation():
    photo = _photos()["astronaut"]
    rgb = Image.fromarray(photo)
    limit = 10**8

    cmyk = decode(_png(rgb.convert("CMYK"), format="JPEG", quality=95), limit)
    assert cmyk.mode == "RGB" and np.abs(np.asarray(cmyk, int) - photo).mean() < 8

    grey16 = (np.asarray(rgb.convert("L"), np.uint16) * 257).astype(np.uint16)
    sixteen = decode(_png(Image.fromarray(grey16)), limit)
    assert np.array_equal(np.asarray(sixteen)[..., 0], np.asarray(rgb.convert("L")))  # 65535 → 255

    rgba = np.dstack([photo, np.zeros(photo.shape[:2], np.uint8)])
    rgba[:256, :, 3] = 255  # top half opaque, bottom half transparent
    composited = np.asarray(decode(_png(rgba), limit))
    assert np.array_equal(composited[:256], photo[:256]) and composited[256:].min() == 255  # on white

    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    assert decode(_png(palette, transparency=0), limit).mode == "RGB"

    frames = [rgb, Image.new("RGB", rgb.size, (0, 0, 255))]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    first = np.asarray(decode(gif.getvalue(), limit))
    assert first[..., 2].mean() < 200  # the photograph, not the blue second frame

    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: turn 90 degrees clockwise
    wide = Image.fromarray(photo[:200])
    upright = decode(_png(wide, format="JPEG", exif=exif.tobytes()), limit)
    assert upright.size == (200, 512)

    with pytest.raises(OSError):
        decode(_png(rgb, format="JPEG")[:5000], limit)  # truncated
    huge = _png(Image.new("L", (1000, 1000)))
    from worker.conditioning import ConditionError

    with pytest.raises(ConditionError, match=r"1000x1000 image \(1.0 MP\) is above the limit of 0.5 MP"):
        decode(huge, 500_000)
