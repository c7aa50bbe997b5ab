"""DiffusionDB: the metadata table (streamed, exact types) and the per-part JSON; JourneyDB."""

from __future__ import annotations

import datetime as dt
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fewstep import UserError
from fewstep.contract import check_fields
from producer.sources.diffusiondb import DiffusionDB, default_location, sampler_names
from producer.sources.journeydb import JourneyDB
from tests.prompt_files import (
    DIFFUSIONDB_ROWS,
    JOURNEYDB_RECORDS,
    write_diffusiondb,
    write_diffusiondb_parts,
    write_journeydb,
)


def table(source) -> pa.Table:
    return pa.Table.from_batches(list(source.batches()))


def test_metadata_table_keeps_seeds_and_carries_settings_as_source_fields(tmp_path):
    source = DiffusionDB(str(write_diffusiondb(tmp_path / "metadata.parquet")))
    check_fields(source.fields)
    assert source.total_rows == len(DIFFUSIONDB_ROWS)
    got = table(source)
    assert got.column("seed").type == pa.uint32()
    assert got.column("seed").to_pylist() == [r[3] for r in DIFFUSIONDB_ROWS]
    assert got.column("prompt").to_pylist() == [r[1] for r in DIFFUSIONDB_ROWS]  # byte-exact
    assert got.column("source_row").to_pylist() == list(range(len(DIFFUSIONDB_ROWS)))
    assert got.column("source_sampler").to_pylist() == [
        "k_lms",
        "ddim",
        "k_euler",
        "others",
        "k_euler_ancestral",
    ]
    assert got.column("source_step").to_pylist() == [50, 30, 50, 150, 50]
    assert got.column("source_cfg").type == pa.float32()
    assert got.column("source_timestamp").to_pylist()[1] is None  # nulls stay null
    assert got.column("source_timestamp").to_pylist()[0] == dt.datetime(2022, 8, 7, 12, 0, tzinfo=dt.UTC)
    assert got.column("source_image_nsfw").to_pylist()[1] == 2.0
    assert "source_user_name" not in got.column_names  # only with --carry user_name
    assert "source_seed" not in got.column_names  # the seed column is the source's
    assert got.column("source_image_name").to_pylist()[3] == "../../etc/passwd"  # data, never a key


def test_user_name_with_nulls_when_asked_and_derived_seeds(tmp_path):
    path = str(write_diffusiondb(tmp_path / "metadata.parquet"))
    source = DiffusionDB(path, seeds="derived", carry=("prompt_nsfw", "user_name"))
    assert source.fields == {"source_user_name": "string", "source_prompt_nsfw": "float32"}
    got = table(source)
    assert "seed" not in got.column_names
    assert DiffusionDB(path, seeds="derived").fields["source_seed"] == "int64"  # kept for pairing
    assert got.column("source_user_name").to_pylist() == ["a" * 64, None, None, "b" * 64, None]
    assert source.describe()["seeds"] == "derived"


def test_metadata_is_read_column_by_column_and_batch_by_batch(tmp_path):
    path = write_diffusiondb(tmp_path / "metadata.parquet", DIFFUSIONDB_ROWS * 40, row_group_size=50)
    source = DiffusionDB(str(path), carry=("step",))
    assert source.columns == ["prompt", "step", "seed"]  # nothing else is read
    sizes = [b.num_rows for b in source.batches()]
    assert sum(sizes) == 200


def test_sampler_codes_map_to_names():
    codes = pa.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 200, None], pa.uint8())
    assert sampler_names(codes).to_pylist() == [
        "ddim", "plms", "k_euler", "k_euler_ancestral", "k_heun", "k_dpm_2", "k_dpm_2_ancestral", "k_lms",
        "others", None, None, None,
    ]  # fmt: skip


@pytest.mark.parametrize("nested", [False, True])
def test_per_part_json_folder(tmp_path, nested):
    folder = write_diffusiondb_parts(tmp_path / "images", nested=nested)
    source = DiffusionDB(str(folder))
    assert source.fields == {
        "source_image_name": "string", "source_part_id": "int64", "source_step": "int64",
        "source_cfg": "float32", "source_sampler": "string",
    }  # fmt: skip
    got = table(source).to_pylist()
    assert [r["prompt"] for r in got] == ["geodesic landscape, john chamberlain, 4 k, ", "a cat", "", "a dog"]
    assert [r["seed"] for r in got] == [38753269, 1, 7, 99]
    assert [r["source_part_id"] for r in got] == [1, 1, 2, 2]
    assert got[3]["source_sampler"] == "k_euler" and got[0]["source_image_name"].endswith(".png")


