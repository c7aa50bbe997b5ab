"""What a job's images cost: device time from its shard stats, at a price per GPU-hour.

Every committed shard's stats object (``stats/part-N.json``) records ``gpu_s``: the seconds
the worker's device thread spent on the shard's batches (model call and scoring, halved
out-of-memory tries included), not the shard's wall time, which also holds encoding, uploads
and waits for storage. Stats written before ``gpu_s`` existed count their ``generate_s`` (the
same device time, without the halved tries). Model loading and warm-up belong to no shard and
are not counted.

- images generated: what the model made (``images_generated``: K a prompt with best-of-K
  keeping the best; the stored rows for older stats);
- images kept: the rows the shards committed (``images``);
- GPU-hours: the sum of ``gpu_s`` / 3600; the cost: GPU-hours x the price per GPU-hour
  (``--gpu-price``, else ``[cost] gpu_hour_price`` in ``config/defaults.toml``; 0 there: no
  price, and only GPU-hours are shown); per 1,000 kept images: both divided by kept / 1000.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import click

from fewstep import UserError
from fewstep.contract import STATS
from fewstep.settings import defaults
from fewstep.storage import Store


def gpu_price(option: float | None = None) -> float | None:
    """The price per GPU-hour: ``option`` (``--gpu-price``), else the config's; None when neither
    sets one."""
    price = option if option is not None else float(defaults()["cost"]["gpu_hour_price"])
    if price < 0:
        raise UserError(f"--gpu-price {price}: a price per GPU-hour is not negative")
    return price or None


def currency() -> str:
    """The currency prices are given in (``[cost] currency``)."""
    return str(defaults()["cost"]["currency"])


def read_stats(store: Store, threads: int = 16) -> list[dict[str, Any]]:
    """Every stats object of a job (one per committed shard)."""
    keys = [key for key, _size in store.list(f"{STATS}/") if key.endswith(".json")]
    with ThreadPoolExecutor(max(1, min(threads, len(keys) or 1))) as pool:
        return [json.loads(data) for data in pool.map(store.get, keys)]


def device_seconds(stats: dict[str, Any]) -> float:
    """A shard's device time: ``gpu_s``, or ``generate_s`` in stats older than it."""
    return float(stats["gpu_s"] if "gpu_s" in stats else stats.get("generate_s") or 0.0)


def cost_summary(stats: Iterable[dict[str, Any]], price: float | None) -> dict[str, Any] | None:
    """Images generated and kept, GPU-hours and cost (total and per 1,000 kept images) of the
    shards whose ``stats`` are given; None for none."""
    stats = list(stats)
    if not stats:
        return None
    kept = sum(int(s.get("images") or 0) for s in stats)
    generated = sum(int(s.get("images_generated") or s.get("images") or 0) for s in stats)
    hours = sum(device_seconds(s) for s in stats) / 3600
    per_1000 = 1000 / kept if kept else None
    return {
        "shards": len(stats),
        "images_generated": generated,
        "images_kept": kept,
        "gpu_hours": hours,
        "gpu_hours_per_1000_kept": hours * per_1000 if per_1000 else None,
        "gpu_hour_price": price,
        "currency": currency(),
        "cost": hours * price if price else None,
        "cost_per_1000_kept": hours * price * per_1000 if price and per_1000 else None,
    }


def cost_line(c: dict[str, Any]) -> str:
    """The cost summary in words, for the status view, the report and the dataset card."""
    words = (
        f"{c['images_generated']:,} images generated, {c['images_kept']:,} kept, "
        f"over {c['shards']:,} shards: {c['gpu_hours']:.4g} GPU-hours"
    )
    if c["gpu_hours_per_1000_kept"] is not None:
        words += f" ({c['gpu_hours_per_1000_kept']:.4g} per 1,000 kept)"
    if c["cost"] is None:
        return words + "; no price per GPU-hour set (--gpu-price, or [cost] in config/defaults.toml)"
    per = f", {c['cost_per_1000_kept']:.4g} per 1,000 kept" if c["cost_per_1000_kept"] is not None else ""
    at = f"at {c['gpu_hour_price']:g} {c['currency']}/GPU-hour"
    return f"{words}; cost {c['cost']:.4g} {c['currency']}{per} {at}"


def by_model(rows: list[dict[str, Any]], price: float | None) -> list[dict[str, Any]]:
    """Per model, the cost of its jobs together (``rows``: each ``{"model", "stats"}``)."""
    models: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        models.setdefault(row["model"], []).extend(row["stats"])
    return [{"model": m, **(cost_summary(s, price) or {})} for m, s in models.items() if s]


GPU_PRICE = click.option(
    "--gpu-price",
    type=float,
    metavar="PRICE",
    help="Price of one GPU-hour, for the cost of the kept images [config/defaults.toml [cost]].",
)
