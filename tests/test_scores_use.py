"""Using scores: `producer finalize --where`, `producer dedupe`, `producer report` (in a real headless
Chromium) and `producer gallery --sort`, on real jobs made by one real worker, scored with
tests/scored_jobs.py as the worker's --score/--embeddings would."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from fewstep import UserError
from fewstep.storage import open_store
from producer.cli import cli as producer_cli
from producer.dedupe import dedupe
from producer.finalize import finalize
from producer.images import read_images
from tests.browser import Chromium, chromium_path
from tests.prompt_files import write_diffusiondb
from tests.scored_jobs import add_scores, perturbed
from tests.support import cli, committed_metadata, run_worker_until_idle
from tests.test_cli_errors import assert_one_line_error

CATEGORIES = ("Animals", "Food", "Vehicles")
PARTI_ROWS = 12
#: DiffusionDB rows: row 6 repeats row 1's prompt and seed (an exact duplicate); row 7's image
#: is replaced by a slightly perturbed copy of row 3's (a near duplicate).
DDB_PROMPTS = [
    ("a red cube on a table", 11), ("a lighthouse at night", 22), ("green fields, oil painting", 33),
    ("a bowl of ramen", 44), ("portrait of an old sailor", 55), ("a city in the rain", 66),
    ("a lighthouse at night", 22), ("a paper boat on a lake", 77),
]  # fmt: skip
EXACT, NEAR = (6, 1), (7, 3)


def producer(*args: str) -> dict:
    """A ``producer`` command run in this process (no interpreter start per call; errors a user
    sees are checked through the real command line) with ``--json``; its output."""
    result = CliRunner().invoke(producer_cli, [*args, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def parti_file(tmp_path: Path) -> Path:
    lines = ["Prompt\tCategory\tChallenge\tNote"]
    lines += [f"a small thing number {i}\t{CATEGORIES[i % 3]}\tBasic\t" for i in range(PARTI_ROWS)]
    path = tmp_path / "parti.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


def ddb_file(tmp_path: Path) -> Path:
    rows = [
        (f"{i:08d}-0000-0000-0000-000000000000.png", p, 1, seed, 50, 7.0, 8, 512, 512, None, None, 0.0, 0.0)
        for i, (p, seed) in enumerate(DDB_PROMPTS)
    ]
    return write_diffusiondb(tmp_path / "metadata.parquet", rows)


def clip_a(row: int) -> float | None:
    """parti-a's planted clip_score: 20 + row, none for the last two rows."""
    return None if row >= PARTI_ROWS - 2 else 20.0 + row


@pytest.fixture(scope="module")
def jobs(local_services, model_cache, tmp_path_factory):
    """Three PartiPrompts-style jobs of one prompt set (files, webdataset, parquet layouts; the
    last one with --limit 6: another selection of the same prompts) and a DiffusionDB job with
    planted duplicates, made by one real worker, then scored."""
    tmp = tmp_path_factory.mktemp("scores")
    output = f"s3://fewstep-test/runs/{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {
            **local_services.env(),
            "HF_HUB_OFFLINE": "1",
            "FEWSTEP_MODEL_CACHE": str(model_cache),
            "FEWSTEP_QUEUE_PREFIX": "t" + uuid.uuid4().hex[:10],
        }.items():
            mp.setenv(key, value)
        env = dict(os.environ)
        parti = parti_file(tmp)
        for job, extra in (
            ("parti-a", ["--layout", "files", "--shard-size", "4"]),
            ("parti-b", ["--layout", "webdataset", "--shard-size", "6", "--seed", "1"]),
            ("parti-c", ["--layout", "parquet", "--shard-size", "12", "--seed", "2", "--limit", "6"]),
        ):
            producer("enqueue", "partiprompts", "--path", str(parti), "--model", "tiny",
                     "--job", job, "--output", output, *extra)  # fmt: skip
        producer("enqueue", "diffusiondb", "--path", str(ddb_file(tmp)), "--model", "tiny",
                 "--job", "ddb", "--output", output, "--shard-size", "4", "--seeds", "source",
                 "--layout", "files")  # fmt: skip
        run_worker_until_idle(env, tmp / "worker.log")

        stores = {job: open_store(f"{output}/{job}") for job in ("parti-a", "parti-b", "parti-c", "ddb")}
        for job in stores:
            assert producer("status", job, "--output", output)["state"] == "done"
        rows = range(PARTI_ROWS)
        add_scores(
            stores["parti-a"],
            {"clip_score": {r: clip_a(r) for r in rows}, "nsfw_score": {r: 0.1 * (r % 4) for r in rows}},
        )
        add_scores(
            stores["parti-b"],
            {"clip_score": {r: 22.0 + r for r in rows}, "aesthetic": {r: 5.0 for r in rows}},
        )
        add_scores(stores["parti-c"], {"clip_score": {r: 30.0 - r for r in rows}})
        ddb = committed_metadata(stores["ddb"].url).to_pylist()
        original = read_images(stores["ddb"], [ddb[NEAR[1]]], "files")[0]
        embeddings = add_scores(stores["ddb"], embeddings=True, images={NEAR[0]: perturbed(original)})
        yield {"env": env, "output": output, "stores": stores, "embeddings": embeddings, "tmp": tmp}


