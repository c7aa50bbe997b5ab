"""The ``producer`` command: enqueue prompt sets, follow jobs."""

from __future__ import annotations

import functools
import json

import click

from fewstep import UserError, console
from fewstep.contract import KEEPS, LAYOUTS
from fewstep.presets import ALLOW_SYNTHETIC_ENV
from fewstep.settings import load_config
from producer import finalize, gallery, jobs, status_view
from producer.conditioning import CONDITIONS, RESIZES, ConditioningOptions
from producer.dedupe import dedupe_command
from producer.enqueue import JobOptions, enqueue
from producer.gc import gc_command
from producer.options import JSON, OUTPUT
from producer.reconcile import reconcile_command
from producer.report import report_command
from producer.retry import retry_command
from producer.selection import Selection
from producer.sources.diffusiondb import DiffusionDB
from producer.sources.formats import FORMATS, open_file
from producer.sources.job import JobSource
from producer.sources.journeydb import TEXT_FIELDS, JourneyDB
from producer.sources.partiprompts import PartiPrompts
from producer.topup import topup_command
from producer.verify import verify_command

IMAGE_FORMATS = ("png", "jpeg", "webp", "jxl")


def _job_option_list(image_format_flags: tuple[str, ...]) -> list:
    return [
        click.option("--model", required=True, help="Preset name, hub id or local directory."),
        click.option(
            "--allow-synthetic",
            is_flag=True,
            envvar=ALLOW_SYNTHETIC_ENV,
            help=f"Allow the benchmark-only 'synthetic' model (no real images) [env {ALLOW_SYNTHETIC_ENV}].",
        ),
        click.option("--job", required=True, help="Job name (letters, digits, . _ -)."),
        OUTPUT,
        click.option("--shard-size", type=click.IntRange(min=1), help="Prompts per shard [256]."),
        click.option("--seed", type=int, help="Job seed; per-prompt seeds derive from it [0]."),
        click.option("--steps", type=click.IntRange(min=1), help="Override the preset's steps."),
        click.option("--guidance", type=float, help="Override the preset's guidance scale."),
        click.option("--width", type=click.IntRange(min=8), help="Override the preset's width."),
        click.option("--height", type=click.IntRange(min=8), help="Override the preset's height."),
        click.option("--sampler", help="One of the preset's samplers (see `worker models`) [its default]."),
        click.option(
            *image_format_flags,
            "image_format",
            type=click.Choice(IMAGE_FORMATS),
            help="Image format [png].",
        ),
        click.option(
            "--quality",
            type=click.IntRange(1, 100),
            help="JPEG/WebP quality [90]; JPEG XL: lossy at this quality (libjxl's scale) [lossless].",
        ),
        click.option(
            "--png-encoder",
            type=click.Choice(("fpng", "pillow")),
            help="PNG encoder: fpng (fast, ~1 ms per 512x512 image) or pillow (zlib at --png-level) [fpng].",
        ),
        click.option(
            "--png-level",
            type=click.IntRange(0, 9),
            help="PNG compression level, with --png-encoder pillow (alone, it implies pillow) [6].",
        ),
        click.option(
            "--layout",
            type=click.Choice(LAYOUTS),
            help="How images are stored: one object each (files), one tar per shard (webdataset), "
            "or one parquet per shard with an HF datasets Image column (parquet) [webdataset].",
        ),
        click.option(
            "--score",
            multiple=True,
            metavar="clip,aesthetic,nsfw,pickscore,hpsv2[,NAME=PATH_OR_HUB_ID]",
            help="Score every image on the worker (config/scorers.toml): clip_score, aesthetic, "
            "nsfw_score, pickscore, hpsv2 (HPS v2.1: workers need --allow-pickle-conversion); "
            "NAME=DIR or NAME=owner/repo[@revision] replaces a scorer's model, "
            "aesthetic.backbone=... the CLIP the aesthetic head reads; `tiny` (or NAME=tiny): "
            "random-weight scorers built locally, to try it offline.",
        ),
        click.option(
            "--no-scorer-check",
            "check_scorers",
            flag_value=False,
            default=True,
            help="Enqueue --score even where this machine cannot find the scorer weights "
            "(only the workers have them).",
        ),
        click.option(
            "--embeddings",
            is_flag=True,
            help="Store each image's L2-normalised CLIP image embedding (float16) in "
            "embeddings/part-N/<attempt>.parquet.",
        ),
        click.option(
            "--candidates",
            type=click.IntRange(min=1),
            metavar="K",
            help="Best-of-K: generate K candidates a prompt in one batch, score them, keep the best "
            "(needs --rank-by).",
        ),
        click.option(
            "--rank-by",
            metavar="EXPR",
            help="How candidates rank, higher first: score columns, numbers, + - * /, e.g. "
            "'aesthetic + 0.1*clip_score' (the scorers it names must be in --score).",
        ),
        click.option(
            "--keep",
            type=click.Choice(KEEPS),
            help="best: store each prompt's best candidate; all: store all K, ranked [best].",
        ),
        click.option(
            "--dry-run", is_flag=True, help="Count prompts and shards; touch neither Redis nor storage."
        ),
        JSON,
        # Selection (producer/selection.py), applied in this order.
        click.option(
            "--where",
            multiple=True,
            metavar="FIELD<OP>NUMBER",
            help="Keep rows whose source field compares so, e.g. 'prompt_nsfw<0.2' (repeatable; all hold).",
        ),
        click.option("--min-chars", type=click.IntRange(min=0), help="Skip prompts of fewer characters."),
        click.option("--max-chars", type=click.IntRange(min=1), help="Skip prompts of more characters."),
        click.option(
            "--dedupe",
            is_flag=True,
            help="Keep the first of prompts equal after case folding and whitespace collapsing.",
        ),
        click.option("--sample", type=click.IntRange(min=1), metavar="N", help="A fixed sample of N."),
        click.option("--sample-seed", type=int, default=0, show_default=True, help="Which sample to draw."),
        click.option("--limit", type=click.IntRange(min=0), help="Enqueue at most N prompts (the first)."),
    ]


