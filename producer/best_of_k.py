"""The report's best-of-K and quota sections (``producer report``; docs/REPORTS.md).

For a job enqueued with ``--candidates K --rank-by EXPR`` every stored row lists its prompt's
candidates (seeds, rank values, scores: the ``candidate_*`` columns), so the report can say:

- **rank distribution, kept vs discarded**: the rank values (``--rank-by``) of the candidates
  kept and of those discarded, as a histogram and their summary numbers, and how often each
  candidate index was kept (a flat count is what a fair choice among equals gives);
- **gain over K = 1**: for each score, the kept candidate's value minus candidate 0's (the image
  the same prompt and seed give without candidates: candidate 0's seed is the row's seed), over
  the same prompts: mean difference, its 95% confidence interval (Student's t on the paired
  differences), and the share of prompts where the kept one scored higher (ties half);
- **quota progress**: for a job ``producer topup`` fills, passing rows per group against the quota.

With ``--keep all`` a prompt's K rows carry the same lists; each prompt is counted once.
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np
import pyarrow as pa

from fewstep.contract import CANDIDATE_SCORE_PREFIX, KEEP_ALL, choose, job_candidates, metadata_key
from producer.quotas import read_columns

SECTION = "best-of-k"


def candidate_lists(
    store, spec: dict[str, Any], shards: list[int]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(prompts, K) rank values, and (prompts, K) values of each score, one row per prompt."""
    k = int(job_candidates(spec)["k"])
    schema_names = [f"{CANDIDATE_SCORE_PREFIX}{s}" for s in _scores(spec)]
    columns = ["candidate", "candidate_rank_scores", *schema_names]
    table = read_columns(store, [metadata_key(s) for s in shards], columns)
    if job_candidates(spec).get("keep") == KEEP_ALL:
        table = table.filter(pa.compute.equal(table.column("candidate"), 0))

    def matrix(column: str) -> np.ndarray:
        values = [
            [np.nan if v is None else v for v in (row or [None] * k)]
            for row in table.column(column).to_pylist()
        ]
        return np.array(values, dtype=np.float64).reshape(-1, k)

    return matrix("candidate_rank_scores"), {s: matrix(f"{CANDIDATE_SCORE_PREFIX}{s}") for s in _scores(spec)}


def _scores(spec: dict[str, Any]) -> list[str]:
    return [s["column"] for s in ((spec.get("scoring") or {}).get("scorers") or {}).values()]


def summarize(values: np.ndarray) -> dict[str, Any]:
    """n, mean, median, 10th and 90th percentiles of the non-NaN values."""
    v = values[~np.isnan(values)]
    if not len(v):
        return {"n": 0, "mean": None, "median": None, "p10": None, "p90": None}
    return {
        "n": len(v),
        "mean": float(v.mean()),
        "median": float(np.median(v)),
        "p10": float(np.percentile(v, 10)),
        "p90": float(np.percentile(v, 90)),
    }


def best_of_k_summary(store, spec: dict[str, Any], shards: list[int]) -> dict[str, Any] | None:
    """The section's numbers for one job (None: the job has no candidates)."""
    from producer.report import t_interval  # the report's own interval, one definition

    c = job_candidates(spec)
    if c is None or not shards:
        return None
    k = int(c["k"])
    ranks, scores = candidate_lists(store, spec, shards)
    best, _ = choose(ranks.reshape(-1), k) if len(ranks) else (np.array([], dtype=int), None)
    kept_mask = np.zeros_like(ranks, dtype=bool)
    kept_mask[np.arange(len(best)), best] = True
    gains = []
    for score, values in scores.items():
        diff = values[np.arange(len(best)), best] - values[:, 0]
        diff = diff[~np.isnan(diff)]
        low, high = t_interval(diff) if len(diff) else (None, None)
        gains.append(
            {
                "score": score,
                "n": len(diff),
                "first_mean": float(np.nanmean(values[:, 0])) if len(diff) else None,
                "kept_mean": float(np.nanmean(values[np.arange(len(best)), best])) if len(diff) else None,
                "mean_gain": float(diff.mean()) if len(diff) else None,
                "ci_low": low,
                "ci_high": high,
                "win_rate": float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / len(diff))
                if len(diff)
                else None,
            }
        )
    return {
        "job": spec["job"],
        "k": k,
        "rank_by": c["rank_by"],
        "keep": c.get("keep"),
        "prompts": len(ranks),
        "kept": summarize(ranks[kept_mask]),
        "discarded": summarize(ranks[~kept_mask]),
        "kept_index": np.bincount(best, minlength=k).tolist() if len(best) else [0] * k,
        "gain_over_k1": gains,
        "_kept_values": ranks[kept_mask],
        "_discarded_values": ranks[~kept_mask],
    }


