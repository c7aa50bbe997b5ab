"""The contract the producer and the worker share.

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
                                              (layout "files", the default)
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
import json
import logging
import re
import secrets
import tarfile
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import pyarrow as pa

from fewstep import UserError

log = logging.getLogger("fewstep.contract")

# 2: images are keyed by attempt (images/part-N/<attempt-id>/...); metadata has attempt_id.
# 3: layouts (files, webdataset, parquet); metadata has image_offset and image_row.
# 4: scores (clip_score, aesthetic, nsfw_score) and conditioning (cond_*, control_*) columns;
#    job.json may hold "scoring" and "conditioning".
FORMAT_VERSION = 4
TASK_NAME = "fewstep.generate_shard"

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

#: The largest shard id (and attempt round) a message may carry: far above any real job.
MAX_SHARD = 10**9

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


def parse_time(value: Any) -> dt.datetime | None:
    """An ISO-8601 time (naive ones taken as UTC), or None."""
    if not isinstance(value, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def heartbeat_age(beat: dict[str, Any], now: dt.datetime) -> float | None:
    """Seconds since a heartbeat object was written; None when it has no readable time."""
    seen = parse_time(beat.get("last_seen"))
    return (now - seen).total_seconds() if seen else None


def heartbeat_live(beat: dict[str, Any], now: dt.datetime, stale_after_intervals: float) -> bool:
    """Whether a heartbeat belongs to a worker still running: recent (within a few of its own
    intervals) and not saying ``stopped``. The one rule for status and attempt liveness."""
    age = heartbeat_age(beat, now)
    interval = beat.get("interval_s") if isinstance(beat.get("interval_s"), int | float) else 5.0
    return age is not None and age <= stale_after_intervals * interval and beat.get("state") != "stopped"


def heartbeat_key(worker_id: str) -> str:
    """A worker's heartbeat object; the id is reduced to characters safe in keys."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "-", worker_id).strip(".-")[:200] or "worker"
    return f"{WORKERS}/{safe}.json"


#: File extension of each image format, as it appears in image keys.
IMAGE_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


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


def job_layout(spec: dict[str, Any]) -> str:
    """The layout a job spec records ("files" for jobs written before layouts existed)."""
    return spec.get("layout") or LAYOUT_FILES


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


# WebDataset samples: per row, ``<row>.<ext>`` (the image), ``<row>.json`` (its metadata row)
# and ``<row>.txt`` (the prompt, UTF-8), in that order, in the worker's tars (webdataset
# layout) and in those ``producer finalize --webdataset`` writes.
TAR_BLOCK = 512
TAR_END = bytes(2 * TAR_BLOCK)  # the end-of-archive marker


def _tar_member(name: str, data: bytes, mtime: float) -> bytes:
    # Fixed owner and mode, so the same rows always give the same tar bytes.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(mtime), 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    return header + data + bytes(-len(data) % TAR_BLOCK)


def webdataset_sample(row: dict[str, Any], image: bytes, control: bytes | None = None) -> bytes:
    """The tar members of one metadata row's sample; the image's data starts
    :data:`TAR_BLOCK` bytes in (a member name of up to 100 bytes has a one-block header).
    ``control``: the row's control map (``--save-control``), a member right after the image
    (:func:`control_name`), its data at :func:`tar_control_offset`."""
    stem = row["image_name"].split(".", 1)[0]
    created = row.get("created_at")
    if isinstance(created, str):
        created = parse_time(created)
    mtime = created.timestamp() if isinstance(created, dt.datetime) else 0
    values = {k: v.isoformat() if isinstance(v, dt.datetime) else v for k, v in row.items()}
    meta = json.dumps(values, ensure_ascii=False).encode()
    return (
        _tar_member(row["image_name"], image, mtime)
        + (_tar_member(control_name(row["row_id"]), control, mtime) if control is not None else b"")
        + _tar_member(f"{stem}.json", meta, mtime)
        + _tar_member(f"{stem}.txt", row["prompt"].encode(), mtime)
    )


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


# --- near duplicates (``producer dedupe``) -------------------------------------------

#: ``near_duplicates.parquet`` at the job root: one row per image that nearly repeats an image
#: of a smaller row id (the one kept), with their cosine similarity.
NEAR_DUPLICATES_KEY = "near_duplicates.parquet"
#: The column ``producer finalize`` adds once the job has been deduplicated: the kept row a
#: row nearly repeats; null for kept rows.
NEAR_DUPLICATE_COLUMN = "near_duplicate_of"
NEAR_DUPLICATES_SCHEMA = pa.schema(
    [
        pa.field("row_id", pa.int64(), nullable=False),
        pa.field("duplicate_of", pa.int64(), nullable=False),
        pa.field("similarity", pa.float32(), nullable=False),
    ]
)


