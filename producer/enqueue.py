"""Enqueue a job: the job spec and shard manifests to storage, one task per shard to Redis.

Order matters: manifests first (and ``duplicates.parquet`` with ``--dedupe``), then
``job.json``, then the tasks. A failing enqueue therefore never leaves tasks for a job
whose spec was not written (and it removes the manifests it wrote), and an enqueue that
is re-run with the same spec resumes: it sends only shards that are neither committed
nor already queued. The selection is part of the spec, so a changed selection under the
same job name is refused.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fewstep import UserError, __version__
from fewstep.contract import (
    DUPLICATES_KEY,
    FORMAT_VERSION,
    JOB_SPEC_KEY,
    KEEP_ALL,
    KEEP_BEST,
    KEEPS,
    LAYOUTS,
    ShardMessage,
    check_job_name,
    condition_images_key,
    manifest_key,
    parse_rank_by,
    queue_name,
    spec_identity,
)
from fewstep.presets import check_generation, check_runnable, resolve_model
from fewstep.queue import celery_app, check_broker, pending_messages, redis_client, send_shards
from fewstep.scorers import scoring_spec, unavailable
from fewstep.settings import defaults, queue_prefix
from fewstep.storage import Store, check_conditional_writes, open_store
from producer.conditioning import ConditioningOptions, choose_condition, conditioning_spec, default_steps
from producer.image_refs import ImageRefs, image_base
from producer.progress import Progress as JobProgress
from producer.progress import read_progress, read_spec
from producer.selection import Selection, Selector
from producer.sharding import ShardWriter
from producer.sources import PromptSource
from producer.sources.job import JobSource


@dataclass
class JobOptions:
    """What the user asked for on the command line (None: take the default)."""

    job: str
    output: str
    model: str
    shard_size: int | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    sampler: str | None = None
    image_format: str | None = None
    quality: int | None = None
    png_level: int | None = None
    png_encoder: str | None = None
    layout: str | None = None
    #: Opt-in to a benchmark-only preset (``synthetic``): its images are not real.
    allow_synthetic: bool = False
    #: Image conditioning (--image-column, --condition, ...; producer/conditioning.py).
    conditioning: ConditioningOptions = field(default_factory=ConditioningOptions)
    #: ``--score`` values (``clip,aesthetic,nsfw[,NAME=PATH_OR_HUB_ID]``) and ``--embeddings``.
    score: tuple[str, ...] = ()
    embeddings: bool = False
    #: Refuse scorer models this machine can neither find in its cache nor on the hub.
    check_scorers: bool = True
    #: Best-of-K: ``--candidates K --rank-by EXPR [--keep best|all]`` (None: one image a prompt).
    candidates: int | None = None
    rank_by: str | None = None
    keep: str | None = None


def _pick(flag, fallback):
    return fallback if flag is None else flag


def build_spec(source: PromptSource, opts: JobOptions, selector: Selector) -> dict[str, Any]:
    """The job spec without counts: everything that defines what the job produces."""
    check_job_name(opts.job)
    preset = check_runnable(resolve_model(opts.model), allow_benchmark=opts.allow_synthetic)
    out = defaults()["output"]
    layout = _pick(opts.layout, out["layout"])
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    producer = defaults()["producer"]
    shard_size = _pick(opts.shard_size, producer["shard_size_by_layout"].get(layout, producer["shard_size"]))
    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, got {shard_size}")
    image_format = _pick(opts.image_format, out["format"])
    cond = opts.conditioning
    chained = isinstance(source, JobSource)
    if chained and (cond.image_column or cond.image_root):
        raise UserError(
            "--image-column/--image-root do not apply to `enqueue job`: its images are the source job's"
        )
    condition = choose_condition(preset, cond, has_images=chained or cond.image_column is not None)
    if cond.image_root and not cond.image_column:
        raise UserError("--image-root needs --image-column (the column naming each row's image)")
    generation = {
        "steps": int(_pick(opts.steps, default_steps(preset, condition))),
        "guidance": float(_pick(opts.guidance, preset["guidance"])),
        "width": int(_pick(opts.width, preset["width"])),
        "height": int(_pick(opts.height, preset["height"])),
        "sampler": _pick(opts.sampler, preset.get("sampler")),
        "format": image_format,
    }
    check_generation(preset, generation)
    if image_format == "png":
        # A level asks for zlib: --png-level alone means Pillow's encoder (fpng has no levels).
        implied = "pillow" if opts.png_level is not None else None
        generation["png_encoder"] = _pick(opts.png_encoder, implied or out["png_encoder"])
        if generation["png_encoder"] == "pillow":
            generation["png_level"] = int(_pick(opts.png_level, out["png_level"]))
        elif opts.png_level is not None:
            raise UserError("--png-level applies to --png-encoder pillow only (fpng has no levels)")
    elif image_format == "jxl":
        if opts.quality is not None:  # lossless unless a quality is given
            generation["quality"] = int(opts.quality)
        generation["effort"] = int(out["jxl_effort"])
    else:
        generation["quality"] = int(_pick(opts.quality, out["quality"]))
    spec: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "job": opts.job,
        "source": {**source.describe(), "selection": selector.describe()},
        "model": {
            "name": preset["name"],
            "kind": preset["kind"],
            "repo": preset.get("repo"),
            "revision": preset.get("revision"),
        },
        "generation": generation,
        "seed": int(_pick(opts.seed, defaults()["producer"]["seed"])),
        "shard_size": int(shard_size),
        "layout": layout,
    }
    if condition is not None:
        root = None if chained else image_base(cond.image_root, getattr(source, "location", None))
        spec["conditioning"] = conditioning_spec(
            preset,
            condition,
            generation["steps"],
            cond,
            image_root=root,
            source_job=source.store.url if chained else None,
        )
    scoring = scoring_spec(opts.score, opts.embeddings)
    if scoring is not None:  # absent otherwise: jobs without scores keep their identity
        spec["scoring"] = scoring
        problem = unavailable(scoring) if opts.check_scorers else None
        if problem:  # every shard would fail its attempts on the worker: say so now
            raise UserError(f"{problem} (--no-scorer-check: only the workers have them)")
    candidates = candidates_spec(opts, scoring, condition is not None)
    if candidates is not None:  # absent otherwise: jobs without candidates keep their identity
        spec["candidates"] = candidates
    return spec


def candidates_spec(
    opts: JobOptions, scoring: dict[str, Any] | None, conditioned: bool
) -> dict[str, Any] | None:
    """The spec's best-of-K entry; the rank expression is checked against the job's --score columns."""
    if opts.candidates is None:
        if opts.rank_by is not None or opts.keep is not None:
            raise UserError("--rank-by and --keep need --candidates K")
        return None
    limit = int(defaults()["candidates"]["max"])
    if not 1 <= opts.candidates <= limit:
        raise UserError(
            f"--candidates must be 1 to {limit} (config/defaults.toml candidates.max), got {opts.candidates}"
        )
    if opts.rank_by is None:
        raise UserError("--candidates needs --rank-by EXPR over --score columns, e.g. --rank-by clip_score")
    columns = [s["column"] for s in ((scoring or {}).get("scorers") or {}).values()]
    rank_by = parse_rank_by(opts.rank_by, columns)
    keep = opts.keep or KEEP_BEST
    if keep not in KEEPS:
        raise UserError(f"--keep {keep!r}: use one of {', '.join(KEEPS)}")
    if keep == KEEP_ALL and conditioned:
        raise UserError("--keep all is not supported for image-conditioned jobs: use --keep best")
    return {
        "k": int(opts.candidates),
        "rank_by": rank_by.text,
        "keep": keep,
        "seeds": "candidate 0: the row's seed; candidate c > 0: fewstep.contract.candidate_seeds",
    }


class EnqueueDisplay:
    """Progress on stderr while a prompt set is read and its tasks are sent; silent when off."""

    def __init__(self, enabled: bool, total_rows: int | None):
        self.progress = None
        if enabled:
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[note]}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            self.reading = self.progress.add_task("reading rows", total=total_rows, note="")
            self.sending = self.progress.add_task("sending tasks", total=None, visible=False, note="")

    def __enter__(self) -> EnqueueDisplay:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def rows(self, batches: Iterable[pa.RecordBatch], writer: ShardWriter) -> Iterator[pa.RecordBatch]:
        """Pass batches through, counting rows read and shards cut."""
        for batch in batches:
            if self.progress is not None:
                note = f"{writer.prompts:,} prompts, {writer.shards:,} shards"
                self.progress.update(self.reading, advance=batch.num_rows, note=note)
            yield batch

    def start_sending(self, total: int) -> None:
        """Show the task-sending bar for ``total`` tasks."""
        if self.progress is not None:
            self.progress.update(self.sending, total=total, visible=True)

    def messages(self, messages: Iterable[ShardMessage]) -> Iterator[ShardMessage]:
        """Pass messages through, counting them (from any thread)."""
        for message in messages:
            yield message
            if self.progress is not None:
                self.progress.advance(self.sending)


def write_shards(
    source: PromptSource,
    spec: dict[str, Any],
    selector: Selector,
    store: Store | None,
    display: EnqueueDisplay,
    skip_missing_images: bool = False,
    notes: list[str] | None = None,
) -> dict[str, int]:
    """Stream the source through the selection into shard manifests (only count when ``store`` is None).

    A conditioned job's rows get their image references, checked (:mod:`producer.image_refs`):
    a row whose image is missing or unreadable stops it, or with ``skip_missing_images`` is
    left out and counted; examples of those go to ``notes``.

    Returns the counts; on an error, the manifests written so far are removed.
    """
    conditioning = spec.get("conditioning")
    writer = ShardWriter(
        fields=spec["source"]["fields"],
        shard_size=spec["shard_size"],
        job_seed=spec["seed"],
        store=store,
        conditioned=conditioning is not None,
    )
    images = None
    if conditioning is not None:
        column = conditioning["image_column"]
        images = ImageRefs(
            source.image_values(column) if column else None,
            conditioning["image_root"],
            skip=skip_missing_images,
            label=column or "image",
        )
    try:
        for batch in display.rows(selector.select(source.batches()), writer):
            writer.add(images.attach(batch) if images is not None else batch)
        writer.close()
    except BaseException:
        writer.abort()
        if store is not None:
            _remove_manifests(store, writer.shards)
        raise
    finally:
        if images is not None:
            images.close()
    counts = {"prompts": writer.prompts, "shards": writer.shards, **selector.counts}
    if images is not None:
        counts.update(images.counts)
        if notes is not None:
            notes += images.examples
    counts["skipped_invalid"] += source.invalid.count
    counts["rows_read"] += source.invalid.count
    return counts


def _remove_manifests(store: Store, shards: int) -> None:
    def remove(shard: int) -> None:
        store.delete(manifest_key(shard))
        store.delete(condition_images_key(shard))  # a conditioned job's image bytes, if any

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(remove, range(1, shards + 1)))


def problems(source: PromptSource, selector: Selector) -> list[str]:
    """Examples of rows skipped as unusable and of values left null, for the report."""
    notes = [*source.invalid.examples, *selector.invalid.examples]
    notes += source.misfits.examples
    if source.misfits.count > len(source.misfits.examples):
        notes.append(
            f"... {source.misfits.count:,} field values in all did not fit their type and were left null"
        )
    return notes


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _nothing_selected(counts: dict[str, int]) -> UserError:
    return UserError(
        f"no prompts to enqueue: {counts['rows_read']:,} rows read; {counts['skipped_empty']:,} empty, "
        f"{counts['skipped_invalid']:,} unusable, {counts['skipped_filtered']:,} filtered out, "
        f"{counts['duplicates']:,} duplicates"
    )


def enqueue(
    source: PromptSource,
    opts: JobOptions,
    selection: Selection | None = None,
    *,
    dry_run: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Enqueue a job (or resume it); returns a summary for the CLI.

    ``progress``: show a progress display on stderr (default: when stderr is a terminal).
    """
    selector = Selector(
        selection or Selection(),
        source.fields,
        max_prompt_chars=int(defaults()["producer"]["max_prompt_chars"]),
        log_duplicates=not dry_run,
    )
    spec = build_spec(source, opts, selector)
    skip, notes = opts.conditioning.skip_missing_images, []
    display = EnqueueDisplay(sys.stderr.isatty() if progress is None else progress, source.total_rows)
    if dry_run:
        with display:
            # A dry run counts every bad image (stopping at the first would hide the others).
            counts = write_shards(source, spec, selector, None, display, True, notes)
        if not skip and counts.get("missing_images", 0) + counts.get("unreadable_images", 0):
            notes.append(
                "an enqueue stops at the first row whose image is missing or unreadable; "
                "pass --skip-missing-images to skip those rows (prompts counts the rows it would take)"
            )
        return {
            "job": opts.job, "dry_run": True, **counts, **_chained(source),
            "problems": [*problems(source, selector), *notes],
        }  # fmt: skip

    root = open_store(opts.output)
    root.check()
    check_broker()
    job_store = root.child(opts.job)
    # Commits and job.json rely on create-if-absent writes: refuse a backend that ignores them.
    check_conditional_writes(job_store)
    spec["job_url"] = job_store.url
    queue = queue_name(queue_prefix(), spec["model"]["name"])

    if job_store.exists(JOB_SPEC_KEY):
        return resume_job(job_store, spec)

    with display:
        counts = write_shards(source, spec, selector, job_store, display, skip, notes)
        try:
            if counts["prompts"] == 0:
                raise _nothing_selected(counts)
            if selector.duplicate_log is not None:
                job_store.put(DUPLICATES_KEY, selector.duplicate_log.close())
        except BaseException:
            _remove_manifests(job_store, counts["shards"])
            raise
        spec.update(
            queue=queue,
            counts=counts,
            created_at=_now(),
            tool={"name": "fewstep", "version": __version__},
        )
        body = json.dumps(spec, indent=2, ensure_ascii=False).encode()
        if not job_store.put(JOB_SPEC_KEY, body, if_absent=True):
            return _created_meanwhile(job_store, spec)
        sent = send_job_shards(spec, range(1, counts["shards"] + 1), display=display)
    return {
        "job": opts.job,
        "job_url": job_store.url,
        "queue": queue,
        **counts,
        "enqueued": sent,
        "resumed": False,
        **_chained(source),
        "problems": [*problems(source, selector), *notes],
    }


