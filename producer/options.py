"""Command-line pieces the producer's commands share: options, the job's store, a progress bar."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fewstep import UserError
from fewstep.contract import check_job_name
from fewstep.storage import Store, open_store


def _required_output(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str:
    if not value:
        raise UserError(
            "no output location: pass --output s3://BUCKET/PREFIX (or a local directory), or set "
            "FEWSTEP_OUTPUT (`fewstep services start` prints one for its bucket)"
        )
    return value


OUTPUT = click.option(
    "--output",
    envvar="FEWSTEP_OUTPUT",
    callback=_required_output,
    metavar="URL",
    help="Where jobs live: s3://BUCKET/PREFIX or a local directory (env FEWSTEP_OUTPUT).",
)
JSON = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")


def abandoned_after(help_text: str) -> Callable:
    """``--abandoned-after SECONDS`` (default an hour): when something left unfinished counts as
    abandoned; ``help_text`` says what."""
    return click.option(
        "--abandoned-after",
        type=click.FloatRange(min=0),
        default=3600,
        show_default=True,
        metavar="SECONDS",
        help=help_text,
    )


def download_option(help_text: str) -> Callable:
    """``--download DIR``: also copy a page's folder (gallery, report) into a local directory."""
    return click.option(
        "--download", "download_dir", type=click.Path(file_okay=False, path_type=Path), help=help_text
    )


def job_store(output: str, job: str) -> Store:
    """The store of ``job`` under ``output``, after checking the job's name and that the
    output is reachable."""
    check_job_name(job)
    root = open_store(output)
    root.check()
    return root.child(job)


@contextlib.contextmanager
def progress_bar(label: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr (only on a terminal); yields ``update(done, total)``."""
    console = Console(stderr=True)
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
