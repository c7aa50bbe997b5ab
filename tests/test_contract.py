"""The shared contract: keys from ids only, deterministic seeds, one schema per job."""

from __future__ import annotations

import numpy as np
import pytest

from fewstep import UserError
from fewstep.contract import (
    CONDITION_COLUMNS,
    SCORE_COLUMNS,
    ShardMessage,
    check_job_name,
    derive_seeds,
    image_key,
    image_key_attempt,
    manifest_key,
    metadata_key,
    metadata_schema,
    shard_object_key,
    shard_of_key,
    shard_rows,
)


def test_keys_are_built_from_ids():
    assert manifest_key(1) == "manifests/part-000001.parquet"
    assert metadata_key(12) == "metadata/part-000012.parquet"
    attempt = "20250102T030405.123456Z-1a2b3c4d"
    assert image_key(1, attempt, 42, "png") == f"images/part-000001/{attempt}/000000000042.png"
    assert image_key_attempt(image_key(7, attempt, 42, "jpg")) == (7, attempt)
    assert image_key_attempt("images/part-000001/part-000001.json") is None
    for layout, ext in (("webdataset", "tar"), ("parquet", "parquet")):
        key = shard_object_key(7, attempt, layout)
        assert key == f"images/part-000007/{attempt}.{ext}" and image_key_attempt(key) == (7, attempt)
    assert shard_of_key("metadata/part-000012.parquet") == 12
    assert shard_of_key(image_key(1, attempt, 42, "png")) is None
    with pytest.raises(ValueError):
        image_key(1, "../other", 42, "png")
    with pytest.raises(ValueError):
        manifest_key(0)


@pytest.mark.parametrize("name", ["", "../x", "a/b", "a..b", ".hidden", "x" * 101, "a\x00b", "sp ace"])
def test_unsafe_job_names_are_refused(name):
    with pytest.raises(UserError, match="invalid job name"):
        check_job_name(name)


def test_seeds_depend_only_on_job_seed_and_source_row():
    rows = np.arange(10_000)
    a = derive_seeds(0, rows)
    assert a.dtype == np.uint32
    assert np.array_equal(a, derive_seeds(0, rows))
    assert np.array_equal(a[5000:], derive_seeds(0, rows[5000:]))  # not on position or batch
    assert not np.array_equal(a, derive_seeds(1, rows))
    assert len(np.unique(a)) > 9_990  # no degenerate collisions


def test_message_is_references_only():
    message = ShardMessage("s3://b/p/job", 3, "manifests/part-000003.parquet", 2)
    assert set(message.to_kwargs()) == {"job_url", "shard", "manifest_key", "attempt"}
    assert ShardMessage.from_kwargs(message.to_kwargs()) == message


def test_metadata_schema_starts_with_diffusiondb_columns_and_adds_fields():
    schema = metadata_schema({"category": "string"})
    assert schema.names[:9] == [
        "image_name",
        "prompt",
        "part_id",
        "seed",
        "step",
        "cfg",
        "sampler",
        "width",
        "height",
    ]
    assert str(schema.field("part_id").type) == "uint32"
    assert schema.names[-1] == "category"
    with pytest.raises(UserError, match="clashes"):
        metadata_schema({"seed": "int64"})


def test_jobs_of_format_version_2_keep_their_schema_without_the_layout_columns():
    v3 = metadata_schema({}, 3).names
    assert metadata_schema({}, 2).names == [n for n in v3 if n not in ("image_offset", "image_row")]
    assert metadata_schema({"category": "string"}, 2).names[-1] == "category"


def test_jobs_of_format_version_3_keep_their_schema_without_the_score_and_condition_columns():
    added = set(SCORE_COLUMNS + CONDITION_COLUMNS)
    assert metadata_schema({}, 3).names == [n for n in metadata_schema({}, 4).names if n not in added]
    assert added <= set(metadata_schema({}).names)
    assert metadata_schema({"category": "string"}, 3).names[-1] == "category"


def test_shard_rows_every_shard_full_but_the_last():
    spec = {"counts": {"prompts": 10, "shards": 3}, "shard_size": 4}
    assert [shard_rows(spec, s) for s in (1, 2, 3)] == [4, 4, 2]