def _job_options(image_format_flags: tuple[str, ...]):
    def decorate(command):
        for option in reversed(_job_option_list(image_format_flags)):
            command = option(command)
        return command

    return decorate


#: The options every ``enqueue`` source shares: job, generation and selection.
job_options = _job_options(("--format", "--image-format"))


CARRY = click.option(
    "--carry",
    multiple=True,
    metavar="COLUMN",
    help="Carry only these source columns into the metadata (repeatable; default: all).",
)

_SELECTION = ("limit", "sample", "sample_seed", "dedupe", "where", "min_chars", "max_chars")


# --- image conditioning (issue 15; producer/conditioning.py, docs/CONDITIONING.md) -----------
def _conditioning_option_list(image_column: bool) -> list:
    where = [
        click.option(
            "--image-column",
            metavar="COLUMN",
            help="Source column naming each row's conditioning image: a local path, an s3:// URL, "
            "or image bytes (parquet binary, or HF datasets' Image).",
        ),
        click.option(
            "--image-root",
            metavar="DIR|s3://BUCKET/PREFIX",
            help="Where relative image paths start [the prompt file's folder].",
        ),
    ]
    return [
        *(where if image_column else []),
        click.option(
            "--condition",
            type=click.Choice(CONDITIONS),
            help="init (img2img), canny, sketch or as-is (ControlNet) "
            "[init, or the ControlNet preset's default].",
        ),
        click.option("--strength", type=float, help="img2img strength, 0-1 (init only) [the preset's]."),
        click.option(
            "--controlnet-scale", type=float, help="ControlNet conditioning scale [the preset's, else 1]."
        ),
        click.option(
            "--canny-low", type=click.IntRange(min=0), help="Canny low threshold (canny only) [100]."
        ),
        click.option(
            "--canny-high", type=click.IntRange(min=1), help="Canny high threshold (canny only) [200]."
        ),
        click.option(
            "--resize", type=click.Choice(RESIZES), help="Fit images to the job's size [center-crop]."
        ),
        click.option("--save-control", is_flag=True, help="Store each row's control map beside its image."),
        click.option(
            "--skip-missing-images",
            is_flag=True,
            help="Skip (and count) rows whose image is missing or unreadable, instead of stopping.",
        ),
    ]


