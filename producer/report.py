"""``producer report``: one HTML page on the scores of one or more jobs, to filter a dataset or
compare models.

For every score the jobs have (``clip_score``, ``aesthetic``, ``nsfw_score``, ``pickscore``,
``hpsv2``: ``--score`` jobs),
the page shows a histogram (all jobs on common bins), the mean per group of ``--by`` (e.g.
PartiPrompts' ``category``; without it one group, ``all``) with its 95% confidence interval
(Student's t on the group's rows: mean ± t(0.975, n−1)·s/√n; none for a single row), one bar
per job side by side, and a table of the same numbers. Jobs made from the same prompt set (same
source and path; the selection may differ) are also compared pairwise on the source rows they
share (a paired comparison removes the prompts' own spread): for each job against the first,
the mean difference with its 95% confidence interval and the win rate (the share of prompts where
the job scored higher; ties count half). The best and worst images of each group and job, by
``--rank-by`` (clip_score by default), are shown as thumbnails with their prompt and scores.

Everything is written under ``report/`` in the first job's folder: ``index.html``, the plots as
SVG (matplotlib, Agg backend), ``thumbs/*.jpg``, ``report.csv`` (every number of the score
tables) and, when jobs were compared, ``comparison.csv``. Every link is relative and the page
has no script, so the folder opens anywhere (``--download DIR`` copies it). Images are read with
:func:`producer.images.read_images`, so every layout works. Rows with a null score (not computed)
are left out of that score's numbers, and counted (``n``). A table gives each job's images
generated and kept, GPU-hours and cost per 1,000 kept images (:mod:`producer.cost`; per model
too when the jobs ran several models).
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import click
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fewstep import UserError
from fewstep.contract import SCORE_COLUMNS, job_layout, job_metadata_schema, metadata_key
from fewstep.settings import defaults
from fewstep.storage import Store, read_table
from producer.best_of_k import report_sections
from producer.cost import GPU_PRICE, by_model, cost_summary, read_stats
from producer.cost import gpu_price as price_of
from producer.gallery import NO_VALUE, download, page_head, thumbnail
from producer.images import read_images
from producer.options import JSON, OUTPUT, download_option, job_store
from producer.progress import read_progress

REPORT = "report"
INDEX = f"{REPORT}/index.html"
ALL = "all"
SCORE_NAMES = {"clip_score": "CLIP score", "aesthetic": "aesthetic", "nsfw_score": "NSFW score",
               "pickscore": "PickScore", "hpsv2": "HPS v2.1"}  # fmt: skip
#: Scores where a lower value is the better image.
LOWER_IS_BETTER = {"nsfw_score"}
IMAGE_COLUMNS = ["image_key", "bytes", "image_offset", "image_row"]
STATS_FIELDS = [
    "job",
    "model",
    "score",
    "group",
    "n",
    "mean",
    "ci_low",
    "ci_high",
    "std",
    "median",
    "min",
    "max",
]
PAIRED_FIELDS = ["job", "baseline", "score", "group", "n", "mean_difference", "ci_low", "ci_high", "win_rate"]

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #222; background: #fafafa; }
h2 { margin: 2rem 0 .5rem; } h3 { margin: 1.2rem 0 .4rem; font-size: 1rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; background: #fff; }
th, td { border: 1px solid #ddd; padding: .2rem .5rem; text-align: right; }
th:first-child, td:first-child, td.text { text-align: left; }
.plots img { max-width: 100%; background: #fff; border: 1px solid #ddd; margin: .3rem 0; }
.strip { display: flex; flex-wrap: wrap; gap: .5rem; margin: .3rem 0 .8rem; }
figure { margin: 0; width: 200px; background: #fff; border: 1px solid #ddd; border-radius: 6px; }
figure img { display: block; width: 100%; height: auto; background: #eee; }
figcaption { padding: .3rem .4rem; font-size: 12px; overflow-wrap: anywhere; }
.label { color: #777; font-size: 12px; margin: .2rem 0; }
"""