def rank_histogram(summary: dict[str, Any], bins: int) -> bytes:
    """Rank values of the kept and of the discarded candidates, on common bins."""
    from producer.report import _figure, _svg

    plt, fig, ax = _figure(7, 3.2)
    kept, dropped = summary["_kept_values"], summary["_discarded_values"]
    both = np.concatenate([kept, dropped])
    both = both[~np.isnan(both)]
    low, high = (float(both.min()), float(both.max())) if len(both) else (0.0, 1.0)
    edges = np.linspace(low, high if high > low else low + 1, bins + 1)
    for label, v in (("kept", kept), ("discarded", dropped)):
        v = v[~np.isnan(v)]
        ax.hist(v, bins=edges, histtype="step", linewidth=1.6, label=f"{label} (n={len(v):,})")
    ax.set_xlabel(f"rank value: {summary['rank_by']}")
    ax.set_ylabel("candidates")
    ax.legend(fontsize=8)
    return _svg(plt, fig)


def _n(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def best_of_k_html(summary: dict[str, Any], plot: str) -> list[str]:
    """The section's HTML for one job."""
    e = html.escape
    out = [
        f'<h2 id="{SECTION}-{e(summary["job"])}">Best of {summary["k"]}: {e(summary["job"])}</h2>',
        f"<p>{summary['prompts']:,} prompts, {summary['k']} candidates each, ranked by "
        f"<code>{e(summary['rank_by'])}</code> (--keep {e(str(summary['keep']))}).</p>",
        f'<div class="plots"><img src="{e(plot)}" alt="rank values of kept and discarded candidates"></div>',
        "<table><tr><th>candidates</th><th>n</th><th>mean</th><th>median</th><th>10%</th><th>90%</th></tr>",
    ]
    for label in ("kept", "discarded"):
        s = summary[label]
        out.append(
            f"<tr><td class=text>{label}</td><td>{s['n']:,}</td><td>{_n(s['mean'])}</td>"
            f"<td>{_n(s['median'])}</td><td>{_n(s['p10'])}</td><td>{_n(s['p90'])}</td></tr>"
        )
    counts = " · ".join(f"{i}: {n:,}" for i, n in enumerate(summary["kept_index"]))
    out.append(f"</table><p>Kept candidate index (0 = the row's own seed): {counts}.</p>")
    out.append(
        "<h3>Gain over K = 1: the kept candidate minus candidate 0, same prompts</h3>"
        "<table><tr><th>score</th>"
        "<th>n</th><th>candidate 0 mean</th><th>kept mean</th><th>mean gain</th><th>95% CI</th>"
        "<th>kept higher</th></tr>"
    )
    for g in summary["gain_over_k1"]:
        ci = "–" if g["ci_low"] is None else f"[{g['ci_low']:.3f}, {g['ci_high']:.3f}]"
        wins = "–" if g["win_rate"] is None else f"{g['win_rate']:.1%}"
        out.append(
            f"<tr><td class=text>{e(g['score'])}</td><td>{g['n']:,}</td><td>{_n(g['first_mean'])}</td>"
            f"<td>{_n(g['kept_mean'])}</td><td>{_n(g['mean_gain'])}</td><td>{ci}</td><td>{wins}</td></tr>"
        )
    out.append("</table>")
    return out


def quota_html(job: str, quota: dict[str, Any]) -> list[str]:
    """Quota progress per group (``producer topup``)."""
    e = html.escape
    where = " and ".join(quota["where"]) or "every row"
    per = f" per {quota['per']}" if quota["per"] else ""
    out = [
        f"<h2 id=quota-{e(job)}>Quota: {e(job)}</h2>",
        f"<p>{quota['until']:,} rows{e(per)} where <code>{e(where)}</code>: {quota['groups_met']:,} of "
        f"{len(quota['groups']):,} groups met, {quota['short']:,} rows short.</p>",
        "<table><tr><th>group</th><th>passing</th><th>generated</th><th>short</th></tr>",
    ]
    for name, g in sorted(quota["groups"].items()):
        out.append(
            f"<tr><td class=text>{e(name)}</td><td>{g['passing']:,}</td><td>{g['generated']:,}</td>"
            f"<td>{g['short']:,}</td></tr>"
        )
    out.append("</table>")
    return out


def report_sections(jobs, put, bins: int) -> tuple[list[str], dict[str, Any]]:
    """HTML sections and JSON summary of best-of-K and quotas for the report's jobs; plots are
    written with ``put(key, bytes)`` under ``report/``."""
    from producer.progress import read_progress
    from producer.quotas import Quota
    from producer.topup import job_quota_progress

    sections: list[str] = []
    summary: dict[str, Any] = {"best_of_k": [], "quotas": {}}
    for job in jobs:
        progress = read_progress(job.store)
        quota = Quota.of(progress.spec)
        if quota is not None:
            counted = job_quota_progress(job.store, progress, quota)
            summary["quotas"][job.name] = counted
            sections += quota_html(job.name, counted)
        result = best_of_k_summary(job.store, progress.spec, sorted(progress.committed))
        if result is None:
            continue
        plot = f"ranks-{job.name}.svg"
        put(f"report/{plot}", rank_histogram(result, bins))
        sections += best_of_k_html(result, plot)
        summary["best_of_k"].append({k: v for k, v in result.items() if not k.startswith("_")})
    return sections, summary
