"""Where everything of a job is in storage: keys built from the job name and ids only.

Storage layout (keys relative to the job root ``{output}/{job}/``, built from the job
name and ids only, never from dataset fields)::

    job.json                                  the job spec
    manifests/part-000001.parquet             the prompts of shard 1 (with conditioning image
                                              references for image-conditioned jobs)
    manifests/part-000001.images.parquet      image bytes the source itself held, once per shard
    images/part-000001/<attempt-id>/000000000042.png
                                              one image, named by its global row id, in the
                                              folder of the attempt that made it; the committed
                                              metadata names the one attempt whose images count
                                              (layout "files"; the default is "webdataset")
    images/part-000001/<attempt-id>/000000000042.control.png
                                              with --save-control: the control map the model saw
                                              (in the tar, or a ``control_image`` column, for
                                              the other layouts)
    images/part-000001/<attempt-id>.tar       layout "webdataset": every image of one attempt,
                                              with its .json row and .txt prompt, in one tar
    images/part-000001/<attempt-id>.parquet   layout "parquet": every image of one attempt in
                                              an ``image`` column (HF datasets' Image) next to
                                              the metadata columns
    metadata/part-000001.parquet              shard 1's metadata: the commit marker, written last
    failed/part-000001.json                   shard 1 gave up after too many attempts
    attempts/part-000001/<attempt-id>.json    one record per delivery of shard 1 (worker, outcome)
    stats/part-000001.json                    shard 1's timings (generate / encode / upload)
    workers/<worker-id>.json                  a worker's heartbeat while it works on this job
    duplicates.parquet                        with --dedupe: each dropped row and the row kept for it
    embeddings/part-000001/<attempt-id>.parquet  with --embeddings: one attempt's image embeddings

What ``producer finalize`` and ``producer gallery`` add to a job::

    metadata.parquet                          every committed row, one schema (or
                                              metadata-00001-of-00003.parquet, ... when large)
    README.md                                 the dataset card
    finalized.json                            what finalize wrote, when, and what was missing
    images/part-000001/part-000001.json       DiffusionDB-style prompts of a part (--json-parts)
    webdataset/part-000001.tar                WebDataset shard of part 1 (--webdataset)
    gallery/index.html                        a contact sheet, with gallery/thumbs/*.jpg
    near_duplicates.parquet                   ``producer dedupe``: each near-duplicate image and the
                                              row kept for it
    report/index.html                         ``producer report``: score plots, best and worst
                                              images, report.csv

Parts are numbered from 1, as in DiffusionDB. The Celery message for a shard
carries references only (:class:`ShardMessage`), never prompts or credentials.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets

from fewstep import UserError

JOB_SPEC_KEY = "job.json"
MANIFESTS = "manifests"
IMAGES = "images"
METADATA = "metadata"
FAILED = "failed"
STATS = "stats"
WORKERS = "workers"
FINALIZED_KEY = "finalized.json"
DATASET_CARD_KEY = "README.md"
WEBDATASET = "webdataset"
GALLERY = "gallery"
DUPLICATES_KEY = "duplicates.parquet"
ATTEMPTS = "attempts"
EMBEDDINGS = "embeddings"


_JOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_PART = re.compile(r"part-(\d{6,})\.(parquet|json)$")
_ATTEMPT_ID = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,99}")


def check_job_name(name: str) -> str:
    """The job name if it is safe to use in keys, else a :class:`UserError`."""
    if not _JOB_NAME.fullmatch(name) or ".." in name:
        raise UserError(
            f"invalid job name {name!r}: use 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def part_name(shard: int) -> str:
    """``part-000042`` for shard 42 (shards count from 1)."""
    if shard < 1:
        raise ValueError(f"shard ids start at 1, got {shard}")
    return f"part-{shard:06d}"


def manifest_key(shard: int) -> str:
    return f"{MANIFESTS}/{part_name(shard)}.parquet"


def metadata_key(shard: int) -> str:
    return f"{METADATA}/{part_name(shard)}.parquet"


def failed_key(shard: int) -> str:
    return f"{FAILED}/{part_name(shard)}.json"


def stats_key(shard: int) -> str:
    return f"{STATS}/{part_name(shard)}.json"


def attempts_prefix(shard: int) -> str:
    """Where the attempt records of a shard live: one object per delivery."""
    return f"{ATTEMPTS}/{part_name(shard)}/"


def new_attempt_id() -> str:
    """A unique attempt id that sorts by time: ``20250102T030405.123456Z-1a2b3c4d``."""
    now = dt.datetime.now(dt.UTC)
    return f"{now:%Y%m%dT%H%M%S.%f}Z-{secrets.token_hex(4)}"


def _check_attempt_id(attempt_id: str) -> str:
    if not _ATTEMPT_ID.fullmatch(attempt_id) or ".." in attempt_id:
        raise ValueError(f"invalid attempt id {attempt_id!r}")
    return attempt_id


def attempt_key(shard: int, attempt_id: str) -> str:
    return f"{attempts_prefix(shard)}{_check_attempt_id(attempt_id)}.json"


#: File extension of each image format, as it appears in image keys.
IMAGE_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp", "jxl": "jxl"}


def image_name(row_id: int, ext: str) -> str:
    """``000000000042.png`` for global row 42."""
    return f"{row_id:012d}.{ext}"


def attempt_images_prefix(shard: int, attempt_id: str) -> str:
    """``images/part-000001/<attempt-id>/``: the images one attempt of a shard wrote.

    Each attempt writes only under its own folder, so no attempt can overwrite another's
    images: the committed metadata always describes exactly the bytes at its keys, whatever
    a losing attempt does before or after the commit (``producer gc`` removes what losers
    leave behind).
    """
    _check_attempt_id(attempt_id)
    return f"{IMAGES}/{part_name(shard)}/{attempt_id}/"


def image_key(shard: int, attempt_id: str, row_id: int, ext: str) -> str:
    """``images/part-000001/<attempt-id>/000000000042.png``."""
    return f"{attempt_images_prefix(shard, attempt_id)}{image_name(row_id, ext)}"


# How a job stores its images: one object per image ("files"), or one object per shard
# attempt holding all its images: a WebDataset tar or a parquet with an Image column.
LAYOUT_FILES = "files"
LAYOUT_WEBDATASET = "webdataset"
LAYOUT_PARQUET = "parquet"
LAYOUTS = (LAYOUT_FILES, LAYOUT_WEBDATASET, LAYOUT_PARQUET)
_LAYOUT_EXTENSIONS = {LAYOUT_WEBDATASET: "tar", LAYOUT_PARQUET: "parquet"}


def shard_object_key(shard: int, attempt_id: str, layout: str) -> str:
    """``images/part-000001/<attempt-id>.tar`` (or ``.parquet``): one attempt's images in one object.

    Keyed per attempt like the files layout's folders: a losing attempt's object is never
    the one the committed metadata names, and ``producer gc`` removes it.
    """
    return f"{IMAGES}/{part_name(shard)}/{_check_attempt_id(attempt_id)}.{_LAYOUT_EXTENSIONS[layout]}"


_IMAGE_KEY = re.compile(r"^images/part-(\d{6,})/([^/]+)/\d{12,}(\.control)?\.[a-z]+$")
_SHARD_OBJECT_KEY = re.compile(r"^images/part-(\d{6,})/([^/]+)\.(tar|parquet)$")


def image_key_attempt(key: str) -> tuple[int, str] | None:
    """(shard, attempt id) of an attempt-scoped image key or shard object; None for any other key."""
    m = _IMAGE_KEY.match(key) or _SHARD_OBJECT_KEY.match(key)
    if m is None or (m.re is _SHARD_OBJECT_KEY and m.group(2) == part_name(int(m.group(1)))):
        return None  # images/part-N/part-N.json and the like are not an attempt's
    return int(m.group(1)), m.group(2)


def dataset_metadata_key(index: int = 1, files: int = 1) -> str:
    """``metadata.parquet``, or ``metadata-00002-of-00003.parquet`` when split in several files."""
    return "metadata.parquet" if files == 1 else f"metadata-{index:05d}-of-{files:05d}.parquet"


def embeddings_key(shard: int, attempt_id: str) -> str:
    """``embeddings/part-000001/<attempt-id>.parquet``: one attempt's CLIP image embeddings
    (``--embeddings``), written before its commit and keyed per attempt like its images; the
    committed metadata's ``attempt_id`` names the one that counts."""
    return f"{EMBEDDINGS}/{part_name(shard)}/{_check_attempt_id(attempt_id)}.parquet"


