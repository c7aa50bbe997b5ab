"""``producer topup``: enqueue rounds of new seeds for the prompts still short of a quota,
until every quota is met or a limit is reached.

A quota (``--until N [--per COLUMN] --where ...``, :mod:`producer.quotas`) counts the
committed rows that pass the conditions, per value of ``--per``. Each round:

1. waits until no shard of the job is open (every earlier round committed or failed: a
   quota counted while rows are still on their way would ask for them twice), re-sending
   shards that are neither committed nor in the queue (a topup stopped between writing a
   round and sending it);
2. counts; a met quota ends it (run again, it enqueues nothing), as does ``--max-rounds``
   (rounds in the job, all runs together) or ``--budget`` (GPU-hours spent by the job's
   committed shards, from their stats);
3. draws the round's rows from the enqueued prompts of every short group: for a group
   short by s whose rows passed at rate p so far (the job's rate where the group has none
   passing), ceil(s / p) rows (at most ``[topup] max_factor`` × s, at least s), the group's
   prompts taken in turn, continuing where its last round stopped;
4. writes them as new shards after the job's last (manifests first), with new row ids after
   the job's last and seeds from (job seed, round, row id) (:func:`fewstep.contract.round_seeds`),
   records the round in ``job.json`` (``rounds``, ``quota``, ``counts``), and sends one task
   per shard. Same spec, same committed rows → same rounds, same seeds, same images.

By default topup follows the job until the quota is met or a limit stops it, one command
for the whole run; ``--no-wait`` enqueues at most one round and returns (run it again to
count and go on). Run one topup per job at a time.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from collections.abc import Callable
from typing import Any

import click
import numpy as np
import pyarrow as pa

from fewstep import UserError
from fewstep.contract import (
    JOB_SPEC_KEY,
    images_per_prompt,
    job_metadata_schema,
    job_rounds,
    manifest_key,
    manifest_schema,
    round_seeds,
)
from fewstep.settings import defaults
from fewstep.storage import Store
from producer.cost import device_seconds, read_stats
from producer.enqueue import queued_shards, send_job_shards
from producer.finalize import RowFilter, column_kinds
from producer.options import JSON, OUTPUT, job_store
from producer.progress import Progress, read_progress, read_spec
from producer.quotas import ALL, Quota, check_per, enqueued_prompts, group_labels, quota_progress
from producer.selection import parse_where
from producer.sharding import manifest_bytes


def quota_filter(spec: dict[str, Any], quota: Quota) -> RowFilter:
    """The row filter of a quota's ``--where`` conditions (finalize's grammar and columns)."""
    kinds = column_kinds(job_metadata_schema(spec), spec["source"].get("fields", {}))
    return RowFilter([parse_where(w, kinds, "metadata column") for w in quota.where], None, False)


def job_quota_progress(store: Store, progress: Progress, quota: Quota) -> dict[str, Any]:
    """How far the job's committed rows are from ``quota`` (:func:`producer.quotas.quota_progress`)."""
    row_filter = quota_filter(progress.spec, quota)
    return quota_progress(
        store, progress.spec, sorted(progress.committed), quota, lambda t: row_filter.fresh().apply(t),
        row_filter.columns,
    )  # fmt: skip


def gpu_seconds(store: Store) -> float:
    """Device seconds the job's committed shards spent, from their stats (:mod:`producer.cost`)."""
    return sum(device_seconds(s) for s in read_stats(store))