def json_part_key(shard: int) -> str:
    """DiffusionDB's per-part prompt file, next to the part's images."""
    return f"{IMAGES}/{part_name(shard)}/{part_name(shard)}.json"


def webdataset_key(shard: int) -> str:
    return f"{WEBDATASET}/{part_name(shard)}.tar"


# The state of an attempt record. A worker writes "running" when a delivery starts and
# overwrites it with the outcome; a record still "running" when the shard comes back was
# abandoned (its worker was killed or lost). `producer retry` writes "retry_requested",
# after which earlier failures no longer count.
ATTEMPT_RUNNING = "running"
ATTEMPT_COMMITTED = "committed"
ATTEMPT_SUPERSEDED = "superseded"  # another attempt committed first; this one stopped
ATTEMPT_INTERRUPTED = "interrupted"  # the worker shut down; the shard went back to the queue
ATTEMPT_STORAGE_UNAVAILABLE = "storage_unavailable"  # tried again later, not counted as a failure
ATTEMPT_ERROR = "error"
ATTEMPT_RETRY_REQUESTED = "retry_requested"


def shard_of_key(key: str) -> int | None:
    """The shard id in a manifest, metadata or failed key; None for other keys."""
    m = _PART.search(key)
    return int(m.group(1)) if m else None


def queue_name(prefix: str, model: str) -> str:
    """Each model has its own queue, so a worker only receives shards it can run."""
    return f"{prefix}.{model}"


