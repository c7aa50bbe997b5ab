"""Command-line options the producer's commands share."""

from __future__ import annotations

import click

OUTPUT = click.option(
    "--output",
    envvar="FEWSTEP_OUTPUT",
    required=True,
    metavar="URL",
    help="Where jobs live: s3://BUCKET/PREFIX or a local directory (env FEWSTEP_OUTPUT).",
)
JSON = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
