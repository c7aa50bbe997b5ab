"""The parquet schemas: manifests, metadata (by format version), the parquet layout's images
file, embeddings and near duplicates; one explicit schema for every shard of a job."""

from __future__ import annotations

import json
import re
from typing import Any

import pyarrow as pa

from fewstep import UserError

# 2: images are keyed by attempt (images/part-N/<attempt-id>/...); metadata has attempt_id.
# 3: layouts (files, webdataset, parquet); metadata has image_offset and image_row.
# 4: scores (clip_score, aesthetic, nsfw_score) and conditioning (cond_*, control_*) columns;
#    job.json may hold "scoring" and "conditioning".
# 5: best-of-K columns (candidate, rank_score, candidate_* lists) and preference scores
#    (pickscore, hpsv2); job.json may hold
#    "candidates" and "rounds" (producer topup).
FORMAT_VERSION = 5


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
        # Preference scores (format 5): pickscore, PickScore v1's logit scale x cos(image, prompt)
        # (about 15-25); hpsv2, HPS v2.1's cos(image, prompt) (about 0.2-0.35).
        pa.field("pickscore", pa.float32()),
        pa.field("hpsv2", pa.float32()),
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
SCORE_COLUMNS = ("clip_score", "aesthetic", "nsfw_score", "pickscore", "hpsv2")
#: Score columns added by format version 5 (the others came with version 4).
PREFERENCE_COLUMNS = ("pickscore", "hpsv2")
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

#: Best-of-K (``--candidates K --rank-by EXPR``; null without): the stored candidate's index,
#: its rank value, and each candidate's seed, rank value and scores, in candidate order, so a
#: choice can be audited and reproduced; ``seed`` is the stored image's own seed.
CANDIDATE_SCORE_PREFIX = "candidate_"
METADATA_CORE = pa.schema(
    [
        *METADATA_CORE,
        pa.field("candidate", pa.uint16()),
        pa.field("rank_score", pa.float32()),
        pa.field("candidate_seeds", pa.list_(pa.uint32())),
        pa.field("candidate_rank_scores", pa.list_(pa.float32())),
        *(
            pa.field(CANDIDATE_SCORE_PREFIX + f.name, pa.list_(pa.float32()))
            for f in METADATA_CORE
            if f.name in SCORE_COLUMNS
        ),
    ]
)

#: Columns added by format version 5 (best-of-K).
CANDIDATE_COLUMNS = (
    "candidate",
    "rank_score",
    *(f.name for f in METADATA_CORE if f.name.startswith(CANDIDATE_SCORE_PREFIX)),
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


def manifest_schema(fields: dict[str, str], conditioned: bool = False) -> pa.Schema:
    """The manifest schema of a job whose source carries ``fields`` (``conditioned``: the job
    has a conditioning image per row, :data:`CONDITION_MANIFEST`)."""
    schema = _with_fields(MANIFEST_CORE, fields)
    return pa.schema(list(schema) + list(CONDITION_MANIFEST)) if conditioned else schema


#: The parquet layout's column holding a row's control map (``--save-control``).
CONTROL_IMAGE_COLUMN = "control_image"


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
    if format_version < 5:
        dropped += CANDIDATE_COLUMNS + PREFERENCE_COLUMNS
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
