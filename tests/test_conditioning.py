"""Image-conditioned jobs on real workers: img2img with ``tiny``, ControlNet (canny, sketch,
as-is) with ``tiny-controlnet``, conditioning images that are real photographs shipped in
scikit-image, read from local files, from SeaweedFS, from a sidecar of source bytes and from
another job's files, tar and parquet; odd and broken images.

Lean on purpose (CI budget): one module fixture enqueues every job (tests/conditioned_jobs.py)
and runs one worker per model; the first jobs' outputs feed a chained job while the workers
keep serving; the broken rows are one shard each and fail alone. The conversion rules are
checked in this process, on images made here with Pillow from the same photographs.

What the model was given (the saved control maps) is checked against inputs rebuilt here with
plain Pillow, numpy and OpenCV from the source files, by the geometry docs/CONDITIONING.md
promises (written out in ``GEOMETRY``), never with the worker's own decode and resize.
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
from worker.conditioning import decode

SIZE = 64
CANNY = (60, 160)
#: Pillow's ``reducing_gap`` the worker resizes with (worker/conditioning.py: "Lanczos throughout,
#: with Pillow's reducing_gap 3"): part of the promise, it changes pixels by a few levels.
REDUCING_GAP = 3.0

#: Where each source lands in a 64x64 job, worked out by hand from docs/CONDITIONING.md
#: ("What happens to each image"): the size it is decoded at, the ``center-crop`` box (cover the
#: size, keep the middle), and the ``pad`` fit (fit inside, centred on black) and its offset.
#: chelsea.jpg is 451x300: 2 x 64 = 128 <= 300 / 2, so libjpeg decodes it at 1/2 scale
#: (ceil: 226x150), not 1/4 (113x75 is below twice the job's size).
GEOMETRY = {
    "astronaut.png": {"decoded": (512, 512), "crop": (0, 0, 512, 512), "pad": ((64, 64), (0, 0))},
    "chelsea.jpg": {"decoded": (226, 150), "crop": (38, 0, 188, 150), "pad": ((64, 42), (0, 11))},
    "coffee.png": {"decoded": (600, 400), "crop": (100, 0, 500, 400), "pad": ((64, 43), (0, 10))},
    "coffee-portrait.png": {"decoded": (400, 600), "crop": (0, 100, 400, 500), "pad": ((43, 64), (10, 0))},
}


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
        "coffee-portrait.png": _png(Image.fromarray(photos["coffee"]).transpose(Image.Transpose.ROTATE_90)),
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
        # The same prompts (so the same seeds, row by row) with other images in rows 0 and 1, and
        # the same image in row 2: the control of the experiment.
        other = [
            Row("an astronaut", (tmp / "coffee-portrait.png").as_uri()),
            Row("a cat", local),
            Row("a cup of coffee", (tmp / "coffee.png").as_uri()),
        ]
        common = {"shard_size": 3, "width": SIZE, "height": SIZE}
        init = {"condition": "init", **common}
        controlnet = "tiny-controlnet"
        saved = {"save_control": True}
        made = {
            "init": enqueue_conditioned(output, "init", "tiny", three, **init, **saved),
            "init-again": enqueue_conditioned(output, "init-again", "tiny", three, **init),
            "init-other": enqueue_conditioned(output, "init-other", "tiny", other, **init, **saved),
            "canny": enqueue_conditioned(
                output, "canny", controlnet, three, condition="canny", canny=CANNY, layout="webdataset",
                **saved, **common,
            ),
            "canny-other": enqueue_conditioned(
                output, "canny-other", controlnet, other, condition="canny", canny=CANNY, layout="webdataset",
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
            for job in ("init", "init-again", "init-other", "canny", "canny-other", "sketch"):
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


def _decoded(jobs, name: str) -> Image.Image:
    """The source as RGB at the size ``GEOMETRY`` says it is decoded at (libjpeg's DCT scaling,
    Pillow's ``draft``, for a JPEG decoded small)."""
    image = Image.open(io.BytesIO(jobs["files"][name]))
    size = GEOMETRY[name]["decoded"]
    if image.size != size:
        scale = round(image.width / size[0])
        image.draft("RGB", (image.width // scale, image.height // scale))
    assert image.size == size
    return image.convert("RGB")


def _cropped(jobs, name: str) -> np.ndarray:
    """``center-crop``: the middle box of the decoded source, resized to the job's size."""
    image, box, lanczos = _decoded(jobs, name), GEOMETRY[name]["crop"], Image.Resampling.LANCZOS
    return np.asarray(image.resize((SIZE, SIZE), lanczos, box=box, reducing_gap=REDUCING_GAP))


def _fitted(jobs, name: str) -> np.ndarray:
    """``pad`` before padding: the whole decoded source, resized to fit inside the job's size."""
    size, _offset = GEOMETRY[name]["pad"]
    return np.asarray(_decoded(jobs, name).resize(size, Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP))


def _on_black(name: str, inner: np.ndarray) -> np.ndarray:
    """``pad``: ``inner`` at its offset on a black canvas of the job's size."""
    (width, height), (x, y) = GEOMETRY[name]["pad"]
    canvas = np.zeros((SIZE, SIZE, 3), np.uint8)
    canvas[y : y + height, x : x + width] = inner
    return canvas


def _span(store, key: str, offset: int | None, length: int) -> bytes:
    """An object (files layout) or a byte span of a tar (webdataset layout)."""
    return store.get(key) if offset is None else store.get_range(key, offset, length)


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _results_and_inputs(jobs, job: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each row's generated image and the input the model was given (its saved control map),
    as pixels, for a job in the files or webdataset layout."""
    store = open_store(jobs["made"][job]["job_url"])
    rows = _meta(jobs, job)
    results = [_pixels(_span(store, r["image_key"], r["image_offset"], r["bytes"])) for r in rows]
    inputs = [_pixels(_span(store, r["control_key"], r["control_offset"], r["control_bytes"])) for r in rows]
    return results, inputs


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


def test_another_init_image_alone_gives_another_result_from_the_same_prompt_and_seed(jobs):
    first, other = _meta(jobs, "init"), _meta(jobs, "init-other")
    assert [(r["prompt"], r["seed"]) for r in first] == [(r["prompt"], r["seed"]) for r in other]
    (a, a_inputs), (b, b_inputs) = _results_and_inputs(jobs, "init"), _results_and_inputs(jobs, "init-other")
    # Rows 0 and 1 start from other photographs, row 2 from the same one (there from the
    # source's bytes, here from a file): only the init image differs, and only its rows change.
    # The tiny replica's random encoder maps photographs to nearly one latent, so the change is
    # small (one level in ~5% of values), but generation is deterministic: exact comparisons.
    assert [np.array_equal(x, y) for x, y in zip(a_inputs, b_inputs, strict=True)] == [False, False, True]
    assert [np.array_equal(x, y) for x, y in zip(a, b, strict=True)] == [False, False, True]
    assert first[2]["sha256"] == other[2]["sha256"]


def test_another_control_map_alone_gives_another_result_from_the_same_prompt_and_seed(jobs):
    first, other = _meta(jobs, "canny"), _meta(jobs, "canny-other")
    assert [(r["prompt"], r["seed"]) for r in first] == [(r["prompt"], r["seed"]) for r in other]
    (a, a_maps), (b, b_maps) = _results_and_inputs(jobs, "canny"), _results_and_inputs(jobs, "canny-other")
    # As above: rows 0 and 1 get other maps, row 2 the same one (up to 3 levels of change).
    assert [np.array_equal(x, y) for x, y in zip(a_maps, b_maps, strict=True)] == [False, False, True]
    assert [np.array_equal(x, y) for x, y in zip(a, b, strict=True)] == [False, False, True]
    assert first[2]["sha256"] == other[2]["sha256"]


def test_center_crop_keeps_the_middle_of_wide_and_tall_photos_resized_with_lanczos(jobs):
    _results, saved = _results_and_inputs(jobs, "init")
    _results, saved_other = _results_and_inputs(jobs, "init-other")
    assert np.array_equal(saved[0], _cropped(jobs, "astronaut.png"))  # square: the whole photo
    assert np.array_equal(saved[2], _cropped(jobs, "coffee.png"))  # 600x400: 100 px cut left and right
    assert np.array_equal(saved_other[0], _cropped(jobs, "coffee-portrait.png"))  # 100 px top and bottom


def test_a_jpeg_over_twice_the_job_size_is_decoded_by_libjpeg_at_half_scale(jobs):
    _results, saved = _results_and_inputs(jobs, "init")
    assert np.array_equal(saved[1], _cropped(jobs, "chelsea.jpg"))  # decoded at 226x150
    # The check can tell: decoded at full size (451x300, the same middle box at twice the
    # scale), the same crop differs by up to 14 levels.
    full = Image.open(io.BytesIO(jobs["files"]["chelsea.jpg"])).convert("RGB")
    box = (75.5, 0, 375.5, 300)
    at_full_scale = full.resize((SIZE, SIZE), Image.Resampling.LANCZOS, box=box, reducing_gap=REDUCING_GAP)
    assert not np.array_equal(saved[1], np.asarray(at_full_scale))


def test_canny_map_saved_in_the_tar_equals_cv2_canny_of_the_resized_image(jobs, tmp_path):
    import cv2

    rows = _meta(jobs, "canny")
    store = open_store(jobs["made"]["canny"]["job_url"])
    _results, maps = _results_and_inputs(jobs, "canny")
    _results, other_maps = _results_and_inputs(jobs, "canny-other")
    for r in rows:
        assert (r["condition"], r["controlnet_scale"], r["control_key"]) == ("canny", 1.0, r["image_key"])
    names = ("astronaut.png", "chelsea.jpg", "coffee.png", "coffee-portrait.png")
    for saved, name in zip([*maps, other_maps[0]], names, strict=True):
        edges = cv2.Canny(_cropped(jobs, name), *CANNY)
        assert np.array_equal(saved, np.stack([edges] * 3, axis=-1)), name
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


def test_sketch_job_pads_and_stores_black_strokes_on_white_in_the_parquet_control_column(jobs, tmp_path):
    import cv2
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
    controls = table.column("control_image").to_pylist()
    for r, name in zip(rows, ("astronaut.png", "chelsea.jpg", "coffee.png"), strict=True):
        saved = _pixels(controls[r["control_offset"]]["bytes"])
        # Traced on the fitted image (so the pad's border is no edge): grey, 5x5 Gaussian blur,
        # Canny at 100/200; ink within half the preset's 16-px stroke (at 512) of an edge: 1 px
        # at 64, measured here by brute force; black ink on white paper, the border white too.
        grey = cv2.cvtColor(_fitted(jobs, name), cv2.COLOR_RGB2GRAY)
        edges = np.argwhere(cv2.Canny(cv2.GaussianBlur(grey, (5, 5), 0), 100, 200))
        rows_, cols = np.indices(grey.shape)
        nearest = np.sqrt(
            ((rows_[..., None] - edges[:, 0]) ** 2 + (cols[..., None] - edges[:, 1]) ** 2).min(axis=-1)
        )
        drawn = np.where(nearest <= 1.0, 0, 255).astype(np.uint8)
        padded = 255 - _on_black(name, 255 - np.stack([drawn] * 3, axis=-1))
        assert np.array_equal(saved, padded), name
        assert 128 < saved.mean() < 255  # black strokes, mostly white
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