@dataclass
class JobScores:
    """One job's committed rows with the columns the report needs."""

    store: Store
    spec: dict[str, Any]
    table: pa.Table
    scores: list[str]  # score columns with at least one value

    @property
    def name(self) -> str:
        return self.spec["job"]

    @property
    def model(self) -> str:
        return self.spec["model"]["name"]

    def prompt_set(self) -> str:
        """What identifies the prompt set: the source block less the selection."""
        return json.dumps({k: v for k, v in self.spec["source"].items() if k != "selection"}, sort_keys=True)


def load_job(store: Store, by: str | None, threads: int = 16) -> JobScores:
    """A job's committed rows (scores, group, prompt, where its image is); a :class:`UserError`
    when it has no scores."""
    progress = read_progress(store)
    spec = progress.spec
    names = job_metadata_schema(spec).names
    if by is not None and by not in names:
        fields = ", ".join(spec["source"].get("fields", {})) or "none"
        raise UserError(f"--by {by!r} is not a column of job {spec['job']}; its source fields: {fields}")
    shards = sorted(progress.committed)
    if not shards:
        raise UserError(f"job {spec['job']} has no committed shard yet: nothing to report")
    scores = [c for c in SCORE_COLUMNS if c in names]
    wanted = ["row_id", "source_row", "prompt", *IMAGE_COLUMNS, *scores]
    columns = [c for c in dict.fromkeys([*wanted, *([by] if by else [])]) if c in names]
    with ThreadPoolExecutor(max(1, min(threads, len(shards)))) as pool:
        parts = list(pool.map(lambda s: read_table(store, metadata_key(s), columns), shards))
    table = pa.concat_tables(parts).sort_by("row_id")
    present = [c for c in scores if table.column(c).null_count < table.num_rows]
    if not present:
        raise UserError(
            f"job {spec['job']} has no scores: enqueue it with --score clip,aesthetic,nsfw to report on it"
        )
    return JobScores(store, spec, table, present)


def groups_of(table: pa.Table, by: str | None) -> np.ndarray:
    """Each row's group name (``all`` without ``--by``; empty or null values as ``(none)``)."""
    if by is None:
        return np.full(table.num_rows, ALL, dtype=object)
    values = pc.cast(table.column(by), pa.string()).to_pylist()
    return np.array([NO_VALUE if v is None or v == "" else v for v in values], dtype=object)


def score_values(table: pa.Table, score: str) -> np.ndarray:
    """The score as float64, NaN where null."""
    return pc.fill_null(pc.cast(table.column(score), pa.float64()), math.nan).to_numpy()


def t_interval(values: np.ndarray) -> tuple[float | None, float | None]:
    """The 95% confidence interval of the mean (Student's t); (None, None) under two values."""
    from scipy.stats import t  # the report alone needs it

    n = len(values)
    if n < 2:
        return None, None
    half = float(t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n))
    mean = float(values.mean())
    return mean - half, mean + half


def describe(values: np.ndarray) -> dict[str, Any]:
    """n, mean, 95% CI, std, median, min, max of the non-NaN values (None where undefined)."""
    values = values[~np.isnan(values)]
    if not len(values):
        return {"n": 0, **dict.fromkeys(STATS_FIELDS[5:])}
    low, high = t_interval(values)
    return {
        "n": len(values),
        "mean": float(values.mean()),
        "ci_low": low,
        "ci_high": high,
        "std": float(values.std(ddof=1)) if len(values) > 1 else None,
        "median": float(np.median(values)),
        "min": float(values.min()),
        "max": float(values.max()),
    }


def group_names(jobs: list[JobScores], by: str | None) -> list[str]:
    """``all`` first, then the groups in name order (``(none)`` last)."""
    names = set()
    for job in jobs:
        names.update(groups_of(job.table, by).tolist())
    names.discard(ALL)
    return [ALL, *sorted(names, key=lambda g: (g == NO_VALUE, g))]


