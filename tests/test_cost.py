"""The cost of kept images: GPU-seconds are device time, and every cost figure follows the stats.

One real worker (tiny model, CPU) runs a two-shard job through an S3 gateway that holds shard 1's
commit marker for a few seconds: storage slow to take one write. That shard's wall time grows by
the hold; its GPU-seconds, the device thread's time on its batches, do not. The figures of
``producer status``, ``producer report`` and the dataset card are then checked against a
computation from the stats objects and the committed metadata, read here.
"""

from __future__ import annotations

import datetime as dt
import json
import time

import pytest

from fewstep.contract import metadata_key, stats_key
from fewstep.storage import open_store
from producer.cost import by_model, cost_summary
from producer.finalize import finalize
from producer.report import make_report
from tests.s3_gateway import S3Gateway
from tests.support import cli, cli_json, committed_metadata, start_worker, stop_worker, wait_done, wait_for
from tests.test_end_to_end import SAMPLE, enqueue

HOLD_S = 4.0
PRICE = 2.5  # per GPU-hour, given as --gpu-price


def independent_cost(stats: list[dict], kept: int, price: float) -> dict:
    hours = sum(s["gpu_s"] for s in stats) / 3600
    return {"gpu_hours": hours, "gpu_hours_per_1000_kept": hours / kept * 1000,
            "cost": hours * price, "cost_per_1000_kept": hours * price / kept * 1000}  # fmt: skip


def test_gpu_seconds_are_device_time_and_cost_per_kept_image_follows_the_stats(env, output, local_services,
                                                                                tmp_path):  # fmt: skip
    svc = local_services
    with S3Gateway(svc.s3_endpoint, svc.access_key, svc.secret_key, hold=metadata_key(1)) as gateway:
        worker = start_worker({**env, "AWS_ENDPOINT_URL_S3": gateway.url}, "--batch-size", "2",
                              log_path=tmp_path / "worker.log")  # fmt: skip
        try:
            job = enqueue(SAMPLE, "costed", output, env, "--limit", "4", "--shard-size", "2",
                          "--width", "64", "--height", "64", "--score", "clip=tiny")  # fmt: skip
            wait_for(gateway.holding.is_set, 300, "shard 1's commit")
            time.sleep(HOLD_S)
            gateway.release()
            wait_done("costed", output, env, timeout=300)
        finally:
            gateway.release()
            stop_worker(worker)
    store = open_store(job["job_url"])
    stats = [json.loads(store.get(stats_key(n))) for n in (1, 2)]
    table = committed_metadata(job["job_url"])
    gen_s = {n: sum(r["gen_ms"] for r in table.to_pylist() if r["part_id"] == n) / 1000 for n in (1, 2)}
    for n, s in zip((1, 2), stats, strict=True):
        # Device time holds the model calls (gen_ms, timed inside the model) and the scoring
        # (score_s), and lies between the
        # shard's first batch and its commit (a batch generated ahead, before the shard's task
        # started, is the shard's too: shard 2's were made while shard 1 waited).
        span = dt.datetime.fromisoformat(s["finished_at"]) - dt.datetime.fromisoformat(s["first_batch_at"])
        assert gen_s[n] + s["score_s"] - 1e-3 <= s["gpu_s"] <= span.total_seconds(), (n, s, gen_s)
    # Shard 1 waited HOLD_S for storage to take its commit: in its wall time, not in its GPU-seconds.
    assert stats[0]["seconds"] - stats[0]["gpu_s"] >= HOLD_S, stats[0]

    # producer status: images generated and kept, GPU-hours, cost per 1,000 kept images.
    kept = table.num_rows
    expected = independent_cost(stats, kept, PRICE)
    status = cli_json("producer", "status", "costed", "--output", output, "--gpu-price", str(PRICE), env=env)
    cost = status["cost"]
    assert (cost["shards"], cost["images_generated"], cost["images_kept"]) == (2, 4, 4) and kept == 4
    assert cost["currency"] == "USD" and cost["gpu_hour_price"] == PRICE
    assert {k: cost[k] for k in expected} == pytest.approx(expected, rel=1e-9)
    view = cli("producer", "status", "costed", "--output", output, "--gpu-price", str(PRICE), "--no-redis",
               env={**env, "COLUMNS": "400"}).stdout  # fmt: skip
    per_1000 = expected["cost_per_1000_kept"]
    assert f"4 images generated, 4 kept, over 2 shards: {expected['gpu_hours']:.4g} GPU-hours" in view
    assert f"; cost {expected['cost']:.4g} USD, {per_1000:.4g} per 1,000 kept at 2.5 USD/GPU-hour" in view
    # The report (per job) and the dataset card (config price: none set) say the same.
    report = make_report([store], gpu_price=PRICE)["cost"]
    assert report["models"] == []  # one model: no per-model rows
    [row] = report["jobs"]
    assert row["job"] == "costed" and {k: row[k] for k in expected} == pytest.approx(expected, rel=1e-9)
    assert "Cost of the kept images" in store.get("report/index.html").decode()
    finalize(store)
    card = store.get("README.md").decode()
    hours = expected["gpu_hours"]
    per_1000 = expected["gpu_hours_per_1000_kept"]
    assert (
        f"- cost: 4 images generated, 4 kept, over 2 shards: {hours:.4g} GPU-hours ({per_1000:.4g} per 1,000 "
        "kept); no price per GPU-hour set"
    ) in card


def test_cost_per_model_sums_each_models_jobs_and_counts_generated_candidates():
    """Per model, its jobs' shards together; best-of-K stats count K images generated a row kept."""
    a = [{"images": 10, "images_generated": 40, "gpu_s": 36.0}, {"images": 10, "gpu_s": 18.0}]
    b = [{"images": 5, "generate_s": 9.0}]  # stats from before gpu_s: their generate_s counts
    c = [{"images": 20, "images_generated": 20, "gpu_s": 7.2}]
    rows = by_model(
        [{"model": "m1", "stats": a}, {"model": "m2", "stats": c}, {"model": "m1", "stats": b}], 3.0
    )
    assert [r["model"] for r in rows] == ["m1", "m2"]
    m1, m2 = rows
    assert (m1["images_generated"], m1["images_kept"], m2["images_generated"]) == (55, 25, 20)
    assert m1["gpu_hours"] == pytest.approx((36 + 18 + 9) / 3600)
    assert m1["cost_per_1000_kept"] == pytest.approx((36 + 18 + 9) / 3600 * 3.0 / 25 * 1000)
    assert m2["cost_per_1000_kept"] == pytest.approx(7.2 / 3600 * 3.0 / 20 * 1000)
    unpriced = cost_summary(c, None)
    assert unpriced["cost"] is None and unpriced["cost_per_1000_kept"] is None and unpriced["gpu_hours"] > 0
