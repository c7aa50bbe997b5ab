"""The CPU benchmarks still run against the current code, at a tiny size (no timing is
asserted: their figures live in docs/BENCHMARKS.md). A schema or API change that breaks a
benchmark shows here, not on the day someone measures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.support import config_dir


def run_bench(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_fleet_commands_lays_out_a_job_and_reads_it_back():
    out = run_bench("fleet_commands.py", "--shards", "10", "--rows", "8", "--heartbeats", "2")
    assert "status cold read (10 parts, 10 stats objects)" in out
    assert "finalize: 80 rows from 10 parts" in out


def test_enqueue_diffusiondb_enqueues_every_row(tmp_path):
    out = run_bench("enqueue_diffusiondb.py", "--rows", "2000", "--data", str(tmp_path))
    record = json.loads(out.strip().splitlines()[-1])
    counts = [record[k] for k in ("prompts", "shards", "enqueued", "queue_length")]
    assert counts == [2000, 2, 2, 2]


def test_scoring_bench_times_every_scorer_set(tmp_path):
    run_bench("scoring.py", "--batch", "1", "--batches", "1", "--repeat", "1", "--json", f"{tmp_path}/r.json")
    record = json.loads((tmp_path / "r.json").read_text())
    assert set(record["sets"]) == {"clip", "clip+aesthetic+nsfw", "clip+aesthetic+nsfw+embeddings"}
    assert record["generate_ms_per_image"] > 0
    assert all(s["score_ms_per_image"] > 0 for s in record["sets"].values())
    assert record["embedding_bytes_per_image"]["768"] <= 2048  # the issue's bound at CLIP ViT-L/14's size


def test_dedupe_bench_finds_every_planted_pair_with_the_approximate_index(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CONFIG_DIR", config_dir(tmp_path, dedupe={"exact_max": 1000}))
    out = run_bench("dedupe.py", "--sizes", "4000")
    record = json.loads(out.strip().splitlines()[-1])
    assert (record["rows"], record["method"], record["lists"]) == (4000, "approximate", 102)
    assert record["planted_found"] == record["planted_pairs"] == 20 and record["other_pairs_found"] == 0


def test_control_plane_bench_scans_and_collects_new_and_old_alike(tmp_path):
    if subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", "1cac223"], check=False).returncode:
        pytest.skip("the old recovery and gc come from commit 1cac223, not in this clone")
    run_bench("control_plane.py", "--quick", "--parts", "recovery,gc-local", "--json", f"{tmp_path}/r.json")
    record = json.loads((tmp_path / "r.json").read_text())
    one = record["recovery"]["one delivery per worker"]
    # The recoverer's scan is four commands whatever the fleet; the old pass one HGET per delivery.
    assert one["new_scan"]["redis_commands"] == 4
    assert one["old_pass"]["redis_commands"] == 3 + one["unacked"]
    runs = record["gc_local"]["runs"]
    assert [(r["impl"], r["delete"]) for r in runs] == [
        ("none", False),
        ("new", False),
        ("old", False),
        ("new", True),
        ("old", True),
    ]
    assert len({r["objects"] for r in runs[1:]}) == 1