def score_stats(jobs: list[JobScores], scores: list[str], groups: list[str], by: str | None) -> list[dict]:
    """One row per (score, group, job): the numbers of report.csv."""
    out = []
    for score in scores:
        for job in jobs:
            if score not in job.scores:
                continue
            values, names = score_values(job.table, score), groups_of(job.table, by)
            for group in groups:
                chosen = values if group == ALL else values[names == group]
                out.append(
                    {"job": job.name, "model": job.model, "score": score, "group": group, **describe(chosen)}
                )
    return out


def _positions(table: pa.Table, source_rows: np.ndarray) -> np.ndarray:
    """Where each of ``source_rows`` (all present) is in ``table``."""
    source = table.column("source_row").to_numpy()
    order = np.argsort(source, kind="stable")
    return order[np.searchsorted(source, source_rows, sorter=order)]


def paired_stats(jobs: list[JobScores], scores: list[str], groups: list[str], by: str | None) -> list[dict]:
    """Each job against the first one of its prompt set, on the source rows both have."""
    out = []
    for i, job in enumerate(jobs):
        base = next((b for b in jobs[:i] if b.prompt_set() == job.prompt_set()), None)
        if base is None:
            continue
        rows = np.intersect1d(
            base.table.column("source_row").to_numpy(), job.table.column("source_row").to_numpy()
        )
        if not len(rows):
            continue

        at_job, at_base = _positions(job.table, rows), _positions(base.table, rows)
        names = groups_of(base.table, by)[at_base]
        for score in scores:
            if score not in job.scores or score not in base.scores:
                continue
            diff = score_values(job.table, score)[at_job] - score_values(base.table, score)[at_base]
            for group in groups:
                chosen = diff if group == ALL else diff[names == group]
                chosen = chosen[~np.isnan(chosen)]
                if not len(chosen):
                    continue
                low, high = t_interval(chosen)
                wins = float(((chosen > 0).sum() + 0.5 * (chosen == 0).sum()) / len(chosen))
                out.append(
                    {
                        "job": job.name,
                        "baseline": base.name,
                        "score": score,
                        "group": group,
                        "n": len(chosen),
                        "mean_difference": float(chosen.mean()),
                        "ci_low": low,
                        "ci_high": high,
                        "win_rate": wins,
                    }
                )
    return out


# --- plots -------------------------------------------------------------------------------


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height))
    return plt, fig, ax


def _svg(plt, fig) -> bytes:
    out = io.BytesIO()
    fig.tight_layout()
    fig.savefig(out, format="svg", metadata={"Date": None})  # no date: the same data, the same file
    plt.close(fig)
    return out.getvalue()


def histogram(jobs: list[JobScores], score: str, bins: int) -> bytes:
    """The score's distribution per job, on common bins."""
    plt, fig, ax = _figure(7, 3.2)
    values = [
        (j.name, v[~np.isnan(v)]) for j in jobs if score in j.scores for v in [score_values(j.table, score)]
    ]
    everything = np.concatenate([v for _n, v in values])
    low, high = float(everything.min()), float(everything.max())
    edges = np.linspace(low, high if high > low else low + 1, bins + 1)
    for name, v in values:
        ax.hist(v, bins=edges, histtype="step", linewidth=1.6, label=f"{name} (n={len(v):,})")
    ax.set_xlabel(SCORE_NAMES[score])
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    return _svg(plt, fig)


def means_plot(rows: list[dict], jobs: list[str], groups: list[str], score: str) -> bytes:
    """Mean per group with its 95% CI, one bar per job side by side."""
    plt, fig, ax = _figure(max(5, 0.6 * len(groups) * max(1, len(jobs)) + 2), 3.6)
    width = 0.8 / len(jobs)
    by_key = {(r["job"], r["group"]): r for r in rows if r["score"] == score}
    for k, job in enumerate(jobs):
        found = [by_key.get((job, g)) for g in groups]
        means = [r["mean"] if r and r["mean"] is not None else math.nan for r in found]
        errors = [
            [
                m - r["ci_low"] if r and r["ci_low"] is not None else 0
                for m, r in zip(means, found, strict=True)
            ],
            [
                r["ci_high"] - m if r and r["ci_high"] is not None else 0
                for m, r in zip(means, found, strict=True)
            ],
        ]
        x = np.arange(len(groups)) + (k - (len(jobs) - 1) / 2) * width
        ax.bar(x, means, width, yerr=errors, capsize=3, label=job)
    ax.set_xticks(np.arange(len(groups)), groups, rotation=30 if len(groups) > 4 else 0, ha="right")
    ax.set_ylabel(f"mean {SCORE_NAMES[score]} (95% CI)")
    ax.legend(fontsize=8)
    return _svg(plt, fig)


