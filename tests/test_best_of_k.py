"""Best-of-K, quotas filled until met, and finalize --per/--limit, on a real fleet (real Redis,
SeaweedFS, a worker process with the ``tiny`` model and ``tiny`` scorers); the pieces they are
made of (rank expressions, seeds, the choice, finalize's selection) at unit level.

Seeds are checked against SplitMix64 written out here in plain Python integers, not the
project's numpy code.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fewstep import UserError
from fewstep.contract import candidate_seeds, choose, derive_seeds, parse_rank_by, round_seeds
from fewstep.storage import open_store
from producer.quotas import choose_per_limit
from tests.support import cli, cli_json, committed_metadata, start_worker, stop_worker, verify_job, wait_done

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def splitmix(seed: int, value: int) -> int:
    """SplitMix64 of ``seed * golden + value`` in Python integers (the reference)."""
    x = (seed * GOLDEN + value + GOLDEN) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def reference_candidate_seed(row_seed: int, c: int) -> int:
    return row_seed if c == 0 else splitmix(0x63616E646964 ^ row_seed, c) & 0xFFFFFFFF


def reference_round_seed(job_seed: int, round_number: int, row_id: int) -> int:
    return splitmix(splitmix(0x726F756E64 ^ job_seed, round_number), row_id) & 0xFFFFFFFF


# --- units ------------------------------------------------------------------------------


def test_candidate_and_round_seeds_match_splitmix_written_out_in_python_integers():
    rows = [0, 1, 7, 0xFFFFFFFF, 123456789]
    got = candidate_seeds(rows, 5)
    assert got.dtype == np.uint32 and got.shape == (5, 5)
    assert got.tolist() == [[reference_candidate_seed(s, c) for c in range(5)] for s in rows]
    assert round_seeds(42, 3, [0, 5, 10**9]).tolist() == [
        reference_round_seed(42, 3, r) for r in (0, 5, 10**9)
    ]
    assert derive_seeds(42, [9]).tolist() == [splitmix(42, 9) & 0xFFFFFFFF]  # unchanged by this work
    assert (
        len(set(round_seeds(42, 1, range(1000)).tolist()) | set(round_seeds(42, 2, range(1000)).tolist()))
        > 1990
    )


def test_rank_expression_is_arithmetic_on_score_columns_and_refuses_anything_else():
    rank = parse_rank_by("aesthetic + 0.1*clip_score - -2/4", ["aesthetic", "clip_score"])
    assert rank.names == ("aesthetic", "clip_score")
    values = rank.evaluate({"aesthetic": [1.0, None, 3.0], "clip_score": [10.0, 20.0, 0.0]}, 3)
    assert values[0] == pytest.approx(2.5) and math.isnan(values[1]) and values[2] == pytest.approx(3.5)
    for text, words in [
        ("__import__('os').system('x')", "Call is not"),
        ("clip_score.real", "Attribute is not"),
        ("clip_score > 2", "Compare is not"),
        ("clip_score ** 2", "BinOp is not"),
        ("pickscore", "names pickscore, not a score column"),
        ("1 + 2", "names no score column"),
        ("clip_score +", "is not an expression"),
    ]:
        with pytest.raises(UserError, match=words):
            parse_rank_by(text, ["aesthetic", "clip_score"])


def test_jobs_of_format_version_4_keep_their_schema_without_the_candidate_columns():
    from fewstep.contract import CANDIDATE_COLUMNS, metadata_schema

    assert {"candidate", "rank_score", "candidate_seeds", "candidate_clip_score"} <= set(CANDIDATE_COLUMNS)
    assert not set(CANDIDATE_COLUMNS) & set(metadata_schema({}, 4).names)
    assert set(CANDIDATE_COLUMNS) <= set(metadata_schema({}).names)


def test_shard_rows_follow_each_topup_round_and_keep_all():
    from fewstep.contract import shard_rows

    rounds = [{"round": 1, "first_shard": 4, "shards": 2, "first_row": 10, "prompts": 5}]
    spec = {"counts": {"prompts": 15, "shards": 5}, "shard_size": 4, "rounds": rounds}
    assert [shard_rows(spec, s) for s in range(1, 6)] == [4, 4, 2, 4, 1]
    spec["candidates"] = {"k": 3, "rank_by": "clip_score", "keep": "all"}
    assert [shard_rows(spec, s) for s in range(1, 6)] == [12, 12, 6, 12, 3]
    with pytest.raises(ValueError):
        shard_rows(spec, 6)


def test_choice_keeps_the_highest_of_each_group_first_of_equals_and_ranks_non_numbers_last():
    values = np.array([1.0, 3.0, 2.0, np.nan, 5.0, 5.0, np.nan, np.nan, -1.0])
    best, ranks = choose(values, 3)
    assert best.tolist() == [1, 1, 2]
    assert ranks.tolist() == [[2, 0, 1], [2, 0, 1], [1, 2, 0]]


def test_per_limit_keeps_the_n_best_of_each_value_by_rank_then_row_id():
    import pyarrow as pa

    table = pa.table(
        {
            "row_id": [5, 1, 2, 3, 4, 0, 6],
            "category": ["a", "a", "a", "b", "b", "a", None],
            "clip_score": [1.0, 3.0, 3.0, None, 2.0, 0.5, 9.0],
        }
    )
    rank = parse_rank_by("clip_score", ["clip_score"])
    kept, counts = choose_per_limit(table, "category", 2, rank)
    assert kept.tolist() == [1, 2, 3, 4, 6] and counts == {"a": 2, "b": 2, "(null)": 1}
    kept, _ = choose_per_limit(table, "category", 2, None)  # no rank: row id order
    assert kept.tolist() == [0, 1, 3, 4, 6]


# --- the fleet ----------------------------------------------------------------------------

PROMPTS = [
    ("a red fox in snow", "Animals"),
    ("a cat on a sofa", "Animals"),
    ("an owl at night", "Animals"),
    ("a yellow bus", "Vehicles"),
    ("a sailing boat", "Vehicles"),
]


SCORE = ("--score", "clip=tiny,aesthetic=tiny")


def _stored_clip_scores(table, store) -> list[float]:
    """clip_score of each stored image, computed again in this process from its PNG bytes."""
    from worker.scoring import Scoring

    keys = table["image_key"].to_pylist()
    images = np.stack([np.asarray(Image.open(io.BytesIO(store.get(k))).convert("RGB")) for k in keys])
    scoring = json.loads(store.get("job.json"))["scoring"]
    return Scoring("cpu").score(scoring, images, table["prompt"].to_pylist()).columns["clip_score"]


def test_best_of_k_topup_until_quotas_met_and_finalize_per_limit_on_a_real_fleet(env, output, tmp_path):
    path = tmp_path / "prompts.tsv"
    path.write_text(
        "Prompt\tCategory\tChallenge\tNote\n" + "".join(f"{p}\t{c}\tBasic\t\n" for p, c in PROMPTS)
    )
    k, rank_by = 3, "aesthetic + 0.1*clip_score"
    enqueue = ("producer", "enqueue", "partiprompts", "--path", str(path), "--model", "tiny",
               "--output", output, "--layout", "files", "--shard-size", "2", *SCORE, "--candidates", str(k),
               "--rank-by", rank_by)  # fmt: skip
    job = cli_json(*enqueue, "--job", "bok", env=env)
    every = cli_json(*enqueue, "--job", "every", "--keep", "all", "--limit", "2", env=env)
    store = open_store(job["job_url"])
    worker = start_worker(env, log_path=tmp_path / "worker.log")
    try:
        wait_done("bok", output, env, timeout=300)
        wait_done("every", output, env, timeout=300)
        # --keep all: each prompt's K candidates are rows r*K + c, ranked, with the same lists.
        all_rows = committed_metadata(every["job_url"]).to_pylist()
        assert [r["row_id"] for r in all_rows] == list(range(2 * k))
        for r in all_rows:
            c = r["row_id"] % k
            assert r["candidate"] == c and r["seed"] == r["candidate_seeds"][c]
            assert r["clip_score"] == pytest.approx(r["candidate_clip_score"][c], rel=1e-5)
        assert len({r["image_key"] for r in all_rows}) == 2 * k
        verify_job("every", output, env)  # metadata against the manifests, expanded the same way
        first = committed_metadata(job["job_url"]).to_pylist()
        manifests = {r["row_id"]: r for r in _manifest_rows(store)}
        assert [r["row_id"] for r in first] == list(range(len(PROMPTS)))
        rank = parse_rank_by(rank_by, ["aesthetic", "clip_score"])
        for row in first:
            seeds = row["candidate_seeds"]
            assert seeds == [reference_candidate_seed(manifests[row["row_id"]]["seed"], c) for c in range(k)]
            values = rank.evaluate(
                {"aesthetic": row["candidate_aesthetic"], "clip_score": row["candidate_clip_score"]}, k
            )
            assert row["candidate_rank_scores"] == pytest.approx(values.tolist(), rel=1e-5)
            assert row["candidate"] == int(np.argmax(values)) and row["seed"] == seeds[row["candidate"]]
            assert row["clip_score"] == pytest.approx(row["candidate_clip_score"][row["candidate"]], rel=1e-5)
            assert row["aesthetic"] == pytest.approx(row["candidate_aesthetic"][row["candidate"]], rel=1e-5)
        # The stored image is the kept candidate's: its clip_score, computed again from the bytes.
        table = committed_metadata(job["job_url"])
        assert _stored_clip_scores(table, store) == pytest.approx(table["clip_score"].to_pylist(), abs=1e-3)
        stats = json.loads(store.get("stats/part-000001.json"))
        assert (stats["images"], stats["images_generated"]) == (2, 2 * k)

        # A quota of 3 passing rows per category, passing = at least the median aesthetic.
        threshold = float(np.median([r["aesthetic"] for r in first]))
        where = f"aesthetic>={threshold!r}"
        args = ("topup", "bok", "--output", output, "--until", "3", "--per", "category", "--where", where)
        spent = cli_json("producer", *args, "--budget", "0", env=env)  # spent already: nothing enqueued
        assert spent["state"] == "budget" and spent["rounds_enqueued"] == [] and spent["gpu_hours"] > 0
        assert spent["quota"]["short"] > 0 and "rounds" not in json.loads(store.get("job.json"))
        done = cli_json("producer", *args, "--max-rounds", "8", env=env)
        assert done["state"] == "met", done
        spec = json.loads(store.get("job.json"))
        assert len(spec["rounds"]) == len(done["rounds_enqueued"]) >= 1
        assert spec["quota"] == {"until": 3, "per": "category", "where": [where]}
        rows = committed_metadata(job["job_url"])
        assert rows.num_rows == spec["counts"]["prompts"]
        ids = rows["row_id"].to_pylist()
        assert ids == list(range(len(ids))) and len(set(rows["image_key"].to_pylist())) == len(ids)
        for r in rows.to_pylist()[len(PROMPTS) :]:
            assert r["candidate_seeds"][0] == reference_round_seed(
                0, _round_of(spec, r["row_id"]), r["row_id"]
            )
        passing = [r for r in rows.to_pylist() if r["aesthetic"] is not None and r["aesthetic"] >= threshold]
        for category in ("Animals", "Vehicles"):
            assert sum(r["category"] == category for r in passing) >= 3

        verify_job("bok", output, env)  # every round's shards: kept seeds against their manifests
        again = cli_json("producer", *args, env=env)  # met: nothing more
        assert again["state"] == "met" and again["rounds_enqueued"] == []
        assert json.loads(store.get("job.json"))["rounds"] == spec["rounds"]
        status = cli_json("producer", "status", "bok", "--output", output, env=env)
        assert status["quota"]["met"] and status["quota"]["groups"]["Animals"]["short"] == 0

        # The report: gain over K = 1 is the kept candidate's score minus candidate 0's, same prompts.
        report = cli_json("producer", "report", "bok", "--output", output, "--by", "category", env=env)
        [section] = report["best_of_k"]
        gains = {g["score"]: g for g in section["gain_over_k1"]}
        clip = [r["candidate_clip_score"] for r in rows.to_pylist()]
        expected = np.mean([c[r["candidate"]] - c[0] for c, r in zip(clip, rows.to_pylist(), strict=True)])
        assert gains["clip_score"]["mean_gain"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert gains["clip_score"]["n"] == rows.num_rows and sum(section["kept_index"]) == rows.num_rows
        assert section["kept"]["n"] == rows.num_rows and section["discarded"]["n"] == rows.num_rows * (k - 1)
        assert report["quotas"]["bok"]["met"]

        final = cli_json(
            "producer", "finalize", "bok", "--output", output, "--where", where, "--per", "category",
            "--limit", "3", env=env,
        )  # fmt: skip
        kept = pq.read_table(io.BytesIO(store.get("metadata.parquet"))).to_pylist()
        assert final["rows"] == 6 and final["per_limit"]["kept"] == {"Animals": 3, "Vehicles": 3}
        for category in ("Animals", "Vehicles"):
            best = sorted(
                (r for r in passing if r["category"] == category),
                key=lambda r: (-(r["aesthetic"] + 0.1 * r["clip_score"]), r["row_id"]),
            )[:3]
            assert sorted(r["row_id"] for r in kept if r["category"] == category) == sorted(
                r["row_id"] for r in best
            )
    finally:
        stop_worker(worker)


def _manifest_rows(store) -> list[dict]:
    keys = sorted(k for k, _ in store.list("manifests/") if k.endswith(".parquet"))
    return [r for key in keys for r in pq.read_table(io.BytesIO(store.get(key))).to_pylist()]


def _round_of(spec: dict, row_id: int) -> int:
    return next(
        r["round"] for r in spec["rounds"] if r["first_row"] <= row_id < r["first_row"] + r["prompts"]
    )


def test_enqueue_refuses_a_rank_expression_over_scores_the_job_does_not_compute(env, output, tmp_path):
    path = tmp_path / "prompts.tsv"
    path.write_text("Prompt\tCategory\tChallenge\tNote\na cat\tAnimals\tBasic\t\n")
    base = (
        "producer",
        "enqueue",
        "partiprompts",
        "--path",
        str(path),
        "--model",
        "tiny",
        "--job",
        "x",
        "--output",
        output,
    )
    cases = [
        (
            ("--candidates", "3", "--rank-by", "aesthetic", "--score", "clip=tiny"),
            "names aesthetic, not a score column",
        ),
        (("--candidates", "3"), "--candidates needs --rank-by"),
        (("--rank-by", "clip_score", "--score", "tiny"), "--rank-by and --keep need --candidates K"),
        (("--candidates", "3", "--rank-by", "open('x')", "--score", "tiny"), "Call is not"),
    ]
    for extra, words in cases:
        result = cli(*base, *extra, "--dry-run", env=env, check=False)
        assert result.returncode != 0 and words in result.stderr and "Traceback" not in result.stderr, (
            result.stderr
        )
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_round_asks_each_short_group_for_short_over_its_pass_rate_cycling_through_its_prompts():
    import pyarrow as pa

    from producer.quotas import Quota
    from producer.topup import round_rows

    prompts = pa.table({"row_id": [0, 1, 2, 3, 4], "category": ["a", "a", "a", "b", "c"]})
    spec = {"rounds": [{"groups": {"a": 2}}]}  # a's earlier round took its prompts 0 and 1
    counted = {
        "generated": 10,
        "passing": 4,
        "groups": {
            "a": {"generated": 8, "passing": 4, "short": 2},  # rate 1/2: 4 rows
            "b": {"generated": 2, "passing": 0, "short": 3},  # none passed: the job's rate, 4/10 → 8
            "c": {"generated": 0, "passing": 0, "short": 0},  # met: nothing
        },
    }
    positions, groups = round_rows(prompts, spec, Quota(6, "category", ()), counted)
    assert groups == {"a": 4, "b": 8}
    assert positions.tolist() == [2, 0, 1, 2] + [3] * 8  # a continues at its third prompt
    counted["passing"] = 0
    counted["groups"]["a"]["passing"] = 0  # nothing passed anywhere: max_factor (4) times short
    _, groups = round_rows(prompts, spec, Quota(6, "category", ()), counted)
    assert groups == {"a": 8, "b": 12}
