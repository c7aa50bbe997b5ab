"""Selection: which rows become prompts, each step counted, deterministic and streaming."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fewstep import UserError
from producer.selection import BottomSample, Selection, Selector, prompt_keys

FIELDS = {"category": "string", "challenge": "string", "source_prompt_nsfw": "float32", "score": "string"}


def batches(prompts: list, size: int = 3, **fields) -> list[pa.RecordBatch]:
    n = len(prompts)
    columns = {
        "source_row": pa.array(range(n), pa.int64()),
        "prompt": pa.array(prompts, pa.string()),
        "category": pa.array(fields.get("category", ["Animals"] * n), pa.string()),
        "challenge": pa.array(fields.get("challenge", ["Basic"] * n), pa.string()),
        "source_prompt_nsfw": pa.array(fields.get("nsfw", [0.0] * n), pa.float32()),
        "score": pa.array(fields.get("score", ["1"] * n), pa.string()),
    }
    table = pa.table(columns)
    return table.to_batches(max_chunksize=size)


def select(selection: Selection, data: list[pa.RecordBatch], **kw) -> tuple[list[dict], Selector]:
    selector = Selector(
        selection, FIELDS, max_prompt_chars=kw.get("max_prompt_chars", 100), log_duplicates=True
    )
    out = list(selector.select(iter(data)))
    return pa.Table.from_batches(out, schema=data[0].schema).to_pylist() if out else [], selector


def prompts_of(rows: list[dict]) -> list[str]:
    return [r["prompt"] for r in rows]


def test_empty_and_overlong_prompts_are_skipped_and_counted_other_text_kept():
    data = batches(["a", "", None, " \t\u3000", "b\x00c", "x" * 101, "é" * 100, "two\nlines", "ok"])
    rows, selector = select(Selection(), data)
    assert prompts_of(rows) == ["a", "b\x00c", "é" * 100, "two\nlines", "ok"]  # byte-exact
    assert selector.counts["skipped_empty"] == 3
    assert selector.counts["skipped_invalid"] == 1
    assert selector.invalid.examples == ["source row 5: prompt has over 100 characters"]


def test_where_compares_numbers_with_or_without_the_source_prefix():
    data = batches(["a", "b", "c", "d"], nsfw=[0.1, 0.5, None, 0.19], score=["3", "x", "10", " 2 "])
    rows, selector = select(Selection(where=("prompt_nsfw<0.2",)), data)
    assert prompts_of(rows) == ["a", "d"] and selector.counts["skipped_filtered"] == 2
    rows, _ = select(Selection(where=("score>=2.5", "source_row!=0")), data)
    assert prompts_of(rows) == ["c"]  # text holding numbers is compared as numbers; "x" fails
    assert selector.describe()["where"] == ["source_prompt_nsfw<0.2"]


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("nope<1", "no source field 'nope'"),
        ("prompt_nsfw ~ 1", "expected FIELD OP NUMBER"),
        ("category<1", "field 'category' is text \\('Animals' is not a number\\); --where compares numbers"),
        ("score<1", None),
    ],
)
def test_where_errors(where, message):
    if message is None:  # a text field holding numbers is compared as numbers: allowed
        select(Selection(where=(where,)), batches(["a"]))
        return
    with pytest.raises(UserError, match=message):
        select(Selection(where=(where,)), batches(["a"]))


def test_category_and_challenge_ignore_surrounding_spaces_and_case():
    data = batches(
        ["a", "b", "c", "d"],
        category=["Animals ", " animals", "Arts", "Animals"],
        challenge=["Basic", "Basic", "Basic", "Complex "],
    )
    rows, selector = select(Selection(match={"category": ("Animals",)}), data)
    assert prompts_of(rows) == ["a", "b", "d"]
    rows, _ = select(Selection(match={"category": ("animals", "ARTS"), "challenge": ("complex",)}), data)
    assert prompts_of(rows) == ["d"]
    assert selector.describe()["category"] == ["animals"]


def test_a_category_that_matches_nothing_is_an_error_naming_what_exists():
    with pytest.raises(UserError, match=r"--category 'animls' matches no row \(the source has: animals\)"):
        select(Selection(match={"category": ("Animls",)}), batches(["a"]))


def test_min_and_max_chars_count_characters():
    rows, selector = select(Selection(min_chars=2, max_chars=3), batches(["a", "ab", "été", "abcd"]))
    assert prompts_of(rows) == ["ab", "été"] and selector.counts["skipped_filtered"] == 2


def test_dedupe_keeps_the_first_occurrence_and_records_which_row_was_kept():
    data = batches(["A  cat", "dog", "a cat", "a\tCAT ", "Dog", "bird"], size=2)
    rows, selector = select(Selection(dedupe=True), data)
    assert [(r["source_row"], r["prompt"]) for r in rows] == [(0, "A  cat"), (1, "dog"), (5, "bird")]
    assert selector.counts["duplicates"] == 3
    log = pq.read_table(io.BytesIO(selector.duplicate_log.close())).to_pylist()
    assert log == [
        {"source_row": 2, "duplicate_of": 0},
        {"source_row": 3, "duplicate_of": 0},
        {"source_row": 4, "duplicate_of": 1},
    ]


def test_prompt_keys_are_stable_across_runs():
    keys = prompt_keys(pa.array(["A  cat", "a cat", "a dog"]))
    assert keys[0] == keys[1] != keys[2]
    assert int(keys[2]) == int(prompt_keys(pa.array(["A DOG"]))[0])
    assert int(keys[0]) == 0xA2DD230BB4DFF567  # BLAKE2b: the same on every machine and Python


def test_sample_is_deterministic_in_source_order_and_independent_of_batch_size():
    prompts = [f"p{i}" for i in range(1000)]
    a, selector = select(Selection(sample=50, sample_seed=3), batches(prompts, size=7))
    b, _ = select(Selection(sample=50, sample_seed=3), batches(prompts, size=1000))
    c, _ = select(Selection(sample=50, sample_seed=4), batches(prompts, size=7))
    bigger, _ = select(Selection(sample=80, sample_seed=3), batches(prompts, size=13))
    rows_a = [r["source_row"] for r in a]
    assert rows_a == [r["source_row"] for r in b] == sorted(rows_a) and len(rows_a) == 50
    assert rows_a != [r["source_row"] for r in c]
    assert set(rows_a) <= {r["source_row"] for r in bigger}  # a sample of N is inside one of N + k
    assert selector.counts["not_selected"] == 950


def test_sample_holds_a_bounded_number_of_rows():
    sample = BottomSample(100, seed=0)
    for batch in batches([f"p{i}" for i in range(300_000)], size=10_000):
        sample.add(batch)
        assert sample.held <= 2 * 100 + 65_536 + 10_000
    assert len(pa.Table.from_batches(list(sample.result()))) == 100


def test_limit_stops_reading_and_counts_add_up():
    read = []

    def source():
        for batch in batches(["a", "", "b", "b", "c", "d", "e", "f"], size=2):
            read.append(batch.num_rows)
            yield batch

    selector = Selector(Selection(limit=2, dedupe=True), FIELDS, max_prompt_chars=100, log_duplicates=False)
    rows = pa.Table.from_batches(list(selector.select(source()))).to_pylist()
    assert prompts_of(rows) == ["a", "b"]
    assert sum(read) < 8  # stopped early
    c = selector.counts
    assert c["rows_read"] == c["skipped_empty"] + c["duplicates"] + c["not_selected"] + len(rows)


def test_selection_is_described_for_the_job_spec():
    selector = Selector(
        Selection(limit=5, sample=10, sample_seed=2, dedupe=True, where=("score>1",), min_chars=3),
        FIELDS,
        max_prompt_chars=100,
        log_duplicates=False,
    )
    assert selector.describe() == {
        "max_prompt_chars": 100,
        "limit": 5,
        "sample": 10,
        "sample_seed": 2,
        "dedupe": "first occurrence, case folded, whitespace collapsed",
        "where": ["score>1"],
        "min_chars": 3,
    }


def test_no_python_objects_per_row_without_dedupe():
    # 200k rows through every streaming step: the selector keeps only counters.
    n = 200_000
    table = pa.table(
        {
            "source_row": pa.array(np.arange(n)),
            "prompt": pa.array(["a prompt"] * n),
            "category": pa.array(["Animals"] * n),
            "challenge": pa.array(["Basic"] * n),
            "source_prompt_nsfw": pa.array(np.zeros(n, np.float32)),
            "score": pa.array(["1"] * n),
        }
    )
    selector = Selector(Selection(where=("prompt_nsfw<1",), min_chars=1), FIELDS, max_prompt_chars=100,
                        log_duplicates=False)  # fmt: skip
    assert sum(b.num_rows for b in selector.select(iter(table.to_batches(65_536)))) == n


def test_dedupe_across_many_batches_matches_a_plain_reference():
    rng = np.random.default_rng(1)
    prompts = [f"prompt {int(i)}" for i in rng.integers(0, 3000, size=20_000)]
    rows, selector = select(Selection(dedupe=True), batches(prompts, size=257))
    first: dict[str, int] = {}
    for i, p in enumerate(prompts):
        first.setdefault(p, i)
    assert [r["source_row"] for r in rows] == sorted(first.values())
    log = pq.read_table(io.BytesIO(selector.duplicate_log.close())).to_pylist()
    assert all(prompts[d["duplicate_of"]] == prompts[d["source_row"]] for d in log)
    assert len(log) == selector.counts["duplicates"] == len(prompts) - len(first)


def test_limit_reads_up_to_the_row_that_fills_it_even_inside_one_large_batch():
    data = batches(["a", "b", "", "c", "d", "e", "f", "g", "h", "i"], size=10)  # one batch, as a TSV gives
    rows, selector = select(Selection(limit=3), data)
    assert prompts_of(rows) == ["a", "b", "c"]
    assert (selector.counts["rows_read"], selector.counts["skipped_empty"]) == (4, 1)
    assert selector.counts["not_selected"] == 0
    rows, selector = select(Selection(limit=0), data)
    assert rows == [] and selector.counts["rows_read"] == 0