def paired_plot(rows: list[dict], groups: list[str], score: str) -> bytes:
    """Mean paired difference per group with its 95% CI, one marker per compared job."""
    plt, fig, ax = _figure(7, 0.35 * len(groups) + 1.6)
    pairs = sorted({(r["job"], r["baseline"]) for r in rows if r["score"] == score})
    for k, (job, base) in enumerate(pairs):
        found = {r["group"]: r for r in rows if r["score"] == score and r["job"] == job}
        ys = np.arange(len(groups)) + 0.15 * k
        means = [found[g]["mean_difference"] if g in found else math.nan for g in groups]
        low = [m - found[g]["ci_low"] if g in found and found[g]["ci_low"] is not None else 0
               for m, g in zip(means, groups, strict=True)]  # fmt: skip
        high = [found[g]["ci_high"] - m if g in found and found[g]["ci_high"] is not None else 0
                for m, g in zip(means, groups, strict=True)]  # fmt: skip
        ax.errorbar(means, ys, xerr=[low, high], fmt="o", capsize=3, label=f"{job} − {base}")
    ax.axvline(0, color="#888", linewidth=1)
    ax.set_yticks(np.arange(len(groups)), groups)
    ax.invert_yaxis()
    ax.set_xlabel(f"{SCORE_NAMES[score]} difference, paired by prompt (95% CI)")
    ax.legend(fontsize=8)
    return _svg(plt, fig)


# --- best and worst images ---------------------------------------------------------------


def ranked_rows(job: JobScores, score: str, groups: list[str], by: str | None, k: int) -> dict[str, tuple]:
    """Per group, the ``k`` best and ``k`` worst rows of ``job`` by ``score`` (best first, worst
    last; no row in both)."""
    values, names = score_values(job.table, score), groups_of(job.table, by)
    sign = 1 if score in LOWER_IS_BETTER else -1
    out = {}
    for group in groups:
        chosen = np.flatnonzero(~np.isnan(values) & ((names == group) if group != ALL else True))
        if not len(chosen):
            continue
        order = chosen[np.lexsort((job.table.column("row_id").to_numpy()[chosen], sign * values[chosen]))]
        best = order[:k]
        worst = [i for i in order[::-1][:k] if i not in set(best.tolist())][::-1]
        out[group] = (
            job.table.take(pa.array(best)).to_pylist(),
            job.table.take(pa.array(worst, pa.int64())).to_pylist(),
        )
    return out


def thumb_key(job: str, row_id: int) -> str:
    return f"{REPORT}/thumbs/{job}-{row_id:012d}.jpg"


def write_thumbs(target: Store, job: JobScores, rows: list[dict], size: int) -> None:
    """Thumbnails of ``rows`` of ``job`` into the report folder, read in whatever layout the job has."""
    images = read_images(job.store, rows, job_layout(job.spec))
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda r, d: target.put(thumb_key(job.name, r["row_id"]), thumbnail(d, size)), rows, images
            )
        )


# --- the page ----------------------------------------------------------------------------


def _number(value: float | None, digits: int = 3) -> str:
    return (
        "–"
        if value is None
        else f"{value:.{digits}g}"
        if abs(value) < 1e-3 and value
        else f"{value:.{digits}f}"
    )


def _ci(row: dict) -> str:
    return "–" if row["ci_low"] is None else f"{row['ci_low']:.3f} … {row['ci_high']:.3f}"


