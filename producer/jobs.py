"""``producer jobs``: the jobs under an output location, with their state and counts.

A job is a folder with a ``job.json``; its state comes from its commit and failed
markers (as in ``producer status``), and ``finalized.json`` tells whether
``producer finalize`` has run on it.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from fewstep import UserError
from fewstep.console import stdout_console
from fewstep.contract import FINALIZED_KEY
from fewstep.storage import KeyMissing, Store, open_store
from producer.options import JSON, OUTPUT
from producer.progress import read_progress
from producer.status_view import STATE_STYLES


def job_row(job_store: Store) -> dict[str, Any] | None:
    """The summary of the job in ``job_store``, or None when the folder holds no job."""
    try:
        progress = read_progress(job_store)
    except UserError:  # no job.json: some other folder
        return None
    try:
        finalized = json.loads(job_store.get(FINALIZED_KEY))
    except (KeyMissing, ValueError):
        finalized = None
    return {
        **progress.summary(),
        "created_at": progress.spec.get("created_at"),
        "finalized_at": finalized.get("finalized_at") if isinstance(finalized, dict) else None,
        "finalized_partial": bool(finalized.get("partial")) if isinstance(finalized, dict) else None,
    }


def list_jobs(root: Store, threads: int = 16) -> list[dict[str, Any]]:
    """Every job directly under ``root``, oldest first."""
    folders = list(root.folders())
    if not folders:
        return []
    with ThreadPoolExecutor(min(threads, len(folders))) as pool:
        rows = [r for r in pool.map(lambda name: job_row(root.child(name)), folders) if r]
    return sorted(rows, key=lambda r: (str(r.get("created_at") or ""), r["job"]))


@click.command("jobs")
@OUTPUT
@JSON
def jobs_command(output: str, as_json: bool) -> None:
    """The jobs under --output: state, model, shards and images done, finalized or not."""
    root = open_store(output)
    root.check()
    rows = list_jobs(root)
    if as_json:
        click.echo(json.dumps({"output": root.url, "jobs": rows}))
        return
    if not rows:
        click.echo(f"no jobs under {root.url}")
        return
    table = Table(title=f"jobs under {root.url}", title_justify="left")
    for column in ("job", "state", "model", "layout", "shards", "failed", "images", "created", "finalized"):
        table.add_column(column, justify="right" if column in ("shards", "failed", "images") else "left")
    for r in rows:
        finalized = ""
        if r["finalized_at"]:
            finalized = r["finalized_at"][:19].replace("T", " ") + (
                " (partial)" if r["finalized_partial"] else ""
            )
        table.add_row(
            r["job"],
            Text(r["state"], style=STATE_STYLES.get(r["state"], "")),
            r["model"],
            r["layout"],
            f"{r['shards_done']:,}/{r['shards_total']:,}",
            f"{r['shards_failed']:,}",
            f"{r['images_done']:,}/{r['images_total']:,}",
            str(r.get("created_at") or "")[:19].replace("T", " "),
            finalized,
        )
    stdout_console().print(table)