def test_finalize_where_on_scores_removes_rows_in_order_and_counts_each_condition_in_the_card(jobs):
    env, output, store = jobs["env"], jobs["output"], jobs["stores"]["parti-a"]
    summary = producer("finalize", "parti-a", "--output", output,
                       "--where", "clip_score >= 25", "--where", "nsfw_score<0.25")  # fmt: skip
    # clip_score>=25 removes rows 0-4 and the two rows without a clip_score; of rows 5-9,
    # nsfw_score = 0.1 * (row % 4) is 0.3 for row 7 only.
    assert summary["filters"] == [
        {"where": "clip_score>=25", "removed": 7},
        {"where": "nsfw_score<0.25", "removed": 1},
    ]
    assert (summary["rows"], summary["committed_rows"]) == (4, 12)
    table = pq.read_table(io.BytesIO(store.get("metadata.parquet")))
    assert table.column("row_id").to_pylist() == [5, 6, 8, 9]
    assert json.loads(store.get("finalized.json"))["filters"] == summary["filters"]
    card = store.get("README.md").decode()
    assert "## Filters" in card and "Of 12 committed rows, 4 are in this dataset" in card
    assert "- `clip_score>=25`: removed 7 rows" in card and "- `nsfw_score<0.25`: removed 1 rows" in card
    assert "null in a compared column" in card

    bad = cli(
        "producer", "finalize", "parti-a", "--output", output, "--where", "clipscore>1", env=env, check=False
    )
    assert_one_line_error(bad, "no metadata column 'clipscore'", "clip_score")
    numeric = bad.stderr.split("numeric ones:")[1].split(";")[0]
    assert "clip_score" in numeric and "category" not in numeric and "note" not in numeric
    with pytest.raises(UserError, match="field 'prompt' is text; --where compares numbers"):
        finalize(store, where=("prompt>1",))
    text = cli("producer", "finalize", "parti-a", "--output", output, "--where", "category > 3", env=env,
               check=False)  # fmt: skip
    assert_one_line_error(text, "field 'category' is text", "--where compares numbers")
    nothing = finalize(store, where=("clip_score>100",))
    assert nothing["rows"] == 0 and pq.read_table(io.BytesIO(store.get("metadata.parquet"))).num_rows == 0
    unfiltered = finalize(store)
    assert (unfiltered["rows"], unfiltered["filters"]) == (12, [])


def test_dedupe_finds_the_planted_exact_and_near_duplicates_and_nothing_else(jobs):
    env, output, store = jobs["env"], jobs["output"], jobs["stores"]["ddb"]
    # The planted pairs are the only ones at 0.95 or above, computed here from the embeddings.
    rows = sorted(jobs["embeddings"])
    vectors = np.stack([jobs["embeddings"][r] for r in rows])
    similarity = vectors @ vectors.T
    close = {(rows[i], rows[j]) for i, j in zip(*np.nonzero(similarity >= 0.95), strict=True) if i > j}
    assert close == {EXACT, NEAR}, similarity.round(3)

    summary = producer("dedupe", "ddb", "--output", output, "--threshold", "0.95")
    assert (summary["rows"], summary["near_duplicates"], summary["method"]) == (8, 2, "exact")
    found = pq.read_table(io.BytesIO(store.get("near_duplicates.parquet"))).to_pylist()
    assert [(f["row_id"], f["duplicate_of"]) for f in found] == [EXACT, NEAR]
    assert all(0.95 <= f["similarity"] <= 1.0 for f in found)

    marked = finalize(store)
    assert marked["near_duplicates"] == {"rows": 2, "dropped": False, "threshold": 0.95}
    table = pq.read_table(io.BytesIO(store.get("metadata.parquet")))
    assert table.column("near_duplicate_of").to_pylist() == [None] * 6 + [1, 3]
    dropped = producer("finalize", "ddb", "--output", output, "--drop-near-duplicates")
    assert dropped["rows"] == 6 and dropped["filters"] == [{"drop_near_duplicates": True, "removed": 2}]
    table = pq.read_table(io.BytesIO(store.get("metadata.parquet")))
    assert table.column("row_id").to_pylist() == [0, 1, 2, 3, 4, 5]
    assert "near duplicates (`--drop-near-duplicates`): removed 2 rows" in store.get("README.md").decode()

    with pytest.raises(
        UserError, match="job parti-a has no image embeddings: enqueue it with --score clip --embeddings"
    ):
        dedupe(jobs["stores"]["parti-a"], 0.95)
    no_scores = cli("producer", "report", "ddb", "--output", output, env=env, check=False)
    assert_one_line_error(no_scores, "job ddb has no scores", "--score")


