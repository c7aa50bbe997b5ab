"""``producer status``: the view of a job — progress, rate and ETA, shard counts, workers, last errors.

``render`` draws one :class:`~producer.status.JobStatus`; ``watch`` redraws it in place
until the job is done or has nothing left to run (or Ctrl-C).
"""

from __future__ import annotations

import json
import time

import click
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from fewstep.console import stdout_console
from fewstep.settings import defaults
from producer.cost import GPU_PRICE, cost_line
from producer.cost import gpu_price as price_of
from producer.options import JSON, OUTPUT, job_store
from producer.status import JobStatus, StatusReader

STATE_STYLES = {"done": "bold green", "failed": "bold red", "running": "bold cyan", "queued": "bold yellow"}
FINISHED = ("done", "failed")


def _shard_cell(shard: object, uploaded: object, total: object) -> str:
    """``part-000042 (96/256)``: the shard a worker runs and how far its uploads are."""
    if not isinstance(shard, int) or shard <= 0:
        return ""
    if isinstance(uploaded, int) and isinstance(total, int) and total:
        return f"part-{shard:06d} ({uploaded}/{total})"
    return f"part-{shard:06d}"


def duration(seconds: float | None) -> str:
    """``1:02:03``, ``2d 3:04:05``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    seconds = round(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days}d {clock}" if days else clock


def ago(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f}s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _bar(done: int, total: int) -> Table:
    row = Table.grid(padding=(0, 1))
    row.add_row(
        ProgressBar(total=max(total, 1), completed=done, width=40),
        Text(f"{done:,}/{total:,}"),
        Text(f"{100 * done / total:5.1f}%" if total else "  -  "),
    )
    return row


def _eta(s: dict) -> str:
    if s["state"] in FINISHED:
        return "-"
    if s["eta_s"] is None and not s["workers_live"]:
        return "- (no live worker)"
    return duration(s["eta_s"])


def render(status: JobStatus) -> Group:
    """One frame of the view."""
    s = status.summary()
    header = Text.assemble(
        ("job ", "dim"),
        (s["job"], "bold"),
        " ",
        (f"[{s['state']}]", STATE_STYLES.get(s["state"], "bold")),
        ("  model ", "dim"),
        s["model"],
        ("  layout ", "dim"),
        s["layout"],
        ("  ", ""),
        (s["job_url"], "dim"),
    )

    bars = Table.grid(padding=(0, 2))
    queued = "?" if s["shards_queued"] is None else f"{s['shards_queued']:,}"
    bars.add_row(
        Text("shards", style="bold"),
        _bar(s["shards_done"], s["shards_total"]),
        Text.assemble(
            (f"{s['shards_done']:,} done", "green"),
            " · ",
            (f"{s['shards_running']:,} running", "cyan"),
            " · ",
            (f"{queued} queued", "yellow"),
            " · ",
            (f"{s['shards_failed']:,} failed", "red" if s["shards_failed"] else ""),
        ),
    )
    rate = "?" if s["images_per_s"] is None else f"{s['images_per_s']:,.1f}"
    bars.add_row(
        Text("images", style="bold"),
        _bar(s["images_done"], s["images_total"]),
        Text(f"{rate} img/s · ETA {_eta(s)} · elapsed {duration(s['elapsed_s'])}"),
    )

    parts: list = [header, bars]
    queue = s["queue"]
    if not queue["reachable"]:
        why = "not asked" if queue["error"] == "not asked" else f"not reachable ({queue['error']})"
        parts.append(Text(f"Redis {why}: queued shards unknown", style="yellow"))
    if s["shards_unqueued"] and s["state"] not in FINISHED:
        parts.append(
            Text(
                f"{s['shards_unqueued']:,} open shards are neither queued nor running (Redis flushed or "
                f"restarted empty?): `producer reconcile {s['job']}` sends them again",
                style="yellow",
            )
        )
    stages = s["stages"]
    if stages:
        idle = stages["gpu_idle_fraction"]
        parts.append(
            Text(
                "stages over {shards} shards: generate {g} · encode {e} · upload {u}{idle}".format(
                    shards=stages["shards"],
                    g=duration(stages["generate_s"]),
                    e=duration(stages["encode_s"]),
                    u=duration(stages["upload_s"]),
                    idle="" if idle is None else f" · {stages['device']} idle {100 * idle:.1f}%",
                ),
                style="dim",
            )
        )

    if s.get("cost"):
        parts.append(Text(f"cost: {cost_line(s['cost'])}", style="dim"))

    if s.get("quota"):
        parts.append(quota_table(s["quota"]))

    if s["workers"]:
        workers = Table(title=f"workers ({s['workers_live']} live)", title_justify="left", expand=False)
        for column in ("worker", "device", "state", "shard", "images", "img/s", "last heartbeat"):
            workers.add_column(column, justify="right" if column in ("images", "img/s") else "left")
        for w in s["workers"]:
            state = w.get("state", "?") if w["live"] else f"gone ({w.get('state', '?')})"
            shard = w.get("shard")
            w_rate = w.get("images_per_s")
            workers.add_row(
                str(w.get("worker")),
                str(w.get("device", "")),
                Text(state, style="green" if w["live"] and state == "working" else "dim"),
                _shard_cell(shard, w.get("shard_images_uploaded"), w.get("shard_images")),
                f"{int(w.get('images_done') or 0):,}",
                f"{w_rate:,.1f}" if isinstance(w_rate, int | float) else "",
                ago(w.get("age_s")),
            )
        parts.append(workers)

    if s["last_errors"]:
        errors = Table(title="last errors", title_justify="left", expand=False)
        for column in ("shard", "when", "from", "error"):
            errors.add_column(column, overflow="fold")
        for e in s["last_errors"]:
            errors.add_row(
                e.get("part") or "",
                str(e.get("at") or "")[:19].replace("T", " "),
                "given up" if e["source"] == "failed" else str(e.get("worker") or ""),
                Text(e["error"][:300], style="red"),
            )
        parts.append(errors)
    return Group(*parts)


def quota_table(q: dict) -> Table:
    """The quota `producer topup` fills: passing rows of each group against the target."""
    where = " and ".join(q["where"]) or "every row"
    per = f" per {q['per']}" if q["per"] else ""
    title = f"quota: {q['until']:,} rows{per} where {where} ({q['groups_met']:,}/{len(q['groups']):,} met)"
    table = Table(title=title, title_justify="left", expand=False)
    for column in ("group", "passing", "generated", "short"):
        table.add_column(column, justify="left" if column == "group" else "right")
    groups = sorted(q["groups"].items(), key=lambda kv: (-kv[1]["short"], kv[0]))
    for name, g in groups[:20]:
        style = "green" if not g["short"] else "yellow"
        table.add_row(name, f"{g['passing']:,}", f"{g['generated']:,}", Text(f"{g['short']:,}", style=style))
    if len(groups) > 20:
        table.add_row(f"… {len(groups) - 20:,} more", "", "", "")
    return table


def watch(reader: StatusReader, interval: float, console: Console | None = None) -> JobStatus:
    """Redraw the status every ``interval`` seconds until the job is finished or Ctrl-C; in a
    pipe or a file (no terminal to redraw on), print one whole frame per refresh instead."""
    console = console or stdout_console()
    status = reader.read()
    if not console.is_terminal:
        try:
            while True:
                console.print(render(status))
                console.print()
                console.file.flush()
                if status.progress.state in FINISHED:
                    break
                time.sleep(interval)
                status = reader.read()
        except KeyboardInterrupt:
            pass
        return status
    with Live(render(status), console=console, auto_refresh=False) as live:
        try:
            while status.progress.state not in FINISHED:
                time.sleep(interval)
                status = reader.read()
                live.update(render(status), refresh=True)
        except KeyboardInterrupt:
            pass
    return status


@click.command("status")
@click.argument("job")
@OUTPUT
@JSON
@click.option(
    "--watch",
    "follow",
    is_flag=True,
    help="Redraw live until the job is finished (Ctrl-C stops); with --json, one object per line.",
)
@click.option(
    "--interval", type=click.FloatRange(min=0.1), metavar="SECONDS", help="Refresh interval of --watch [2]."
)
@click.option("--no-redis", is_flag=True, help="Read storage only; queued shards are then unknown.")
@GPU_PRICE
def status_command(
    job: str,
    output: str,
    as_json: bool,
    follow: bool,
    interval: float | None,
    no_redis: bool,
    gpu_price: float | None,
):
    """Progress of JOB from storage: shards, images, rate and ETA, workers, last errors.

    Commit markers, failed markers, per-shard stats and worker heartbeats are read from
    storage; Redis is only asked how many shards still wait (unknown when it is gone).
    """
    reader = StatusReader(job_store(output, job), use_redis=not no_redis, gpu_price=price_of(gpu_price))
    interval = interval or float(defaults()["status"]["watch_interval"])
    if follow and not as_json:
        watch(reader, interval)
        return
    status = reader.read()
    while follow and status.progress.state not in FINISHED:  # --watch --json: one object per line
        click.echo(json.dumps(status.summary()), nl=True)
        time.sleep(interval)
        status = reader.read()
    if as_json:
        click.echo(json.dumps(status.summary()))
    else:
        stdout_console().print(render(status))