def _caption(row: dict, scores: list[str]) -> str:
    e = html.escape
    shown = " · ".join(f"{SCORE_NAMES[s]} {row[s]:.3f}" for s in scores if row.get(s) is not None)
    return f"<figcaption>{e(row['prompt'][:300])}<br><b>{e(shown)}</b> · row {row['row_id']}</figcaption>"


def page(
    jobs: list[JobScores],
    scores: list[str],
    stats: list[dict],
    paired: list[dict],
    ranked: dict[str, dict[str, tuple]],
    rank_by: str,
    by: str | None,
    cost: dict[str, list[dict]] | None = None,
    sections: list[str] = (),
) -> str:
    """The report's HTML: relative links only, no script, every value from the data escaped."""
    e = html.escape
    title = " vs ".join(j.name for j in jobs)
    out = [
        *page_head(f"{title} · fewstep report", STYLE),
        f"<h1>{e(title)}</h1>",
        "<table><tr><th>job</th><th>model</th><th>revision</th><th>prompt set</th><th>rows</th>"
        + "".join(f"<th>{e(SCORE_NAMES[s])} scored</th>" for s in scores)
        + "</tr>",
    ]
    for j in jobs:
        scored = "".join(
            f"<td>{j.table.num_rows - j.table.column(s).null_count:,}</td>" if s in j.scores else "<td>–</td>"
            for s in scores
        )
        out.append(
            f"<tr><td>{e(j.name)}</td><td class=text>{e(j.model)}</td>"
            f"<td class=text>{e(str(j.spec['model'].get('revision')))}</td>"
            f"<td class=text>{e(str(j.spec['source'].get('name')))}</td>"
            f"<td>{j.table.num_rows:,}</td>{scored}</tr>"
        )
    out.append("</table>")
    out += _cost_table(cost or {})
    out.append(
        '<p>The numbers: <a href="report.csv">report.csv</a>'
        + (' · paired comparison: <a href="comparison.csv">comparison.csv</a>' if paired else "")
        + f". Groups: {e(by) if by else 'none (all rows)'}; 95% confidence intervals from Student's t; "
        "rows without a score are left out of it.</p>"
    )
    for score in scores:
        out.append(f'<h2 id="{score}">{e(SCORE_NAMES[score])}</h2><div class="plots">')
        out.append(f'<img src="hist-{score}.svg" alt="histogram of {score}">')
        out.append(f'<img src="means-{score}.svg" alt="mean {score} per group"></div>')
        out.append(
            "<table><tr><th>group</th><th>job</th><th>n</th><th>mean</th><th>95% CI</th>"
            "<th>median</th><th>min</th><th>max</th></tr>"
        )
        for r in (r for r in stats if r["score"] == score):
            out.append(
                f"<tr><td>{e(r['group'])}</td><td class=text>{e(r['job'])}</td><td>{r['n']:,}</td>"
                f"<td>{_number(r['mean'])}</td><td>{_ci(r)}</td><td>{_number(r['median'])}</td>"
                f"<td>{_number(r['min'])}</td><td>{_number(r['max'])}</td></tr>"
            )
        out.append("</table>")
        rows = [r for r in paired if r["score"] == score]
        if rows:
            out.append("<h3>Paired by prompt: the same source rows in both jobs</h3>")
            out.append(
                f'<div class="plots"><img src="paired-{score}.svg" alt="paired {score} differences"></div>'
            )
            out.append(
                "<table><tr><th>group</th><th>job − baseline</th><th>n</th><th>mean difference</th>"
                "<th>95% CI</th><th>win rate</th></tr>"
            )
            for r in rows:
                out.append(
                    f"<tr><td>{e(r['group'])}</td><td class=text>{e(r['job'])} − {e(r['baseline'])}</td>"
                    f"<td>{r['n']:,}</td><td>{_number(r['mean_difference'])}</td><td>{_ci(r)}</td>"
                    f"<td>{r['win_rate']:.1%}</td></tr>"
                )
            out.append("</table>")
    better = "lowest" if rank_by in LOWER_IS_BETTER else "highest"
    out.append(f"<h2>Best and worst images by {e(SCORE_NAMES[rank_by])} ({better} is best)</h2>")
    groups = list(dict.fromkeys(g for per_job in ranked.values() for g in per_job))
    for group in groups:
        out.append(f"<h3>{e(group)}</h3>")
        for job in jobs:
            if group not in ranked.get(job.name, {}):
                continue
            best, worst = ranked[job.name][group]
            for label, rows in (("best", best), ("worst", worst)):
                if not rows:
                    continue
                out.append(f'<p class="label">{e(job.name)} · {label}</p><div class="strip">')
                for r in rows:
                    src = thumb_key(job.name, r["row_id"]).removeprefix(f"{REPORT}/")
                    out.append(
                        f'<figure><img src="{e(src)}" alt="{e(r["prompt"][:200])}">'
                        f"{_caption(r, job.scores)}</figure>"
                    )
                out.append("</div>")
    out += sections  # best-of-K and quotas (producer/best_of_k.py)
    out.append("</body></html>")
    return "\n".join(out)


