"""Enqueue a job: the job spec and shard manifests to storage, one task per shard to Redis.

Order matters: manifests first, then ``job.json``, then the tasks. A failing enqueue
therefore never leaves tasks for a job whose spec was not written, and an enqueue that
is re-run with the same spec resumes: it sends only shards that are neither committed
nor already queued.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from fewstep import UserError, __version__
from fewstep.contract import (
    FORMAT_VERSION,
    JOB_SPEC_KEY,
    ShardMessage,
    check_job_name,
    manifest_key,
    queue_name,
    spec_identity,
)
from fewstep.presets import check_generation, resolve_model
from fewstep.queue import celery_app, check_broker, pending_messages, redis_client, send_shards
from fewstep.settings import defaults, queue_prefix
from fewstep.storage import Store, open_store
from producer.progress import read_progress
from producer.sharding import ShardWriter, drop_empty, limit_batches
from producer.sources import PromptSource


@dataclass
class JobOptions:
    """What the user asked for on the command line (None: take the default)."""

    job: str
    output: str
    model: str
    shard_size: int | None = None
    seed: int | None = None
    limit: int | None = None
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    sampler: str | None = None
    image_format: str | None = None
    quality: int | None = None
    png_level: int | None = None


def _pick(flag, fallback):
    return fallback if flag is None else flag


def build_spec(source: PromptSource, opts: JobOptions) -> dict[str, Any]:
    """The job spec without counts: everything that defines what the job produces."""
    check_job_name(opts.job)
    preset = resolve_model(opts.model)
    out = defaults()["output"]
    shard_size = _pick(opts.shard_size, defaults()["producer"]["shard_size"])
    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, got {shard_size}")
    image_format = _pick(opts.image_format, out["format"])
    generation = {
        "steps": int(_pick(opts.steps, preset["steps"])),
        "guidance": float(_pick(opts.guidance, preset["guidance"])),
        "width": int(_pick(opts.width, preset["width"])),
        "height": int(_pick(opts.height, preset["height"])),
        "sampler": _pick(opts.sampler, preset.get("sampler")),
        "format": image_format,
    }
    check_generation(preset, generation)
    if image_format == "png":
        generation["png_level"] = int(_pick(opts.png_level, out["png_level"]))
    else:
        generation["quality"] = int(_pick(opts.quality, out["quality"]))
    selection = {"limit": opts.limit} if opts.limit is not None else {}
    return {
        "format_version": FORMAT_VERSION,
        "job": opts.job,
        "source": {**source.describe(), "selection": selection},
        "model": {
            "name": preset["name"],
            "kind": preset["kind"],
            "repo": preset.get("repo"),
            "revision": preset.get("revision"),
        },
        "generation": generation,
        "seed": int(_pick(opts.seed, defaults()["producer"]["seed"])),
        "shard_size": int(shard_size),
    }


def _selected_batches(source: PromptSource, limit: int | None, counts: dict[str, int]):
    def non_empty():
        for batch in source.batches():
            kept, dropped = drop_empty(batch)
            counts["skipped_empty"] += dropped
            yield kept

    yield from limit_batches(non_empty(), limit)


def write_shards(
    source: PromptSource, spec: dict[str, Any], limit: int | None, store: Store | None
) -> dict[str, int]:
    """Stream the source into shard manifests (or only count them when ``store`` is None)."""
    counts = {"skipped_empty": 0}
    writer = ShardWriter(
        fields=spec["source"]["fields"],
        shard_size=spec["shard_size"],
        job_seed=spec["seed"],
        store=store,
    )
    for batch in _selected_batches(source, limit, counts):
        writer.add(batch)
    writer.close()
    return {"prompts": writer.prompts, "shards": writer.shards, **counts}


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def enqueue(source: PromptSource, opts: JobOptions, *, dry_run: bool = False) -> dict[str, Any]:
    """Enqueue a job (or resume it); returns a summary for the CLI."""
    spec = build_spec(source, opts)
    if dry_run:
        counts = write_shards(source, spec, opts.limit, store=None)
        return {"job": opts.job, "dry_run": True, **counts}

    root = open_store(opts.output)
    root.check()
    check_broker()
    job_store = root.child(opts.job)
    spec["job_url"] = job_store.url
    queue = queue_name(queue_prefix(), spec["model"]["name"])

    if job_store.exists(JOB_SPEC_KEY):
        return _resume(job_store, spec, queue)

    counts = write_shards(source, spec, opts.limit, store=job_store)
    if counts["prompts"] == 0:
        raise UserError(f"no prompts to enqueue ({counts['skipped_empty']} empty prompts skipped)")
    spec.update(
        queue=queue,
        counts=counts,
        created_at=_now(),
        tool={"name": "fewstep", "version": __version__},
    )
    job_store.put(JOB_SPEC_KEY, json.dumps(spec, indent=2, ensure_ascii=False).encode())
    sent = _send(spec, range(1, counts["shards"] + 1))
    return {
        "job": opts.job,
        "job_url": job_store.url,
        "queue": queue,
        **counts,
        "enqueued": sent,
        "resumed": False,
    }


def _resume(job_store: Store, spec: dict[str, Any], queue: str) -> dict[str, Any]:
    progress = read_progress(job_store)
    existing = progress.spec
    mine, theirs = spec_identity(spec), spec_identity(existing)
    if mine != theirs:
        differ = ", ".join(k for k in mine if mine[k] != theirs[k])
        raise UserError(
            f"job {spec['job']!r} already exists at {job_store.url} with a different spec "
            f"(differs in: {differ}); use a new --job name"
        )
    queued = queued_shards(existing)
    missing = [s for s in progress.open_shards if s not in queued]
    sent = _send(existing, missing)
    return {
        "job": existing["job"],
        "job_url": job_store.url,
        "queue": existing["queue"],
        **existing["counts"],
        "enqueued": sent,
        "already_done": len(progress.committed),
        "already_queued": len(queued),
        "resumed": True,
    }


def queued_shards(spec: dict[str, Any]) -> set[int]:
    """Shards of this job waiting in Redis or delivered and not yet acknowledged."""
    client = redis_client()
    return {m.shard for m in pending_messages(client, spec["queue"]) if m.job_url == spec["job_url"]}


def _send(spec: dict[str, Any], shards, attempt: int = 1) -> int:
    messages = (ShardMessage(spec["job_url"], s, manifest_key(s), attempt) for s in shards)
    return send_shards(celery_app(), messages, spec["queue"])