def test_report_of_three_layouts_renders_every_plot_and_thumbnail_in_a_real_browser(jobs):
    chromium = chromium_path()
    if chromium is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)")
    output, tmp = jobs["output"], jobs["tmp"]
    local = tmp / "report-copy"
    summary = producer("report", "parti-a", "parti-b", "parti-c", "--output", output,
                       "--by", "category", "--download", str(local))  # fmt: skip
    assert summary["scores"] == ["clip_score", "aesthetic", "nsfw_score"]
    assert summary["groups"] == ["all", *CATEGORIES]
    assert summary["compared"] == [["parti-b", "parti-a"], ["parti-c", "parti-a"]]
    # 3 scores x (histogram, means) + paired plots for clip_score (b and c against a).
    assert summary["plots"] == sorted(
        [f"{kind}-{s}.svg" for kind in ("hist", "means") for s in summary["scores"]]
        + ["paired-clip_score.svg"]
    )
    store = jobs["stores"]["parti-a"]
    assert store.exists("report/index.html") and store.exists("report/report.csv")

    numbers = list(csv.DictReader(io.StringIO((local / "report" / "report.csv").read_text())))
    a_all = next(r for r in numbers if (r["job"], r["score"], r["group"]) == ("parti-a", "clip_score", "all"))
    planted = [clip_a(r) for r in range(PARTI_ROWS) if clip_a(r) is not None]
    assert int(a_all["n"]) == 10 and float(a_all["mean"]) == pytest.approx(np.mean(planted))
    half = 2.262157 * np.std(planted, ddof=1) / np.sqrt(10)  # t(0.975, 9)
    assert float(a_all["ci_low"]) == pytest.approx(np.mean(planted) - half, rel=1e-5)
    paired = list(csv.DictReader(io.StringIO((local / "report" / "comparison.csv").read_text())))
    b_all = next(r for r in paired if (r["job"], r["score"], r["group"]) == ("parti-b", "clip_score", "all"))
    assert int(b_all["n"]) == 10 and float(b_all["mean_difference"]) == pytest.approx(2.0)
    assert float(b_all["win_rate"]) == 1.0

    browser = Chromium(chromium, tmp / "profile")
    try:
        tab = browser.open((local / "report" / "index.html").as_uri())
        images = browser.images(tab)
        text = browser.evaluate(tab, "document.body.innerText")
        scripts = browser.evaluate(tab, "document.scripts.length")
    finally:
        browser.close()
    assert images and all(i["ok"] for i in images), images
    assert sorted(i["src"] for i in images if i["src"].endswith(".svg")) == summary["plots"]
    thumbs = {i["src"] for i in images if i["src"].startswith("thumbs/")}
    assert len(thumbs) == summary["thumbnails"] > 0 and scripts == 0
    # Every job's best image of the whole set is shown: parti-a row 9 (clip 29), b row 11, c row 0.
    assert {"thumbs/parti-a-000000000009.jpg", "thumbs/parti-b-000000000011.jpg"} <= thumbs
    assert "thumbs/parti-c-000000000000.jpg" in thumbs
    assert "Paired by prompt" in text and "parti-b − parti-a" in text
    assert "Best and worst images by CLIP score" in text


def test_gallery_sort_puts_the_highest_clip_score_first_and_rows_without_it_last(jobs):
    env, output, store = jobs["env"], jobs["output"], jobs["stores"]["parti-a"]
    producer("gallery", "parti-a", "--output", output, "--n", "12", "--sort", "clip_score")
    page = store.get("gallery/index.html").decode()
    order = [int(r) for r in re.findall(r"row (\d+)</p>", page)]
    assert order == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 10, 11]
    assert "clip 29.0 · nsfw 0.10" in page and "clip 20.0 · nsfw 0.00" in page
    grouped = producer("gallery", "parti-a", "--output", output, "--n", "12", "--by", "category",
                       "--sort", "clip_score")  # fmt: skip
    assert grouped["groups"] == {c: 4 for c in CATEGORIES}
    page = store.get("gallery/index.html").decode()
    assert [int(r) for r in re.findall(r"row (\d+)</p>", page)] == [9, 6, 3, 0, 7, 4, 1, 10, 8, 5, 2, 11]
    bad = cli(
        "producer", "gallery", "parti-c", "--output", output, "--sort", "aesthetic", env=env, check=False
    )
    assert_one_line_error(bad, "--sort aesthetic: job parti-c was not scored with it")
