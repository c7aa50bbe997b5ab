"""``producer gallery``: a static HTML contact sheet of a job, to look at before trusting a run.

A seeded sample of committed rows (spread evenly over the groups of a source field with
``--by``) becomes ``gallery/index.html`` with JPEG thumbnails in ``gallery/thumbs/``, in the
job's folder. Every link is relative (thumbnails, and the full image in ``../images/``),
so the page opens the same from a local copy of the job folder (e.g. after
``aws s3 sync``); ``--download DIR`` fetches the gallery itself. For webdataset and parquet
jobs the thumbnails come from the parts' tars (one ranged GET per image) or parquets, and
link to no full image (it lies inside a tar or parquet). For an image-conditioned job each
result has its control map beside it (as saved with ``--save-control``), or, when none was
saved, the conditioning image its row named. The page has no script, and every value from
the data is escaped.

Scores (``--score`` jobs) show under each thumbnail; ``--sort clip_score|aesthetic`` orders the
sample (within each group) by that score, highest first, rows without it last. The sample
itself is the same as without ``--sort``: a sorted gallery is a look at the spread of a job,
the best and worst images of each group are ``producer report``'s.
"""

from __future__ import annotations

import html
import io
import json
import random
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click
import pyarrow as pa
from PIL import Image

from fewstep import UserError
from fewstep.condition_sources import ConditionSources
from fewstep.contract import (
    CONTROL_IMAGE_COLUMN,
    GALLERY,
    LAYOUT_FILES,
    LAYOUT_WEBDATASET,
    SCORE_COLUMNS,
    image_name,
    job_layout,
    job_metadata_schema,
    manifest_key,
    metadata_key,
    part_name,
)
from fewstep.settings import defaults
from fewstep.storage import Store, read_table
from producer.images import read_images
from producer.options import JSON, OUTPUT, download_option, job_store, progress_bar
from producer.progress import Progress, read_progress

