"""Scores and embeddings added to finished jobs as a worker with ``--score``/``--embeddings`` writes
them, for the tests of what uses them (finalize --where, dedupe, report, gallery --sort).

:func:`add_scores` plays the worker's part on a job a real worker finished, where a test needs
chosen values (scores that order rows a known way, a near copy planted in place of an image): it
records ``scoring`` in ``job.json``, rewrites each committed metadata parquet with the given score
values (the job's own schema: the columns exist, null until set), and, with ``embeddings=True``,
writes each shard's ``embeddings/part-N/<attempt-id>.parquet`` (``contract.embeddings_schema``) for
the committed ``attempt_id``, the L2-normalised image embeddings of a real (tiny, random-weight)
CLIP vision model through ``transformers``, computed from the stored images. What the worker's
own ``--score``/``--embeddings`` write, and ``producer dedupe`` on it, are tested in
tests/test_scores.py.
"""

from __future__ import annotations

import functools
import io
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from fewstep.contract import (
    JOB_SPEC_KEY,
    embeddings_key,
    embeddings_schema,
    job_layout,
    job_metadata_schema,
    metadata_key,
)
from fewstep.storage import Store, read_table
from producer.images import read_images
from producer.progress import read_progress


@functools.cache
def tiny_clip():
    """A random-weight CLIP (ViT, 64 px) and its image processor, the same in every run.

    At transformers' default initialisation a random CLIP gives every image nearly the same
    embedding (its class token barely attends to the patches: cosine 0.999 between unrelated
    tiny-model images); ten times larger initial weights make the attention, and so the
    embedding, depend on the image (unrelated images: at most ~0.9; a copy with every pixel
    moved by up to 3 levels: ~0.9997).
    """
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "vocab_size": 1000},
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "image_size": 64, "patch_size": 8,
                       "initializer_factor": 10.0},
        projection_dim=32,
        initializer_factor=10.0,
    )  # fmt: skip
    processor = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    return CLIPModel(config).eval(), processor


def embed(images: list[bytes]) -> np.ndarray:
    """L2-normalised CLIP image embeddings (float32) of encoded images."""
    import torch

    model, processor = tiny_clip()
    pixels = processor(images=[Image.open(io.BytesIO(b)).convert("RGB") for b in images], return_tensors="pt")
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels["pixel_values"])
    features = getattr(features, "pooler_output", features)  # transformers 5 may return an output object
    features = features / features.norm(dim=-1, keepdim=True)
    return features.numpy().astype(np.float32)


def perturbed(image: bytes, amount: int = 3, seed: int = 0) -> bytes:
    """The image with every pixel value moved by at most ``amount`` (a near copy), as PNG."""
    pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"), dtype=np.int16)
    noise = np.random.default_rng(seed).integers(-amount, amount + 1, pixels.shape)
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _write_parquet(store: Store, key: str, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    store.put(key, sink.getvalue().to_pybytes())


def add_scores(
    store: Store,
    scores: dict[str, dict[int, float | None]] | None = None,
    *,
    embeddings: bool = False,
    images: dict[int, bytes] | None = None,
) -> dict[int, np.ndarray]:
    """Give a finished job ``scores`` (column → row id → value; rows not named stay null) and, with
    ``embeddings``, its embeddings objects (``images``: row id → bytes embedded in place of that
    row's stored image, to plant a near copy). Returns the embeddings written, by row id."""
    scores = scores or {}
    progress = read_progress(store)
    spec = progress.spec
    spec["scoring"] = {
        "scorers": {name: {"planted_by": "tests/scored_jobs.py"} for name in scores},
        "embeddings": embeddings,
    }
    store.put(JOB_SPEC_KEY, json.dumps(spec, indent=2).encode())
    schema = job_metadata_schema(spec)
    written: dict[int, np.ndarray] = {}
    for shard in sorted(progress.committed):
        table = read_table(store, metadata_key(shard))
        rows = table.column("row_id").to_pylist()
        for column, values in scores.items():
            at = schema.get_field_index(column)
            table = table.set_column(at, column, pa.array([values.get(r) for r in rows], pa.float32()))
        _write_parquet(store, metadata_key(shard), table.cast(schema))
        if not embeddings:
            continue
        listed = table.to_pylist()
        stored = read_images(store, listed, job_layout(spec))
        vectors = embed([(images or {}).get(r, data) for r, data in zip(rows, stored, strict=True)])
        written.update(zip(rows, vectors, strict=True))
        attempt: Any = listed[0]["attempt_id"]
        dim = vectors.shape[1]
        column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.astype(np.float16).ravel()), dim)
        out = pa.table(
            {"row_id": pa.array(rows, pa.int64()), "embedding": column}, schema=embeddings_schema(dim)
        )
        _write_parquet(store, embeddings_key(shard, attempt), out)
    return written
