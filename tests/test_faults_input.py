"""Hostile input through a real worker: it is stored byte-exact and never reaches a key;
malformed files fail with one line naming the file and the line; shards whose optional
columns are all null read together with the others."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.dataset as ds
from pyarrow import fs

from fewstep.contract import metadata_schema
from fewstep.storage import open_store
from producer.enqueue import JobOptions, enqueue
from producer.sources import PromptSource
from tests.support import cli, cli_json, committed_metadata, start_worker, stop_worker, verify_job, wait_done
from tests.test_cli_errors import assert_one_line_error

# A 100,000-character prompt whose end would show up if a prompt were ever logged.
TAIL = "zebra-quokka-tail-marker"
LONG = ("a castle on a hill, " * 5000)[: 100_000 - len(TAIL)] + TAIL
WIDE = "é" * 1000  # 2,000 bytes of UTF-8
HOSTILE = [
    ("an ordinary prompt", "Animals", "Basic", ""),
    (LONG, "Long", "Length", "100,000 characters"),
    ("a NUL \x00 inside", "Nul\x00", "\x00", "\x00"),
    ("../../etc/passwd", "../../../../tmp/x", "../", "/"),
    ("/absolute/path/prompt", "/etc", "/", "a/b/../../c"),
    ("", "Empty", "skipped", ""),
    (WIDE, WIDE, WIDE, WIDE),
    ("   ", "Blank", "skipped", ""),
    ("ünïcödé 漢字 🎨 with\u2028separator", "Ünicode", "☃", "\u200b"),
]
KEPT = [row for row in HOSTILE if row[0].strip()]
KEY = re.compile(
    r"job\.json|manifests/part-\d{6}\.parquet|metadata/part-\d{6}\.parquet"
    r"|images/part-\d{6}/\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{8}/\d{12}\.png"
    r"|attempts/part-\d{6}/\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{8}\.json|stats/part-\d{6}\.json|workers/[A-Za-z0-9_.-]+\.json"
)


def write_tsv(path, rows) -> None:
    lines = ["Prompt\tCategory\tChallenge\tNote"] + ["\t".join(row) for row in rows]
    path.write_bytes(("\n".join(lines) + "\n").encode())


def test_j_hostile_prompts_are_kept_byte_exact_and_never_reach_a_key(env, output, tmp_path):
    source = tmp_path / "hostile.tsv"
    write_tsv(source, HOSTILE)
    job = cli_json(
        "producer", "enqueue", "partiprompts", "--path", str(source), "--model", "tiny", "--job", "hostile",
        "--output", output, "--shard-size", "3", "--layout", "files", env=env,
    )  # fmt: skip
    assert job["prompts"] == len(KEPT) and job["skipped_empty"] == 2
    log = tmp_path / "worker.log"
    worker = start_worker(env, log_path=log)
    try:
        wait_done("hostile", output, env, timeout=420)
    finally:
        stop_worker(worker)
    table = committed_metadata(job["job_url"])
    assert table.column("prompt").to_pylist() == [row[0] for row in KEPT]  # byte-exact, NUL included
    assert table.column("category").to_pylist() == [row[1] for row in KEPT]
    assert table.column("note").to_pylist() == [row[3] for row in KEPT]
    rows = {row["prompt"]: row for row in table.to_pylist()}
    assert rows[LONG]["truncated"] is True and rows[LONG]["prompt_tokens"] > 77
    assert all(
        not r["truncated"] and r["prompt_tokens"] <= 77 for p, r in rows.items() if p not in (LONG, WIDE)
    )
    assert rows[WIDE]["truncated"] is True  # 1,000 characters are more than 77 tokens too
    keys = [key for key, _ in open_store(job["job_url"]).list()]
    odd = [key for key in keys if not KEY.fullmatch(key)]
    assert not odd, odd  # keys come from ids only
    text = log.read_text(errors="replace")
    assert TAIL not in text and "etc/passwd" not in text  # prompts stay out of the log
    verify_job("hostile", output, env)


def test_j_a_file_that_is_not_utf8_names_the_file_and_line(env, output, tmp_path):
    bad = tmp_path / "latin1.tsv"
    bad.write_bytes("Prompt\tCategory\tChallenge\tNote\nfine\ta\tb\t\ncaf\xe9\ta\tb\t\n".encode("latin-1"))
    result = cli(
        "producer", "enqueue", "partiprompts", "--path", str(bad), "--model", "tiny", "--job", "latin1",
        "--output", output, env=env, check=False,
    )  # fmt: skip
    assert_one_line_error(result, "latin1.tsv", "line 3 is not valid UTF-8")


def test_j_a_row_with_missing_fields_names_the_file_and_line(env, output, tmp_path):
    bad = tmp_path / "ragged.tsv"
    bad.write_text("Prompt\tCategory\tChallenge\tNote\nfine\ta\tb\t\nfine\ta\tb\t\nshort row\tonly two\n")
    result = cli(
        "producer", "enqueue", "partiprompts", "--path", str(bad), "--model", "tiny", "--job", "ragged",
        "--output", output, env=env, check=False,
    )  # fmt: skip
    assert_one_line_error(result, "ragged.tsv", "line 4 has 2 tab-separated fields, expected 4")
    assert cli("producer", "status", "ragged", "--output", output, env=env, check=False).returncode != 0


class Rows(PromptSource):
    """Prompts given as record batches, as a source's reader would yield them."""

    name = "rows"

    def __init__(self, batches: list[pa.RecordBatch], fields: dict[str, str]):
        self._batches = batches
        self.fields = fields

    def batches(self):
        yield from self._batches

    def describe(self) -> dict:
        return {"name": self.name, "path": "test", "fields": self.fields}