def _chained(source: PromptSource) -> dict[str, int]:
    """For ``enqueue job --partial``: how many of the source job's rows were not there yet."""
    return {"source_rows_not_committed": source.rows_not_committed} if isinstance(source, JobSource) else {}


def _created_meanwhile(job_store: Store, spec: dict[str, Any]) -> dict[str, Any]:
    """Another enqueue wrote job.json first: the same job (resume it) or a clash (say so)."""
    existing = read_spec(job_store)
    if spec_identity(existing) == spec_identity(spec) and existing.get("counts") == spec["counts"]:
        return resume_job(job_store, spec)
    raise UserError(
        f"job {spec['job']!r} was created at {job_store.url} by another enqueue while this one ran, "
        "with another spec; its manifests may have been overwritten: delete it and use a new --job name"
    )


def _differences(mine: dict[str, Any], theirs: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(mine) | set(theirs), key=str):
        a, b = mine.get(key), theirs.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif isinstance(a, dict | list) or isinstance(b, dict | list):
            out.append(f"{prefix}{key}")
        else:
            out.append(f"{prefix}{key} ({b!r} there, {a!r} now)")
    return out


def resume_job(job_store: Store, spec: dict[str, Any]) -> dict[str, Any]:
    """Re-send the shards of an existing job (same spec) that are neither committed nor queued."""
    progress = read_progress(job_store)
    mine, theirs = spec_identity(spec), spec_identity(progress.spec)
    if mine != theirs:
        differ = ", ".join(_differences(mine, theirs))
        raise UserError(
            f"job {spec['job']!r} already exists at {job_store.url} with a different spec "
            f"(differs in: {differ}); use a new --job name"
        )
    return {**resend_open_shards(job_store, progress), "resumed": True}