def conditioning_options(image_column: bool = True):
    """The conditioning options (``--image-column`` and ``--image-root`` where rows name images)."""

    def decorate(command):
        for option in reversed(_conditioning_option_list(image_column)):
            command = option(command)
        return command

    return decorate


_CONDITIONING = tuple(f for f in ConditioningOptions.__dataclass_fields__)


def run_enqueue(source, *, dry_run: bool, as_json: bool, match: dict | None = None, **flags) -> None:
    """Enqueue ``source`` with the shared job and selection options and print the summary."""
    selection = Selection(
        **{k: flags.pop(k) for k in _SELECTION},
        match={k: tuple(v) for k, v in (match or {}).items() if v},
    )
    conditioning = ConditioningOptions(**{k: flags.pop(k) for k in _CONDITIONING if k in flags})
    summary = enqueue(source, JobOptions(**flags, conditioning=conditioning), selection, dry_run=dry_run)
    for note in summary.pop("problems", []):
        click.echo(f"warning: {note}", err=True)
    if as_json:
        click.echo(json.dumps(summary))
        return
    skipped = (
        f"{summary['rows_read']:,} rows read; skipped {summary['skipped_empty']:,} empty, "
        f"{summary['skipped_invalid']:,} unusable, {summary['skipped_filtered']:,} filtered, "
        f"{summary['duplicates']:,} duplicates, {summary['not_selected']:,} not selected"
    )
    if "missing_images" in summary:
        skipped += (
            f"; images: {summary['missing_images']:,} missing, {summary['unreadable_images']:,} unreadable"
        )
    if summary.get("source_rows_not_committed"):
        skipped += f"; {summary['source_rows_not_committed']:,} rows of the source job not committed yet"
    if summary.get("dry_run"):
        click.echo(f"dry run: {summary['prompts']:,} prompts in {summary['shards']:,} shards (no writes)")
        click.echo(skipped)
        return
    verb = "resumed" if summary["resumed"] else "enqueued"
    click.echo(
        f"{verb} job {summary['job']}: {summary['prompts']:,} prompts in {summary['shards']:,} shards, "
        f"{summary['enqueued']:,} tasks sent to queue {summary['queue']}"
    )
    if not summary["resumed"]:
        click.echo(skipped)
    click.echo(f"job spec: {summary['job_url']}/job.json")


@click.group()
@click.version_option(package_name="fewstep")
def cli() -> None:
    """Shard prompt sets into Celery tasks and follow the jobs, from storage."""


@cli.group("enqueue")
def enqueue_group() -> None:
    """Enqueue a prompt set as a job: manifests and job spec to storage, tasks to Redis."""


@enqueue_group.command("job")
@click.argument("source_job", metavar="SOURCE_JOB")
@click.option(
    "--partial", is_flag=True, help="Take the committed rows of an unfinished source job (else refused)."
)
@conditioning_options(image_column=False)
@job_options
def enqueue_job(source_job: str, partial: bool, **flags) -> None:
    """Another job's committed rows (same --output): its prompts, byte-exact, with its images as the
    conditioning images (chained jobs: refine or vary one job's images with another model)."""
    run_enqueue(JobSource(flags["output"], source_job, partial=partial), **flags)


@enqueue_group.command("partiprompts")
@click.option("--path", metavar="PATH_OR_URL", help="PartiPrompts.tsv (default: the public URL).")
@click.option("--category", multiple=True, help="Only this category (repeatable; spaces and case ignored).")
@click.option("--challenge", multiple=True, help="Only this challenge (repeatable; spaces and case ignored).")
@conditioning_options()
@job_options
def enqueue_partiprompts(
    path: str | None, category: tuple[str, ...], challenge: tuple[str, ...], **flags
) -> None:
    """PartiPrompts (1,632 prompts, TSV with Prompt, Category, Challenge, Note)."""
    run_enqueue(PartiPrompts(path), match={"category": category, "challenge": challenge}, **flags)