_EMBEDDINGS_KEY = re.compile(r"^embeddings/part-(\d{6,})/([^/]+)\.parquet$")


def embeddings_key_attempt(key: str) -> tuple[int, str] | None:
    """(shard, attempt id) of an attempt's embeddings object; None for any other key."""
    m = _EMBEDDINGS_KEY.match(key)
    return (int(m.group(1)), m.group(2)) if m else None


#: ``near_duplicates.parquet`` at the job root: one row per image that nearly repeats an image
#: of a smaller row id (the one kept), with their cosine similarity.
NEAR_DUPLICATES_KEY = "near_duplicates.parquet"


def json_part_key(shard: int) -> str:
    """DiffusionDB's per-part prompt file, next to the part's images."""
    return f"{IMAGES}/{part_name(shard)}/{part_name(shard)}.json"


def webdataset_key(shard: int) -> str:
    return f"{WEBDATASET}/{part_name(shard)}.tar"


def shard_of_key(key: str) -> int | None:
    """The shard id in a manifest, metadata or failed key; None for other keys."""
    m = _PART.search(key)
    return int(m.group(1)) if m else None


def condition_images_key(shard: int) -> str:
    """``manifests/part-000001.images.parquet``: image bytes a source held, once per shard."""
    return f"{MANIFESTS}/{part_name(shard)}.images.parquet"


def control_name(row_id: int) -> str:
    """``000000000042.control.png``: a row's control map (always PNG: maps are exact), stored
    beside its image: in the attempt's folder (files), as a member of its tar (webdataset), or
    in the ``control_image`` column of its parquet (parquet)."""
    return f"{row_id:012d}.control.png"