def round_rows(
    prompts: pa.Table, spec: dict[str, Any], quota: Quota, counted: dict[str, Any]
) -> tuple[np.ndarray, dict[str, int]]:
    """Positions (in ``prompts``, round 0's rows) of the next round's rows, and rows per group."""
    cfg = defaults()["topup"]
    factor = int(cfg["max_factor"])
    labels = group_labels(prompts.column(quota.per).to_pylist()) if quota.per else [ALL] * prompts.num_rows
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(labels):
        by_group.setdefault(g, []).append(i)
    per_prompt = images_per_prompt(spec)
    overall = counted["passing"] / counted["generated"] if counted["passing"] else None
    done_before: dict[str, int] = {}
    for r in spec.get("rounds") or []:
        for g, n in r.get("groups", {}).items():
            done_before[g] = done_before.get(g, 0) + int(n)
    chosen, groups = [], {}
    for g, c in sorted(counted["groups"].items()):
        if not c["short"] or g not in by_group:
            continue
        rate = c["passing"] / c["generated"] if c["passing"] else overall
        images = math.ceil(c["short"] / rate) if rate else factor * c["short"]
        images = min(max(images, c["short"]), factor * c["short"])
        n = math.ceil(images / per_prompt)
        members = np.array(by_group[g])
        chosen.append(members[(done_before.get(g, 0) + np.arange(n)) % len(members)])
        groups[g] = n
    return (np.concatenate(chosen) if chosen else np.array([], dtype=np.int64)), groups