@enqueue_group.command("diffusiondb")
@click.option(
    "--subset",
    type=click.Choice(sorted(load_config("datasets")["diffusiondb"]["subsets"])),
    default="2m",
    show_default=True,
    help="2m: metadata.parquet (2M rows); large: metadata-large.parquet (14M rows).",
)
@click.option(
    "--path",
    metavar="PATH_OR_URL",
    help="The metadata parquet, or a folder of part-XXXXXX.json/.zip "
    "(default: the subset's table on the Hugging Face Hub).",
)
@click.option(
    "--seeds",
    type=click.Choice(["source", "derived"]),
    default="source",
    show_default=True,
    help="source: each prompt keeps DiffusionDB's seed; derived: seeds from --seed and the row.",
)
@CARRY
@conditioning_options()
@job_options
def enqueue_diffusiondb(subset: str, path: str | None, seeds: str, carry: tuple[str, ...], **flags) -> None:
    """DiffusionDB 2M or Large; its own settings become source_* fields, generation uses the job's."""
    run_enqueue(DiffusionDB(path, subset=subset, seeds=seeds, carry=carry or None), **flags)


@enqueue_group.command("journeydb")
@click.option(
    "--path", required=True, metavar="PATH_OR_URL", help="Annotation JSON Lines, plain or in a .tgz."
)
@click.option(
    "--field",
    type=click.Choice(sorted(TEXT_FIELDS)),
    default="prompt",
    show_default=True,
    help="Generate from the Midjourney prompt or from the caption (Task2.Caption).",
)
@CARRY
@conditioning_options()
@job_options
def enqueue_journeydb(path: str, field: str, carry: tuple[str, ...], **flags) -> None:
    """JourneyDB annotations; the other fields (img_path, Task1.*, ...) are carried."""
    run_enqueue(JourneyDB(path, field=field, carry=carry or None), **flags)


class InputFormat(click.Choice):
    """``enqueue file``'s ``--format``: the prompt file's format; an image format given here is
    pointed to ``--image-format``."""

    def convert(self, value, param, ctx):
        if value in IMAGE_FORMATS or value == "jpg":
            raise UserError(
                f"--format {value}: for `enqueue file`, --format is the prompt file's format "
                f"({', '.join(FORMATS)}); the images' format is --image-format {value.replace('jpg', 'jpeg')}"
            )
        return super().convert(value, param, ctx)


@enqueue_group.command("file")
@click.argument("path", metavar="PATH_OR_URL")
@click.option(
    "--format",
    "input_format",
    type=InputFormat(FORMATS),
    help="Input format [from the file name] (the image format is --image-format).",
)
@click.option("--column", metavar="NAME", help="The prompt column; a dot path in JSON (Task2.Caption).")
@CARRY
@conditioning_options()
@_job_options(("--image-format",))  # here --format is the input's format
def enqueue_file(
    path: str, input_format: str | None, column: str | None, carry: tuple[str, ...], **flags
) -> None:
    """Any prompt file: txt, csv, tsv, json, jsonl or parquet (compressed or in a tar archive too)."""
    run_enqueue(open_file(path, input_format, column=column, carry=carry or None), **flags)


cli.add_command(status_view.status_command)
cli.add_command(jobs.jobs_command)
cli.add_command(finalize.finalize_command)
cli.add_command(gallery.gallery_command)
cli.add_command(reconcile_command)
cli.add_command(retry_command)
cli.add_command(verify_command)
cli.add_command(gc_command)
cli.add_command(dedupe_command)
cli.add_command(report_command)
cli.add_command(topup_command)

main = functools.partial(console.run, cli, hard_exit=True)