def test_h_shards_with_all_null_optional_columns_read_together_with_pyarrow_dataset(
    env, output, local_services, tmp_path
):
    fields = {"style": "string", "score": "float64", "tags": "list<string>"}
    schema = pa.schema(
        [("source_row", pa.int64()), ("prompt", pa.string()), ("style", pa.string()), ("score", pa.float64()),
         ("tags", pa.list_(pa.string()))]
    )  # fmt: skip
    empty = pa.RecordBatch.from_pydict(
        {"source_row": [0, 1, 2, 3], "prompt": ["a fox", "a hen", "a cow", "a pig"],
         "style": [None] * 4, "score": [None] * 4, "tags": [None] * 4},
        schema=schema,
    )  # fmt: skip
    full = pa.RecordBatch.from_pydict(
        {"source_row": [4, 5, 6, 7], "prompt": ["a cat", "a dog", "an owl", "a bee"],
         "style": ["ink", "oil", None, "pastel"], "score": [0.5, 1.0, 2.5, None],
         "tags": [["x"], [], ["y", "z"], None]},
        schema=schema,
    )  # fmt: skip
    job = enqueue(
        Rows([empty, full], fields), JobOptions(job="nulls", output=output, model="tiny", shard_size=4)
    )
    assert job["shards"] == 2
    worker = start_worker(env, log_path=tmp_path / "worker.log")
    try:
        wait_done("nulls", output, env, timeout=300)
    finally:
        stop_worker(worker)

    s3 = fs.S3FileSystem(
        access_key=local_services.access_key,
        secret_key=local_services.secret_key,
        endpoint_override=local_services.s3_endpoint,
        region="us-east-1",
    )
    parts = urlsplit(job["job_url"])
    dataset = ds.dataset(f"{parts.netloc}{parts.path}/metadata/", filesystem=s3, format="parquet")
    assert dataset.schema.equals(metadata_schema(fields))
    table = dataset.to_table().sort_by("row_id")
    assert table.num_rows == 8
    assert table.column("style").to_pylist() == [None] * 4 + ["ink", "oil", None, "pastel"]
    assert table.column("score").to_pylist() == [None] * 4 + [0.5, 1.0, 2.5, None]
    assert table.column("tags").to_pylist() == [None] * 4 + [["x"], [], ["y", "z"], None]
    assert table.column("nsfw").null_count == 8  # the tiny model has no safety checker
    verify_job("nulls", output, env)
