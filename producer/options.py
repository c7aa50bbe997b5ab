"""Command-line options the job commands share."""

from __future__ import annotations

import click

from fewstep.storage import Store, open_store

OUTPUT = click.option(
    "--output",
    envvar="FEWSTEP_OUTPUT",
    required=True,
    metavar="URL",
    help="Where jobs live: s3://BUCKET/PREFIX or a local directory (env FEWSTEP_OUTPUT).",
)
JSON = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")


def job_store(output: str, job: str) -> Store:
    """The store of ``job`` under ``output``, after checking that the output is reachable."""
    root = open_store(output)
    root.check()
    return root.child(job)