def test_per_part_zip_archives_are_read_without_extracting(tmp_path):
    folder = write_diffusiondb_parts(tmp_path / "json")
    zips = tmp_path / "zips"
    zips.mkdir()
    for part in (1, 2):
        with zipfile.ZipFile(zips / f"part-{part:06d}.zip", "w") as archive:
            archive.writestr("3bfcd9cf.png", b"\x89PNG not really")
            archive.write(folder / f"part-{part:06d}.json", f"part-{part:06d}.json")
    assert table(DiffusionDB(str(zips))).column("seed").to_pylist() == [38753269, 1, 7, 99]


def test_bad_part_entries_are_counted_and_a_broken_part_names_itself(tmp_path):
    (tmp_path / "part-000001.json").write_text('{"a.png": {"p": 5}, "b.png": {"p": "ok", "se": -1}}')
    source = DiffusionDB(str(tmp_path))
    got = table(source).to_pylist()
    assert [(r["prompt"], r["seed"]) for r in got] == [("ok", None)]  # a bad seed is derived later
    assert source.invalid.count == 1
    (tmp_path / "part-000002.json").write_text('{"a.png": {"p": "x"},}')
    with pytest.raises(UserError, match=r"part-000002\.json: not valid JSON"):
        table(DiffusionDB(str(tmp_path)))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.drop_columns(["seed", "cfg"]), r"missing column\(s\) cfg, seed"),
        (lambda t: t.set_column(3, "seed", pa.array(["x"] * t.num_rows)), "column 'seed' has type string"),
        (lambda t: t.set_column(1, "prompt", pa.array(range(t.num_rows))), "column 'prompt' has type int64"),
    ],
)
def test_wrong_metadata_tables_are_refused_naming_the_column(tmp_path, change, message):
    path = write_diffusiondb(tmp_path / "metadata.parquet")
    pq.write_table(change(pq.read_table(path)), path)
    with pytest.raises(UserError, match=r"metadata\.parquet: " + message):
        DiffusionDB(str(path))


def test_truncated_metadata_table_is_refused(tmp_path):
    path = write_diffusiondb(tmp_path / "metadata.parquet")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match=r"metadata\.parquet: not a readable parquet file"):
        DiffusionDB(str(path))


def test_default_locations_are_the_hub_files_from_config():
    assert default_location("2m") == "hf://datasets/poloclub/diffusiondb@main/metadata.parquet"
    assert default_location("large") == "hf://datasets/poloclub/diffusiondb@main/metadata-large.parquet"


def test_offline_default_location_names_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"cannot reach the Hugging Face Hub .* pass --path"):
        DiffusionDB(subset="large")


@pytest.mark.parametrize("name", ["train_anno.jsonl", "train_anno.jsonl.tgz"])
def test_journeydb_prompt_or_caption_other_fields_carried(tmp_path, name):
    path = str(write_journeydb(tmp_path / name))
    by_prompt = table(JourneyDB(path)).to_pylist()
    assert [r["prompt"] for r in by_prompt] == [r["prompt"] for r in JOURNEYDB_RECORDS]
    assert by_prompt[0]["Task2.Caption"] == "A castle stands on a green hill."
    assert by_prompt[2]["Task1.Atmosphere"] == ["moody", "dark"]
    source = JourneyDB(path, field="caption")
    check_fields(source.fields)
    by_caption = table(source).to_pylist()
    assert [r["prompt"] for r in by_caption] == [r["Task2"]["Caption"] for r in JOURNEYDB_RECORDS]
    assert by_caption[1]["source_prompt"] == "portrait of a fox, watercolor"
    assert by_caption[1]["img_path"] == "./000/0002.jpg"


def test_journeydb_invalid_json_names_the_line_inside_the_archive(tmp_path):
    path = tmp_path / "anno.tgz"
    write_journeydb(path, [*JOURNEYDB_RECORDS, "not json"])  # written as the string "not json": valid
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(b'{"prompt": "a"}\n{"prompt": }\n')
    with pytest.raises(UserError, match=r"broken\.jsonl: line 2 is not valid JSON"):
        table(JourneyDB(str(broken)))
    source = JourneyDB(str(path))
    assert len(table(source)) == 3 and source.invalid.count == 1  # the string record is not an object
    assert "anno.tgz:data/train/train_anno_realease_repath.jsonl: line 4" in source.invalid.examples[0]