def _cost_table(cost: dict[str, list[dict]]) -> list[str]:
    """Images generated and kept, GPU-hours and cost per 1,000 kept images, per job and (when
    the jobs ran more than one model) per model (:mod:`producer.cost`)."""
    rows = [(r["job"], r) for r in cost.get("jobs", [])]
    rows += [(f"model {r['model']}", r) for r in cost.get("models", [])]
    if not rows:
        return []
    currency = rows[0][1]["currency"]
    out = [
        f"<h2 id=cost>Cost of the kept images</h2><table><tr><th></th><th>generated</th><th>kept</th>"
        "<th>GPU-hours</th><th>GPU-hours per 1,000 kept</th>"
        f"<th>{html.escape(currency)} per 1,000 kept</th></tr>"
    ]
    for name, r in rows:
        out.append(
            f"<tr><td class=text>{html.escape(name)}</td><td>{r['images_generated']:,}</td>"
            f"<td>{r['images_kept']:,}</td>"
            f"<td>{_number(r['gpu_hours'], 4)}</td><td>{_number(r['gpu_hours_per_1000_kept'], 4)}</td>"
            f"<td>{_number(r['cost_per_1000_kept'], 4)}</td></tr>"
        )
    price = rows[0][1]["gpu_hour_price"]
    out.append(
        "</table><p>GPU-hours: the device time the workers' model threads spent on each shard's batches "
        "(generation and scoring; not wall time), from the shard stats; "
        + (f"at {price:g} {html.escape(currency)} per GPU-hour.</p>" if price else
           "no price per GPU-hour set (--gpu-price, or [cost] in config/defaults.toml).</p>")
    )  # fmt: skip
    return out


def _csv(rows: list[dict], fields: list[str]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r[k] is None else r[k] for k in fields})
    return out.getvalue().encode()


