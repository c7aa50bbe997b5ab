"""Image-conditioned jobs for the worker's tests, written as ``producer enqueue --image-column``
writes them (docs/CONDITIONING.md "Inputs"), without the producer's image checks.

The worker must cope with rows the producer would refuse at enqueue: a file that is removed,
cut short or replaced after the job was enqueued, a digest that no longer matches. This helper
writes such jobs directly: the spec from the producer's own ``build_spec`` with the
``conditioning`` block, manifests of the contract's conditioned schema
(``manifest_schema(fields, conditioned=True)``) with seeds derived as ``producer.sharding``
derives them, bytes the source held once per shard in ``condition_images_key(shard)``, and the
shards sent with the producer's ``send_job_shards``. The producer's own path, enqueue to worker,
is tested in tests/test_conditioning_inputs.py (chained jobs and a CSV of local photographs).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from fewstep import __version__
from fewstep.contract import (
    IMAGE_STRUCT,
    JOB_SPEC_KEY,
    condition_images_key,
    derive_seeds,
    manifest_key,
    manifest_schema,
    queue_name,
)
from fewstep.presets import resolve_model
from fewstep.settings import defaults, queue_prefix
from fewstep.storage import open_store
from producer.conditioning import ConditioningOptions
from producer.enqueue import JobOptions, build_spec, send_job_shards
from producer.selection import Selection, Selector
from producer.sharding import manifest_bytes
from producer.sources import PromptSource


@dataclass
class Row:
    """A prompt and its conditioning image: a reference (``ref``: file://, s3://, with a range
    or a parquet row), or the image's bytes when the source holds them (``data``)."""

    prompt: str
    ref: str | None = None
    source: str | None = None  # what the row named; defaults to ref
    offset: int | None = None
    length: int | None = None
    row: int | None = None
    sha256: str | None = None
    data: bytes | None = None


class _Prompts(PromptSource):
    name = "conditioned-test"

    def __init__(self, prompts: list[str]):
        super().__init__()
        self.prompts = prompts

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "rows": len(self.prompts), "fields": {}}


def enqueue_conditioned(
    output: str,
    job: str,
    model: str,
    rows: list[Row],
    *,
    condition: str,
    shard_size: int,
    width: int,
    height: int,
    layout: str = "files",
    image_format: str = "png",
    resize: str = "center-crop",
    strength: float | None = None,
    controlnet_scale: float | None = None,
    canny: tuple[int, int] | None = None,
    save_control: bool = False,
) -> dict[str, Any]:
    """Write the job (spec, manifests, sidecars) and send its shards; returns its spec."""
    preset = resolve_model(model)
    init = condition == "init"
    opts = JobOptions(
        job=job, output=output, model=model, shard_size=shard_size, width=width, height=height,
        layout=layout, image_format=image_format,
        steps=preset["img2img"].get("steps") if init else None,
        conditioning=ConditioningOptions(image_column="image", condition=condition),
    )  # fmt: skip
    source = _Prompts([r.prompt for r in rows])
    chars = int(defaults()["producer"]["max_prompt_chars"])
    selector = Selector(Selection(), {}, max_prompt_chars=chars, log_duplicates=False)
    spec = build_spec(source, opts, selector)
    control = preset.get("control") or {}
    spec["conditioning"] = {
        "condition": condition,
        "image_column": "image",
        "image_root": None,
        "source_job": None,
        "resize": resize,
        "strength": (strength if strength is not None else preset["img2img"]["strength"]) if init else None,
        "controlnet_scale": None if init else (controlnet_scale or float(control.get("scale", 1.0))),
        "canny": {"low": canny[0], "high": canny[1]} if condition == "canny" else None,
        "save_control": save_control,
    }
    store = open_store(output).child(job)
    spec["job_url"] = store.url
    shards = (len(rows) + shard_size - 1) // shard_size
    schema = manifest_schema({}, conditioned=True)
    for shard in range(1, shards + 1):
        lo, hi = (shard - 1) * shard_size, min(shard * shard_size, len(rows))
        part = rows[lo:hi]
        held = [i for i, r in enumerate(part) if r.data is not None]
        if held:  # the source's own bytes, once per shard, next to the manifest
            sidecar = pa.table(
                {
                    "row_id": pa.array([lo + i for i in held], pa.int64()),
                    "image": pa.array([{"bytes": part[i].data, "path": None} for i in held], IMAGE_STRUCT),
                }
            )
            store.put(condition_images_key(shard), manifest_bytes(sidecar))
        sidecar_row = {i: n for n, i in enumerate(held)}
        columns = {
            "row_id": list(range(lo, hi)),
            "source_row": list(range(lo, hi)),
            "prompt": [r.prompt for r in part],
            "seed": derive_seeds(spec["seed"], np.arange(lo, hi)).tolist(),
            "cond_ref": [condition_images_key(shard) if r.data is not None else r.ref for r in part],
            "cond_offset": [r.offset for r in part],
            "cond_length": [r.length for r in part],
            "cond_row": [sidecar_row[i] if r.data is not None else r.row for i, r in enumerate(part)],
            "cond_sha256": [r.sha256 for r in part],
            "cond_source": [r.source or r.ref or f"row {lo + i}" for i, r in enumerate(part)],
        }
        store.put(manifest_key(shard), manifest_bytes(pa.Table.from_pydict(columns, schema=schema)))
    spec.update(
        queue=queue_name(queue_prefix(), spec["model"]["name"]),
        counts={"prompts": len(rows), "shards": shards, **selector.counts, "rows_read": len(rows)},
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        tool={"name": "fewstep", "version": __version__},
    )
    assert store.put(JOB_SPEC_KEY, json.dumps(spec, indent=2).encode(), if_absent=True)
    send_job_shards(spec, range(1, shards + 1))
    return spec