COLUMNS = ["row_id", "part_id", "image_key", "prompt", "seed", "model", "width", "height"]
# Where an image lies inside its part's tar or parquet (webdataset and parquet layouts).
SPAN_COLUMNS = ["bytes", "image_offset", "image_row"]
# Where a conditioned row's saved control map lies (null when none was saved).
CONTROL_COLUMNS = ["control_key", "control_offset", "control_bytes"]
THUMBS = f"{GALLERY}/thumbs"
INDEX = f"{GALLERY}/index.html"
NO_VALUE = "(none)"
#: Scores ``--sort`` orders by, and how each is shown under a thumbnail.
SORTS = ("clip_score", "aesthetic")
SCORE_LABELS = {"clip_score": "clip {:.1f}", "aesthetic": "aesthetic {:.2f}", "nsfw_score": "nsfw {:.2f}",
                "pickscore": "pick {:.1f}", "hpsv2": "hps {:.3f}"}  # fmt: skip

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #222; background: #fafafa; }
header p { color: #555; margin: .2rem 0; }
h2 { margin: 1.5rem 0 .5rem; font-size: 1.1rem; }
h2 small { color: #777; font-weight: normal; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: .75rem; }
figure { margin: 0; background: #fff; border: 1px solid #ddd; border-radius: 6px; overflow: hidden; }
figure img { display: block; width: 100%; height: auto; background: #eee; }
figcaption { padding: .4rem .5rem; }
.pair { display: grid; grid-template-columns: 1fr 1fr; }
.prompt { margin: 0 0 .3rem; overflow-wrap: anywhere; }
.meta { margin: 0; color: #777; font-size: 12px; }
"""


def sample_rows(
    job_store: Store, progress: Progress, n: int, by: str | None, seed: int, sort: str | None = None
) -> tuple[list[tuple[str | None, list]], int]:
    """Up to ``n`` committed rows, grouped by ``by`` (each group ordered by ``sort``, highest
    first, nulls last); and how many rows were sampled from."""
    spec = progress.spec
    fields = spec["source"].get("fields", {})
    if by is not None and by not in fields and by not in ("model", "part_id", "source"):
        raise UserError(
            f"--by {by!r} is not a field of job {spec['job']}; "
            f"its source fields: {', '.join(fields) or 'none'}"
        )
    shards = sorted(progress.committed)
    if not shards:
        raise UserError(f"job {spec['job']} has no committed shard yet: nothing to show")
    rng = random.Random(seed)
    # Enough parts to give every group a fair chance without reading a huge job's every part.
    chosen = sorted(rng.sample(shards, min(len(shards), max(32, n))))
    columns = COLUMNS + ([by] if by and by not in COLUMNS else [])
    if job_layout(spec) != LAYOUT_FILES:
        columns += SPAN_COLUMNS
    if spec.get("conditioning"):
        columns += CONTROL_COLUMNS
    columns += [c for c in SCORE_COLUMNS if c in job_metadata_schema(spec).names]
    if sort is not None and sort not in columns:
        raise UserError(f"--sort {sort}: job {spec['job']} has no scores (enqueue it with --score)")

    def read(shard: int) -> pa.Table:
        return read_table(job_store, metadata_key(shard), columns)

    with ThreadPoolExecutor(min(16, len(chosen))) as pool:
        table = pa.concat_tables(pool.map(read, chosen)).sort_by("row_id")
    population = table.num_rows

    if sort is not None and table.column(sort).null_count == population:
        raise UserError(f"--sort {sort}: job {spec['job']} was not scored with it (the column is empty)")

    def rows(indices: list[int]) -> list[dict[str, Any]]:
        # The table is in row-id order, so sorted indices give the rows in row-id order.
        taken = table.take(pa.array(sorted(indices), pa.int64())).to_pylist()
        if sort is None:
            return taken
        return sorted(taken, key=lambda r: (r[sort] is None, -(r[sort] or 0.0)))

    # The sample is drawn over row indices: only the rows shown become Python objects.
    if by is None:
        return [(None, rows(rng.sample(range(population), min(n, population))))], population
    groups: dict[str, list[int]] = defaultdict(list)
    for index, value in enumerate(table.column(by).to_pylist()):
        groups[NO_VALUE if value is None or value == "" else str(value)].append(index)
    names = sorted(groups)
    for name in names:
        rng.shuffle(groups[name])
    taken: dict[str, list[int]] = {name: [] for name in names}
    remaining = min(n, population)
    while remaining:  # round robin: every group shows before any shows twice
        for name in names:
            if remaining and len(taken[name]) < len(groups[name]):
                taken[name].append(groups[name][len(taken[name])])
                remaining -= 1
    return [(name, rows(taken[name])) for name in names if taken[name]], population


def thumbnail(data: bytes, size: int) -> bytes:
    image = Image.open(io.BytesIO(data))
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.convert("RGB").save(out, format="JPEG", quality=85)
    return out.getvalue()


def thumb_name(row_id: int) -> str:
    return image_name(row_id, "jpg")


def condition_thumb_name(row_id: int) -> str:
    return f"{row_id:012d}.condition.jpg"


def read_conditions(job_store: Store, spec: dict[str, Any], rows: list[dict[str, Any]]) -> list[bytes]:
    """Each row's control map as saved (``--save-control``), else its conditioning image."""
    out: list[bytes] = []
    sources, manifests, parquets = ConditionSources(job_store), {}, {}
    for row in rows:
        key = row["control_key"]
        if key is None:
            part = row["part_id"]
            if part not in manifests:
                table = read_table(job_store, manifest_key(part)).to_pylist()
                manifests[part] = {r["row_id"]: r for r in table}
            out.append(sources.read(manifests[part][row["row_id"]]))
        elif job_layout(spec) == LAYOUT_FILES:
            out.append(job_store.get(key))
        elif job_layout(spec) == LAYOUT_WEBDATASET:
            out.append(job_store.get_range(key, row["control_offset"], row["control_bytes"]))
        else:
            if key not in parquets:
                parquets[key] = read_table(job_store, key, [CONTROL_IMAGE_COLUMN]).column(0).to_pylist()
            out.append(parquets[key][row["control_offset"]]["bytes"])
    return out


def page_head(title: str, style: str) -> list[str]:
    """The head of a static page (gallery, report): no script runs, images come from its folder only."""
    return [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src 'self'; "
        "style-src 'unsafe-inline'\">",
        f"<title>{html.escape(title)}</title>",
        f"<style>{style}</style></head><body>",
    ]


def page(spec: dict[str, Any], groups: list[tuple[str | None, list]], by: str | None, population: int) -> str:
    """The contact sheet's HTML; every value from the data is escaped."""
    e = html.escape
    gen = spec["generation"]
    shown = sum(len(rows) for _name, rows in groups)
    settings = (
        f"{gen['steps']} steps, guidance {gen['guidance']:g}, {gen['width']}×{gen['height']}, {gen['format']}"
    )
    out = [
        *page_head(f"{spec['job']} · fewstep gallery", STYLE),
        f"<header><h1>{e(spec['job'])}</h1>",
        f"<p>model <b>{e(spec['model']['name'])}</b> (revision {e(str(spec['model'].get('revision')))}) · "
        f"{e(settings)} · source {e(str(spec['source'].get('name')))}</p>",
        f"<p>{shown} images sampled from {population:,} committed rows "
        f"of {spec['counts']['prompts']:,} prompts"
        + (f", grouped by <b>{e(by)}</b>" if by else "")
        + "</p></header>",
    ]
    for name, rows in groups:
        out.append("<section>")
        if by:
            out.append(f"<h2>{e(name or NO_VALUE)} <small>({len(rows)})</small></h2>")
        out.append('<div class="grid">')
        linked = job_layout(spec) == LAYOUT_FILES  # else the image lies inside a tar or parquet
        for r in rows:
            img = f'<img src="thumbs/{thumb_name(r["row_id"])}" alt="{e(r["prompt"][:200])}">'
            if spec.get("conditioning"):  # what the model saw, then what it made
                seen = "control map" if r.get("control_key") else "conditioning image"
                img = (
                    f'<div class="pair"><img src="thumbs/{condition_thumb_name(r["row_id"])}" '
                    f'alt="{seen}" title="{seen}">{img}</div>'
                )
            out.append(
                (f'<figure><a href="../{e(r["image_key"])}">{img}</a>' if linked else f"<figure>{img}")
                + f'<figcaption><p class="prompt">{e(r["prompt"])}</p>'
                f'<p class="meta">seed {r["seed"]} · {e(r["model"])} · {part_name(r["part_id"])} · '
                f"row {r['row_id']}</p>{score_line(r)}</figcaption></figure>"
            )
        out.append("</div></section>")
    out.append("</body></html>")
    return "\n".join(out)


def score_line(row: dict[str, Any]) -> str:
    """The row's scores as a caption line (empty when it has none)."""
    shown = [label.format(row[c]) for c, label in SCORE_LABELS.items() if row.get(c) is not None]
    return f'<p class="meta scores">{" · ".join(shown)}</p>' if shown else ""


def make_gallery(
    job_store: Store,
    *,
    n: int,
    by: str | None = None,
    seed: int = 0,
    sort: str | None = None,
    on_image: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Write ``gallery/index.html`` and its thumbnails into the job folder; returns a summary.

    ``on_image(done, total)`` is called after each thumbnail, for a progress bar.
    """
    cfg = defaults()["gallery"]
    progress = read_progress(job_store)
    spec = progress.spec
    groups, population = sample_rows(job_store, progress, n, by, seed, sort)
    rows = [r for _name, group in groups for r in group]
    size = int(cfg["thumbnail_px"])

    layout = job_layout(spec)
    images = read_images(job_store, rows, layout)

    def make_thumb(row: dict[str, Any], data: bytes) -> str:
        key = f"{THUMBS}/{thumb_name(row['row_id'])}"
        job_store.put(key, thumbnail(data, size))
        return key

    thumbs = set()
    with ThreadPoolExecutor(16) as pool:
        for key in pool.map(make_thumb, rows, images):
            thumbs.add(key)
            if on_image:
                on_image(len(thumbs), len(rows))
        if spec.get("conditioning"):
            for row, data in zip(rows, read_conditions(job_store, spec, rows), strict=True):
                key = f"{THUMBS}/{condition_thumb_name(row['row_id'])}"
                job_store.put(key, thumbnail(data, size))
                thumbs.add(key)
    for key, _size in list(job_store.list(f"{THUMBS}/")):
        if key not in thumbs:
            job_store.delete(key)  # from an earlier gallery of other rows
    job_store.put(INDEX, page(spec, groups, by, population).encode())
    return {
        "job": spec["job"],
        "gallery": job_store.url_of(INDEX),
        "images": len(rows),
        "groups": {name: len(group) for name, group in groups} if by else None,
        "sampled_from": population,
        "image_keys": [r["image_key"] for r in rows] if layout == LAYOUT_FILES else [],
    }


def download(job_store: Store, directory: Path, image_keys: list[str], folder: str = GALLERY) -> Path:
    """Copy the page's folder (the gallery, or ``producer report``'s) and the full images it links
    to into ``directory``, in the job's layout, so every link works offline; returns the page's path."""
    keys = [key for key, _size in job_store.list(f"{folder}/")] + image_keys
    for key in keys:
        target = directory / key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(job_store.get(key))
    return directory / folder / "index.html"


@click.command("gallery")
@click.argument("job")
@OUTPUT
@click.option("--n", "n", type=click.IntRange(min=1), help="How many images [64].")
@click.option("--by", metavar="FIELD", help="Group by this source field (e.g. category).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sample.")
@click.option(
    "--sort", type=click.Choice(SORTS), help="Order the sample by this score, highest first (nulls last)."
)
@download_option("Also copy the gallery and the images it links to into this local directory.")
@JSON
def gallery_command(
    job: str, output: str, n: int | None, by: str | None, seed: int, sort: str | None, download_dir, as_json
):
    """Write a contact sheet of JOB (gallery/index.html, thumbnails with prompt, seed and model)."""
    store = job_store(output, job)
    with progress_bar("gallery: thumbnails") as on_image:
        summary = make_gallery(
            store, n=n or int(defaults()["gallery"]["images"]), by=by, seed=seed, sort=sort, on_image=on_image
        )
    if download_dir is not None:
        summary["local"] = str(download(store, download_dir, summary["image_keys"]).resolve())
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(f"gallery of {summary['images']} images: {summary['gallery']}")
    if summary.get("local"):
        click.echo(f"local copy: {summary['local']}")