def make_report(
    stores: list[Store],
    *,
    by: str | None = None,
    rank_by: str | None = None,
    gpu_price: float | None = None,
) -> dict[str, Any]:
    """Write ``report/`` into the first job's folder; returns a summary (what was written where);
    ``gpu_price`` per GPU-hour prices the kept images (None: GPU-hours only)."""
    cfg = defaults()["report"]
    jobs = [load_job(store, by) for store in stores]
    if len({j.name for j in jobs}) < len(jobs):
        raise UserError("a job is named twice: name each job once")
    scores = [s for s in SCORE_COLUMNS if any(s in j.scores for j in jobs)]
    rank_by = rank_by or (cfg["rank_by"] if cfg["rank_by"] in scores else scores[0])
    if rank_by not in scores:
        raise UserError(f"--rank-by {rank_by}: no job has that score (they have {', '.join(scores)})")
    groups = group_names(jobs, by)
    shard_stats = [{"job": j.name, "model": j.model, "stats": read_stats(j.store)} for j in jobs]
    cost = {
        "jobs": [{"job": r["job"], "model": r["model"], **c} for r in shard_stats
                 if (c := cost_summary(r["stats"], gpu_price))],
        "models": by_model(shard_stats, gpu_price) if len({j.model for j in jobs}) > 1 else [],
    }  # fmt: skip
    stats = score_stats(jobs, scores, groups, by)
    paired = paired_stats(jobs, scores, groups, by)

    target = jobs[0].store
    written = {INDEX}

    def put(key: str, data: bytes) -> None:
        target.put(key, data)
        written.add(key)

    names = [j.name for j in jobs]
    for score in scores:
        put(f"{REPORT}/hist-{score}.svg", histogram(jobs, score, int(cfg["bins"])))
        put(f"{REPORT}/means-{score}.svg", means_plot(stats, [n for n in names if any(
            r["job"] == n and r["score"] == score for r in stats)], groups, score))  # fmt: skip
        if any(r["score"] == score for r in paired):
            put(f"{REPORT}/paired-{score}.svg", paired_plot(paired, groups, score))
    put(f"{REPORT}/report.csv", _csv(stats, STATS_FIELDS))
    if paired:
        put(f"{REPORT}/comparison.csv", _csv(paired, PAIRED_FIELDS))

    ranked = {}
    for job in jobs:
        if rank_by not in job.scores:
            continue
        ranked[job.name] = ranked_rows(job, rank_by, groups, by, int(cfg["images_per_group"]))
        rows = list(
            {r["row_id"]: r for best, worst in ranked[job.name].values() for r in best + worst}.values()
        )
        write_thumbs(target, job, rows, int(cfg["thumbnail_px"]))
        written.update(thumb_key(job.name, r["row_id"]) for r in rows)
    sections, candidates = report_sections(jobs, put, int(cfg["bins"]))
    target.put(INDEX, page(jobs, scores, stats, paired, ranked, rank_by, by, cost, sections).encode())
    for key, _size in list(target.list(f"{REPORT}/")):
        if key not in written:
            target.delete(key)  # from an earlier report of other jobs or rows
    return {
        "jobs": names,
        "report": target.url_of(INDEX),
        "scores": scores,
        "rank_by": rank_by,
        "groups": groups,
        "compared": sorted({(r["job"], r["baseline"]) for r in paired}),
        "plots": sorted(k.removeprefix(f"{REPORT}/") for k in written if k.endswith(".svg")),
        "thumbnails": sum(1 for k in written if k.startswith(f"{REPORT}/thumbs/")),
        "cost": cost,
        **candidates,
    }


@click.command("report")
@click.argument("jobs", nargs=-1, required=True)
@OUTPUT
@click.option("--by", metavar="FIELD", help="Group by this column (e.g. category).")
@click.option(
    "--rank-by",
    type=click.Choice(SCORE_COLUMNS),
    help="The score that picks the best and worst images [clip_score, else the first the jobs have].",
)
@download_option("Also copy the report folder into this local directory.")
@GPU_PRICE
@JSON
def report_command(
    jobs: tuple[str, ...],
    output: str,
    by: str | None,
    rank_by: str | None,
    download_dir,
    gpu_price: float | None,
    as_json: bool,
) -> None:
    """Write an HTML report on the scores of JOB [JOB ...] into the first job's report/ folder.

    Score histograms, means per group with 95% confidence intervals, jobs of the same prompt set
    compared prompt by prompt, best and worst images, and the numbers as report.csv.
    """
    stores = [job_store(output, job) for job in jobs]
    summary = make_report(stores, by=by, rank_by=rank_by, gpu_price=price_of(gpu_price))
    if download_dir is not None:
        summary["local"] = str(download(stores[0], download_dir, [], folder=REPORT).resolve())
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(
        f"report on {', '.join(summary['jobs'])} ({', '.join(summary['scores'])}; "
        f"{len(summary['groups'])} groups): {summary['report']}"
    )
    if summary.get("local"):
        click.echo(f"local copy: {summary['local']}")