@dataclass(frozen=True)
class ShardMessage:
    """The body of one Celery task: references only."""

    job_url: str
    shard: int
    manifest_key: str
    attempt: int = 1

    def to_kwargs(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> ShardMessage:
        """The message of a task's kwargs; :class:`ValueError` naming what is wrong if malformed."""
        if not isinstance(kwargs, dict):
            raise ValueError(f"kwargs are a {type(kwargs).__name__}, not a dict")
        missing = [k for k in ("job_url", "shard", "manifest_key") if k not in kwargs]
        if missing:
            raise ValueError(f"kwargs lack {', '.join(missing)}")
        job_url, shard = kwargs["job_url"], kwargs["shard"]
        manifest, attempt = kwargs["manifest_key"], kwargs.get("attempt", 1)
        for name, value in (("job_url", job_url), ("manifest_key", manifest)):
            if not isinstance(value, str) or not value or len(value) > 2048:
                raise ValueError(f"{name} is not a non-empty string of at most 2048 characters")
        if not job_url.startswith(("s3://", "file:///")):  # what enqueue writes: never a relative path
            raise ValueError("job_url is neither s3://... nor file:///...")
        for name, value in (("shard", shard), ("attempt", attempt)):
            # bool is an int in Python; JSON gives true/false for it.
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_SHARD:
                raise ValueError(f"{name} is not an integer from 1 to {MAX_SHARD}")
        return cls(job_url, shard, manifest, attempt)

    @classmethod
    def parse(cls, kwargs: Any) -> ShardMessage | None:
        """The message of a task's kwargs, or None (logged at debug level) if malformed."""
        try:
            return cls.from_kwargs(kwargs)
        except ValueError as e:
            log.debug("malformed shard message skipped: %s", e)
            return None

    @property
    def task_id(self) -> str:
        """Deterministic, so a queued shard can be recognised without reading its body."""
        return f"{self.job_url}#{part_name(self.shard)}#{self.attempt}"


# --- seeds -----------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(seed: int, values: np.ndarray | list[int]) -> np.ndarray:
    """uint64 SplitMix64 of ``seed * golden + value``: a bijection of ``value`` for a fixed seed.

    Vectorised, so 14M values take well under a second.
    """
    x = np.asarray(values, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * _GOLDEN + x
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def derive_seeds(job_seed: int, source_rows: np.ndarray | list[int]) -> np.ndarray:
    """uint32 seeds from (job seed, source row): the same spec always gives the same seeds."""
    return (mix64(job_seed, source_rows) & np.uint64(0xFFFFFFFF)).astype(np.uint32)


# --- parquet schemas ---------------------------------------------------------

# Types a source field may have; jobs declare their fields by these names.
FIELD_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "timestamp": pa.timestamp("us", tz="UTC"),
    "list<string>": pa.list_(pa.string()),
}

MANIFEST_CORE = pa.schema(
    [
        pa.field("row_id", pa.int64(), nullable=False),
        pa.field("source_row", pa.int64(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("seed", pa.uint32(), nullable=False),
    ]
)

# DiffusionDB's columns first (part_id widened to uint32: a job can exceed 65,535
# shards), then what a dataset builder needs.
METADATA_CORE = pa.schema(
    [
        pa.field("image_name", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("part_id", pa.uint32()),
        pa.field("seed", pa.uint32()),
        pa.field("step", pa.uint16()),
        pa.field("cfg", pa.float32()),
        pa.field("sampler", pa.string()),
        pa.field("width", pa.uint16()),
        pa.field("height", pa.uint16()),
        pa.field("model", pa.string()),
        pa.field("model_revision", pa.string()),
        pa.field("row_id", pa.int64()),
        pa.field("image_key", pa.string()),
        pa.field("format", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("bytes", pa.int64()),
        pa.field("nsfw", pa.bool_()),
        # Every token the (first) text encoder's tokenizer makes of the whole prompt, untruncated,
        # its begin and end tokens included (CLIP adds both, T5 only the end one); 0 without
        # a tokenizer. `truncated`: prompt_tokens exceeds the tokenizer's model_max_length,
        # which counts those tokens too (CLIP: 77, so at most 75 tokens of text), so the
        # text encoder saw a cut prompt; for LLM text encoders cut at the preset's
        # max_sequence_length, that length less the tokens of the pipeline's prompt template.
        pa.field("prompt_tokens", pa.int32()),
        pa.field("truncated", pa.bool_()),
        pa.field("source", pa.string()),
        pa.field("source_row", pa.int64()),
        pa.field("gen_ms", pa.float32()),
        pa.field("worker", pa.string()),
        pa.field("attempt", pa.uint16()),  # the round (1 + `producer retry`s), not a delivery count
        pa.field("attempt_id", pa.string()),  # the delivery that made the images (their key folder)
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
        # How the bytes were made: format settings, encoder, and the worker's speed
        # options that change pixels (precision, VAE).
        pa.field("format_quality", pa.uint8()),  # JPEG/WebP quality; null for PNG
        pa.field("png_level", pa.uint8()),  # PNG compression level; null otherwise
        pa.field("encoder", pa.string()),  # e.g. pillow-11.0.0, nvjpeg-torchvision-0.23.0
        pa.field("dtype", pa.string()),
        pa.field("vae", pa.string()),  # "default", or the tiny VAE that decoded the latents
        # Where in `image_key` the image lies when one object holds a shard's images (null
        # for the files layout): for webdataset, the byte offset of the image member's data in
        # the tar (a ranged GET of `bytes` bytes from there is the image); for parquet, the
        # image's row in that parquet.
        pa.field("image_offset", pa.int64()),
        pa.field("image_row", pa.int64()),
        # Scores computed on the worker from the decoded image (``--score``); null when the
        # job did not ask for that scorer. clip_score: 100 * max(cos(image, prompt), 0);
        # aesthetic: the LAION improved aesthetic predictor (about 1-10); nsfw_score: 0-1.
        pa.field("clip_score", pa.float32()),
        pa.field("aesthetic", pa.float32()),
        pa.field("nsfw_score", pa.float32()),
        # Image-conditioned jobs (``--image-column``, ``enqueue job``); null for text-only jobs.
        pa.field("cond_key", pa.string()),  # where the conditioning image came from (path, s3 key, row)
        pa.field("cond_sha256", pa.string()),  # sha256 of the conditioning image's source bytes
        pa.field("condition", pa.string()),  # init | canny | sketch | as-is
        pa.field("strength", pa.float32()),  # img2img strength (init)
        pa.field("controlnet_scale", pa.float32()),  # ControlNet conditioning scale
        pa.field("resize", pa.string()),  # center-crop | pad | stretch
        # With --save-control: the control map the model saw, stored like the image (same
        # layout rules): its key, and for one-object layouts where in that object it lies.
        pa.field("control_key", pa.string()),
        pa.field("control_offset", pa.int64()),
        pa.field("control_bytes", pa.int64()),
    ]
)

#: Columns added by format version 3: jobs of version 2 have metadata without them.
LAYOUT_COLUMNS = ("image_offset", "image_row")
#: Columns added by format version 4: jobs of older versions have metadata without them.
SCORE_COLUMNS = ("clip_score", "aesthetic", "nsfw_score")
CONDITION_COLUMNS = (
    "cond_key",
    "cond_sha256",
    "condition",
    "strength",
    "controlnet_scale",
    "resize",
    "control_key",
    "control_offset",
    "control_bytes",
)

#: The image column of the parquet layout: HF datasets' ``Image`` feature's storage type.
IMAGE_COLUMN = "image"
IMAGE_STRUCT = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])

# Image-conditioned jobs: where each row's conditioning image is, by reference (a manifest
# never holds image bytes). ``cond_ref`` is one of
#   - ``file:///abs/path.png`` or ``s3://bucket/key``: the whole object is the image;
#   - a key relative to the job root (``manifests/part-000001.images.parquet``): the bytes the
#     source itself held (a parquet ``{"bytes", "path"}`` column), stored once per shard next
#     to the manifest, row ``cond_row`` of its ``image`` column;
#   - another job's image object (``enqueue job``): ``s3://.../images/part-N/<attempt>.tar``
#     with ``cond_offset``/``cond_length`` (a ranged read), or ``.../<attempt>.parquet`` with
#     ``cond_row``, or a files-layout image key.
# ``cond_sha256`` is the expected sha256 of the image's bytes where the source knows it (an
# earlier job's metadata), else null. ``cond_source`` is what the row named (a path as
# written, before --image-root), for the metadata's ``cond_key``.
CONDITION_MANIFEST = (
    pa.field("cond_ref", pa.string()),
    pa.field("cond_offset", pa.int64()),
    pa.field("cond_length", pa.int64()),
    pa.field("cond_row", pa.int64()),
    pa.field("cond_sha256", pa.string()),
    pa.field("cond_source", pa.string()),
)


RESERVED_NAMES = (
    frozenset(MANIFEST_CORE.names)
    | frozenset(METADATA_CORE.names)
    | frozenset(f.name for f in CONDITION_MANIFEST)
    | {IMAGE_COLUMN, "control_image"}
)


def check_fields(fields: dict[str, str]) -> dict[str, str]:
    """Validate a job's source fields (name → type name); returns them unchanged."""
    for name, type_name in fields.items():
        if name in RESERVED_NAMES:
            raise UserError(f"source field {name!r} clashes with a metadata column; rename it")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]{0,127}", name):
            raise UserError(f"source field name {name!r} is not a plain identifier")
        if type_name not in FIELD_TYPES:
            raise UserError(f"source field {name!r} has unsupported type {type_name!r}")
    return fields


def _with_fields(core: pa.Schema, fields: dict[str, str]) -> pa.Schema:
    extra = [pa.field(name, FIELD_TYPES[t]) for name, t in check_fields(fields).items()]
    return pa.schema(list(core) + extra)


def condition_images_key(shard: int) -> str:
    """``manifests/part-000001.images.parquet``: image bytes a source held, once per shard."""
    return f"{MANIFESTS}/{part_name(shard)}.images.parquet"


def manifest_schema(fields: dict[str, str], conditioned: bool = False) -> pa.Schema:
    """The manifest schema of a job whose source carries ``fields`` (``conditioned``: the job
    has a conditioning image per row, :data:`CONDITION_MANIFEST`)."""
    schema = _with_fields(MANIFEST_CORE, fields)
    return pa.schema(list(schema) + list(CONDITION_MANIFEST)) if conditioned else schema


#: The parquet layout's column holding a row's control map (``--save-control``).
CONTROL_IMAGE_COLUMN = "control_image"


def control_name(row_id: int) -> str:
    """``000000000042.control.png``: a row's control map (always PNG: maps are exact), stored
    beside its image: in the attempt's folder (files), as a member of its tar (webdataset), or
    in the ``control_image`` column of its parquet (parquet)."""
    return f"{row_id:012d}.control.png"


# --- saved control maps (--save-control) --------------------------------------------------


def job_saves_control(spec: dict[str, Any]) -> bool:
    """Whether a job stores each row's control map beside its image (``--save-control``)."""
    return bool((spec.get("conditioning") or {}).get("save_control"))


def tar_control_offset(image_offset: int, image_bytes: int) -> int:
    """Where a control map's data lies in a webdataset tar: its member (one header block)
    follows the image member, whose data starts at ``image_offset`` and is padded to blocks."""
    return image_offset + image_bytes + (-image_bytes % TAR_BLOCK) + TAR_BLOCK


def embeddings_schema(dim: int) -> pa.Schema:
    """An embeddings object: each row's L2-normalised CLIP image embedding, float16."""
    return pa.schema(
        [
            pa.field("row_id", pa.int64(), nullable=False),
            pa.field("embedding", pa.list_(pa.float16(), dim), nullable=False),
        ]
    )


def metadata_schema(fields: dict[str, str], format_version: int = FORMAT_VERSION) -> pa.Schema:
    """The metadata schema of a job: identical in every shard of the job (``format_version``:
    the job's, so jobs written by an older version read with their own schema)."""
    dropped: tuple[str, ...] = ()
    if format_version < 4:
        dropped += SCORE_COLUMNS + CONDITION_COLUMNS
    if format_version < 3:
        dropped += LAYOUT_COLUMNS
    core = pa.schema([f for f in METADATA_CORE if f.name not in dropped])
    return _with_fields(core, fields)


def job_metadata_schema(spec: dict[str, Any]) -> pa.Schema:
    """The metadata schema of the job ``spec`` describes."""
    return metadata_schema(spec["source"].get("fields", {}), int(spec.get("format_version", FORMAT_VERSION)))


def images_parquet_schema(metadata: pa.Schema, control: bool = False) -> pa.Schema:
    """The parquet layout's images file: the ``image`` column (decoded as an ``Image`` by HF
    ``datasets``, as its schema metadata says), with ``control``: the ``control_image`` column
    (an ``Image`` too, ``--save-control``), followed by every metadata column."""
    images = [IMAGE_COLUMN, *([CONTROL_IMAGE_COLUMN] if control else [])]
    features = {"info": {"features": {name: {"_type": "Image"} for name in images}}}
    return pa.schema([*(pa.field(name, IMAGE_STRUCT) for name in images), *metadata]).with_metadata(
        {"huggingface": json.dumps(features)}
    )


# --- job spec ------------------------------------------------------------------

# The parts of job.json that define what a job produces. Two enqueues with equal
# identities are the same job (a resume); a different one under the same name is refused.
SPEC_IDENTITY_KEYS = (
    "format_version",
    "source",
    "model",
    "generation",
    "seed",
    "shard_size",
    "layout",
    "scoring",
    "conditioning",
)


def spec_identity(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: spec.get(k) for k in SPEC_IDENTITY_KEYS}


def shard_rows(spec: dict[str, Any], shard: int) -> int:
    """Rows in a shard: every shard is full but the last."""
    total, size = spec["counts"]["prompts"], spec["shard_size"]
    shards = spec["counts"]["shards"]
    if not 1 <= shard <= shards:
        raise ValueError(f"shard {shard} out of range 1..{shards}")
    return size if shard < shards else total - size * (shards - 1)


# --- per-shard stats ---------------------------------------------------------------


@dataclass
class ShardStats:
    """One committed shard's timings, stored as ``stats/part-N.json`` after its commit.

    Stage times overlap: ``encode_s`` and ``upload_s`` are summed over the pool's threads,
    so they can exceed ``seconds``. ``gpu_idle_fraction`` is the share of ``seconds`` in
    which the model ran no batch (of this shard or, ahead, of the next one).
    """

    job: str
    shard: int
    attempt: int
    worker: str
    model: str
    images: int
    batch_size: int  # the size the shard started with, for its resolution (fixed or measured)
    seconds: float  # wall time of the task, start to commit
    generate_s: float  # model time spent on this shard's batches
    encode_s: float
    encode_cpu_s: float  # CPU time of the encode calls (thread time)
    upload_s: float
    commit_s: float
    wait_s: float  # generation waiting for a free slot: storage or encoding slower than the model
    gpu_idle_fraction: float
    images_per_s: float
    max_batches_in_flight: int
    peak_batches_in_flight: int
    batches_ahead: int  # generated while the previous shard finished, before this one was delivered
    format: dict[str, Any]
    encoder: str
    speed: dict[str, Any]
    first_batch_at: str  # when its first batch began on the device (possibly ahead of started_at)
    started_at: str
    finished_at: str
    stats_version: int = 1
    # Out-of-memory recovery (absent from older stats): batches halved, and the smallest
    # size the shard then ran at (= batch_size when none ran out of memory).
    oom_retries: int = 0
    min_batch_size: int | None = None
    # Storage requests (absent from older stats): made for the shard's images (one per image
    # for the files layout; a few per shard for webdataset and parquet), and by the whole
    # worker process between the task's start and its commit (attempt records, checks,
    # commit, heartbeats, reading ahead included).
    image_requests: int = 0
    storage_requests: int = 0
    # Scoring (absent from older stats): device time spent scoring the shard's images
    # (--score, --embeddings), part of generate_s.
    score_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The stats object's JSON fields."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardStats:
        """Parse a stats object, ignoring keys a newer worker may add."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