def resend_open_shards(job_store: Store, progress: JobProgress) -> dict[str, Any]:
    """Send the job's shards that are neither committed, failed nor queued; what was done."""
    existing = progress.spec
    queued = queued_shards(existing)
    missing = [s for s in progress.open_shards if s not in queued]
    sent = send_job_shards(existing, missing)
    return {
        "job": existing["job"],
        "job_url": job_store.url,
        "queue": existing["queue"],
        **existing["counts"],
        "enqueued": sent,
        "already_done": len(progress.committed),
        "already_queued": len(queued),
    }


def queued_shards(spec: dict[str, Any]) -> set[int]:
    """Shards of this job waiting in Redis or delivered and not yet acknowledged."""
    client = redis_client()
    return {m.shard for m in pending_messages(client, spec["queue"]) if m.job_url == spec["job_url"]}


SEND_THREADS = 4
SEND_CHUNK = 64


def send_job_shards(
    spec: dict[str, Any], shards: Iterable[int], attempt: int = 1, display: EnqueueDisplay | None = None
) -> int:
    """Send one task per shard. A few connections send chunks in parallel, in shard order
    roughly: each message is a round trip to Redis, and 14,000 of them one by one take long."""
    shards = list(shards)
    app = celery_app()
    if display is not None:
        display.start_sending(len(shards))

    def send(chunk: list[int]) -> int:
        messages = (ShardMessage(spec["job_url"], s, manifest_key(s), attempt) for s in chunk)
        return send_shards(app, display.messages(messages) if display else messages, spec["queue"])

    chunks = [shards[i : i + SEND_CHUNK] for i in range(0, len(shards), SEND_CHUNK)]
    if len(chunks) <= 1:
        return sum(map(send, chunks))
    with ThreadPoolExecutor(SEND_THREADS, thread_name_prefix="send") as pool:
        return sum(pool.map(send, chunks))
