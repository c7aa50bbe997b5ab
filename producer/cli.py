"""The ``producer`` command: enqueue prompt sets, follow jobs."""

from __future__ import annotations

import functools
import json

import click

from fewstep import console
from fewstep.storage import open_store
from producer.enqueue import JobOptions, enqueue
from producer.options import JSON, OUTPUT
from producer.progress import read_progress
from producer.reconcile import reconcile_command
from producer.retry import retry_command
from producer.sources.partiprompts import PartiPrompts
from producer.verify import verify_command


def job_options(command):
    """The options every ``enqueue`` source shares."""
    options = [
        click.option("--model", required=True, help="Preset name, hub id or local directory."),
        click.option("--job", required=True, help="Job name (letters, digits, . _ -)."),
        OUTPUT,
        click.option("--shard-size", type=click.IntRange(min=1), help="Prompts per shard [256]."),
        click.option("--limit", type=click.IntRange(min=0), help="Enqueue at most N prompts."),
        click.option("--seed", type=int, help="Job seed; per-prompt seeds derive from it [0]."),
        click.option("--steps", type=click.IntRange(min=1), help="Override the preset's steps."),
        click.option("--guidance", type=float, help="Override the preset's guidance scale."),
        click.option("--width", type=click.IntRange(min=8), help="Override the preset's width."),
        click.option("--height", type=click.IntRange(min=8), help="Override the preset's height."),
        click.option(
            "--format", "image_format", type=click.Choice(["png", "jpeg", "webp"]), help="Image format [png]."
        ),
        click.option("--quality", type=click.IntRange(1, 100), help="JPEG/WebP quality [90]."),
        click.option("--png-level", type=click.IntRange(0, 9), help="PNG compression level [6]."),
        click.option(
            "--dry-run", is_flag=True, help="Count prompts and shards; touch neither Redis nor storage."
        ),
        JSON,
    ]
    for option in reversed(options):
        command = option(command)
    return command


def run_enqueue(source, *, dry_run: bool, as_json: bool, **flags) -> None:
    """Enqueue ``source`` with the shared job options and print the summary."""
    summary = enqueue(source, JobOptions(**flags), dry_run=dry_run)
    if as_json:
        click.echo(json.dumps(summary))
        return
    if summary.get("dry_run"):
        click.echo(
            f"dry run: {summary['prompts']} prompts in {summary['shards']} shards "
            f"({summary['skipped_empty']} empty skipped); nothing written"
        )
        return
    verb = "resumed" if summary["resumed"] else "enqueued"
    click.echo(
        f"{verb} job {summary['job']}: {summary['prompts']} prompts in {summary['shards']} shards, "
        f"{summary['enqueued']} tasks sent to queue {summary['queue']}"
    )
    click.echo(f"job spec: {summary['job_url']}/job.json")


@click.group()
@click.version_option(package_name="fewstep")
def cli() -> None:
    """Shard prompt sets into Celery tasks and follow the jobs, from storage."""


@cli.group("enqueue")
def enqueue_group() -> None:
    """Enqueue a prompt set as a job: manifests and job spec to storage, tasks to Redis."""


@enqueue_group.command("partiprompts")
@click.option("--path", metavar="PATH_OR_URL", help="PartiPrompts.tsv (default: the public URL).")
@job_options
def enqueue_partiprompts(path: str | None, **flags) -> None:
    """PartiPrompts (1,632 prompts, TSV with Prompt, Category, Challenge, Note)."""
    run_enqueue(PartiPrompts(path), **flags)


@cli.command("status")
@click.argument("job")
@OUTPUT
@JSON
def status(job: str, output: str, as_json: bool) -> None:
    """Progress of JOB, read from storage (commit markers), not from Redis."""
    root = open_store(output)
    root.check()
    summary = read_progress(root.child(job)).summary()
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(
        f"{summary['job']} [{summary['state']}] model {summary['model']}: "
        f"shards {summary['shards_done']}/{summary['shards_total']} done, {summary['shards_failed']} failed; "
        f"images {summary['images_done']}/{summary['images_total']}"
    )


cli.add_command(reconcile_command)
cli.add_command(retry_command)
cli.add_command(verify_command)

main = functools.partial(console.run, cli)