def enqueue_round(
    store: Store, spec: dict[str, Any], quota: Quota, counted: dict[str, Any]
) -> dict[str, Any]:
    """Write and send the next round for the short groups; returns its record in ``job.json``."""
    prompts = enqueued_prompts(store, spec)
    positions, groups = round_rows(prompts, spec, quota, counted)
    number = len(job_rounds(spec))
    first_row, first_shard = int(spec["counts"]["prompts"]), int(spec["counts"]["shards"]) + 1
    rows = prompts.take(pa.array(positions, pa.int64()))
    row_ids = np.arange(first_row, first_row + rows.num_rows, dtype=np.int64)
    rows = rows.set_column(rows.schema.get_field_index("row_id"), "row_id", pa.array(row_ids))
    seeds = pa.array(round_seeds(int(spec["seed"]), number, row_ids), pa.uint32())
    rows = rows.set_column(rows.schema.get_field_index("seed"), "seed", seeds)
    schema = manifest_schema(spec["source"].get("fields", {}), "conditioning" in spec)
    rows = rows.select(schema.names).cast(schema)
    size = int(spec["shard_size"])
    shards = math.ceil(rows.num_rows / size)
    for i in range(shards):  # manifests first: a job.json never names a shard without one
        store.put(manifest_key(first_shard + i), manifest_bytes(rows.slice(i * size, size)))
    record = {
        "round": number,
        "first_shard": first_shard,
        "shards": shards,
        "first_row": first_row,
        "prompts": rows.num_rows,
        "groups": groups,
        "short": {g: c["short"] for g, c in counted["groups"].items() if c["short"]},
        "seeds": "fewstep.contract.round_seeds(job seed, round, row id)",
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    current = read_spec(store)
    if current.get("counts") != spec.get("counts") or current.get("rounds") != spec.get("rounds"):
        raise UserError(f"job {spec['job']} changed while this topup ran (another topup?): run it again")
    updated = {
        **current,
        "quota": quota.describe(),
        "rounds": [*(current.get("rounds") or []), record],
        "counts": {
            **current["counts"],
            "prompts": first_row + rows.num_rows,
            "shards": first_shard - 1 + shards,
        },
    }
    store.put(JOB_SPEC_KEY, json.dumps(updated, indent=2, ensure_ascii=False).encode())
    send_job_shards(updated, range(first_shard, first_shard + shards))
    return record


def _record_quota(store: Store, spec: dict[str, Any], quota: Quota) -> None:
    """Keep the quota in job.json (status shows its progress) when it is new."""
    if spec.get("quota") != quota.describe():
        store.put(
            JOB_SPEC_KEY,
            json.dumps({**spec, "quota": quota.describe()}, indent=2, ensure_ascii=False).encode(),
        )


def topup(
    store: Store,
    quota: Quota,
    *,
    max_rounds: int | None = None,
    budget_gpu_hours: float | None = None,
    wait: bool = True,
    on_event: Callable[[str], None] = lambda _line: None,
) -> dict[str, Any]:
    """Fill ``quota`` (see the module's docstring); returns the outcome and the last count."""
    cfg = defaults()["topup"]
    poll = float(cfg["poll_seconds"])
    # --max-rounds, else the configured default unless a --budget is what limits the run.
    limit = max_rounds
    if limit is None and budget_gpu_hours is None:
        limit = int(cfg["max_rounds"])
    progress = read_progress(store)
    check_per(progress.spec, quota.per)
    quota_filter(progress.spec, quota)  # a bad --where fails before anything is sent
    enqueued: list[dict[str, Any]] = []
    resent = False
    while True:
        progress = read_progress(store)
        spec = progress.spec
        if progress.open_shards:
            if not resent:
                queued = queued_shards(spec)
                missing = [s for s in progress.open_shards if s not in queued]
                if missing:
                    send_job_shards(spec, missing)
                resent = True
            if not wait:
                return _outcome("running", store, progress, quota, enqueued, None)
            time.sleep(poll)
            continue
        resent = False
        counted = job_quota_progress(store, progress, quota)
        if counted["met"]:
            _record_quota(store, spec, quota)
            return _outcome("met", store, progress, quota, enqueued, counted)
        rounds = len(spec.get("rounds") or [])
        if limit is not None and rounds >= limit:
            return _outcome("max-rounds", store, progress, quota, enqueued, counted)
        spent = gpu_seconds(store)
        if budget_gpu_hours is not None and spent >= budget_gpu_hours * 3600:
            return _outcome("budget", store, progress, quota, enqueued, counted)
        record = enqueue_round(store, spec, quota, counted)
        enqueued.append(record)
        on_event(
            f"round {record['round']}: {record['prompts']:,} prompts in {record['shards']:,} shards for "
            f"{len(record['groups']):,} short groups ({counted['short']:,} rows short)"
        )
        if not wait:
            return _outcome("running", store, read_progress(store), quota, enqueued, counted)


def _outcome(state, store, progress, quota, enqueued, counted) -> dict[str, Any]:
    return {
        "job": progress.spec["job"],
        "state": state,
        "rounds_enqueued": [r["round"] for r in enqueued],
        "prompts_enqueued": sum(r["prompts"] for r in enqueued),
        "rounds": len(progress.spec.get("rounds") or []),
        "quota": counted or job_quota_progress(store, progress, quota),
        "gpu_hours": round(gpu_seconds(store) / 3600, 6),
    }


@click.command("topup")
@click.argument("job")
@OUTPUT
@click.option(
    "--until", type=click.IntRange(min=1), required=True, metavar="N", help="Passing rows wanted per group."
)
@click.option(
    "--per",
    metavar="COLUMN",
    help="Group by this prompt column (category; source_row: per prompt) [one group].",
)
@click.option(
    "--where",
    multiple=True,
    metavar="COLUMN<OP>NUMBER",
    help="A row passes when every condition holds, e.g. 'clip_score>=28' (finalize's --where).",
)
@click.option(
    "--max-rounds",
    type=click.IntRange(min=0),
    help="Top-up rounds in the job at most [config topup.max_rounds].",
)
@click.option(
    "--budget",
    "budget",
    type=click.FloatRange(min=0),
    metavar="GPU_HOURS",
    help="Stop once the job's shards spent this many GPU-hours.",
)
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="Follow the job until met or limited, or enqueue one round and return.",
)
@JSON
def topup_command(job, output, until, per, where, max_rounds, budget, wait, as_json) -> None:
    """Enqueue rounds with new seeds for the prompts of groups short of N passing rows, until met.

    Waits for each round to finish before counting again (--no-wait: one round, then return);
    stops at --max-rounds or --budget. Run again after it is met: it enqueues nothing.
    """
    store = job_store(output, job)
    echo = (lambda _line: None) if as_json else (lambda line: click.echo(line, err=True))
    outcome = topup(
        store,
        Quota(until, per, tuple(where)),
        max_rounds=max_rounds,
        budget_gpu_hours=budget,
        wait=wait,
        on_event=echo,
    )
    if as_json:
        click.echo(json.dumps(outcome))
        return
    q = outcome["quota"]
    click.echo(
        f"topup {outcome['job']}: {outcome['state']}; {q['groups_met']:,} of {len(q['groups']):,} groups met "
        f"({q['passing']:,} passing rows, {q['short']:,} short); {len(outcome['rounds_enqueued'])} rounds "
        f"enqueued now, {outcome['rounds']} in the job; {outcome['gpu_hours']:.4f} GPU-hours spent"
    )
