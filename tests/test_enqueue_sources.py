"""Enqueueing every source on real services: counts, spec identity, resume, remote paths, bad input."""

from __future__ import annotations

import io
import json
import os
import pty
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.parquet as pq
import pytest

from fewstep.contract import metadata_key
from fewstep.queue import queue_length, redis_client
from fewstep.storage import open_store
from tests.conftest import BUCKET
from tests.prompt_files import (
    DIFFUSIONDB_ROWS,
    journeydb_lines,
    write_diffusiondb,
    write_diffusiondb_parts,
    write_journeydb,
)
from tests.support import cli
from tests.test_cli_errors import assert_one_line_error


def enqueue(env, output, job, source, *args, check=True):
    return cli(
        "producer", "enqueue", *source, "--model", "tiny", "--job", job, "--output", output, *args,
        env=env, check=check,
    )  # fmt: skip


def enqueue_json(env, output, job, source, *args) -> dict:
    return json.loads(enqueue(env, output, job, source, *args, "--json").stdout)


def manifests(job_url: str) -> list[dict]:
    store = open_store(job_url)
    rows = []
    for key, _ in sorted(store.list("manifests/")):
        rows += pq.read_table(io.BytesIO(store.get(key))).to_pylist()
    return rows


def test_dry_run_prints_counts_and_touches_nothing(env, output, tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\n\n  \nA  cat\nthe dog\n" + "x" * 20 + "\n")
    summary = enqueue_json(
        env,
        output,
        "dry",
        ["file", str(path)],
        "--dedupe",
        "--max-chars",
        "10",
        "--shard-size",
        "1",
        "--dry-run",
    )
    assert summary == {
        "job": "dry", "dry_run": True, "prompts": 2, "shards": 2, "rows_read": 6, "skipped_empty": 2,
        "skipped_invalid": 0, "skipped_filtered": 1, "duplicates": 1, "not_selected": 0,
    }  # fmt: skip
    status = cli("producer", "status", "dry", "--output", output, env=env, check=False)
    assert status.returncode != 0 and "no job at" in status.stderr


def test_webdataset_and_parquet_jobs_default_to_4096_row_shards(env, output, tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("".join(f"prompt {i}\n" for i in range(4097)))
    shards = {
        layout: enqueue_json(
            env, output, f"l-{layout}", ["file", str(path)], "--layout", layout, "--dry-run"
        )["shards"]
        for layout in ("files", "webdataset", "parquet")
    }
    assert shards == {"files": 17, "webdataset": 2, "parquet": 2}  # 256-row shards for files


def test_diffusiondb_job_keeps_source_seeds_and_records_its_selection(env, output, tmp_path):
    path = write_diffusiondb(tmp_path / "metadata.parquet")
    summary = enqueue_json(env, output, "ddb", ["diffusiondb", "--path", str(path)], "--shard-size", "2")
    assert (summary["prompts"], summary["shards"], summary["skipped_empty"]) == (4, 2, 1)
    rows = manifests(summary["job_url"])
    assert [r["seed"] for r in rows] == [r[3] for r in DIFFUSIONDB_ROWS if r[1].strip()]
    assert [r["row_id"] for r in rows] == [0, 1, 2, 3]
    spec = json.loads(open_store(summary["job_url"]).get("job.json"))
    assert spec["source"]["name"] == "diffusiondb" and spec["source"]["seeds"] == "source"
    assert spec["source"]["selection"] == {"max_prompt_chars": 100_000}
    assert spec["generation"]["steps"] == 1  # the preset's, not DiffusionDB's 50
    assert spec["counts"]["rows_read"] == len(DIFFUSIONDB_ROWS)
    derived = enqueue_json(
        env, output, "ddb-derived", ["diffusiondb", "--path", str(path), "--seeds", "derived"]
    )
    assert [r["seed"] for r in manifests(derived["job_url"])] != [r["seed"] for r in rows]


def test_resume_sends_only_shards_neither_committed_nor_queued(env, output, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(journeydb_lines() * 4)  # 12 prompts
    source = ["file", str(path)]
    first = enqueue_json(env, output, "again", source, "--shard-size", "3", "--limit", "9")
    assert first["shards"] == first["enqueued"] == 3
    again = enqueue_json(env, output, "again", source, "--shard-size", "3", "--limit", "9")
    assert again["resumed"] and again["enqueued"] == 0 and again["already_queued"] == 3
    client = redis_client()
    client.delete(first["queue"])
    open_store(first["job_url"]).put(metadata_key(2), b"committed elsewhere")
    third = enqueue_json(env, output, "again", source, "--shard-size", "3", "--limit", "9")
    assert third["enqueued"] == 2 and third["already_done"] == 1
    assert queue_length(client, first["queue"]) == 2


def test_another_selection_under_the_same_name_is_refused(env, output, tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a\nb\nc\n")
    enqueue(env, output, "taken", ["file", str(path)], "--limit", "2")
    result = enqueue(env, output, "taken", ["file", str(path)], "--limit", "3", check=False)
    assert_one_line_error(result, "already exists", "differs in: source.selection.limit (2 there, 3 now)")
    result = enqueue(env, output, "taken", ["file", str(path)], "--limit", "2", "--dedupe", check=False)
    assert_one_line_error(result, "differs in: source.selection.dedupe")


def test_a_failing_enqueue_leaves_no_tasks_no_spec_and_no_manifests(env, output, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"".join(b'{"prompt": "p%d"}\n' % i for i in range(50)) + b'{"prompt": oops}\n')
    result = enqueue(env, output, "broken", ["file", str(path)], "--shard-size", "10", check=False)
    assert_one_line_error(result, "p.jsonl: line 51 is not valid JSON")
    store = open_store(f"{output}/broken")
    assert list(store.list()) == []
    assert queue_length(redis_client(), f"{env['FEWSTEP_QUEUE_PREFIX']}.tiny") == 0


def test_unusable_rows_are_skipped_and_reported_json_stays_clean(env, output, tmp_path):
    path = tmp_path / "p.csv"
    long, too_long = "y" * 100_000, "z" * 100_001
    path.write_text(
        f'prompt,tag\nfine,../../x\n"{too_long}",a\n"{long}",b\n"nul\x00here",c\n"two\nlines",d\nbad,row,cells\n'
    )
    result = enqueue(env, output, "odd", ["file", str(path)], "--json")
    summary = json.loads(result.stdout)
    assert (summary["prompts"], summary["skipped_invalid"]) == (4, 2)
    assert "source row 1: prompt has over 100,000 characters" in result.stderr
    assert "3 fields, expected 2" in result.stderr
    rows = manifests(summary["job_url"])
    assert [r["prompt"] for r in rows] == ["fine", long, "nul\x00here", "two\nlines"]  # byte-exact
    assert rows[0]["tag"] == "../../x"  # carried as data; keys come from ids only
    assert {k for k, _ in open_store(summary["job_url"]).list()} == {
        "job.json", "manifests/part-000001.parquet",
    }  # fmt: skip


def test_dedupe_writes_which_row_was_kept(env, output, tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("A cat\nDog\na  CAT\ndog\nbird\n")
    summary = enqueue_json(env, output, "dedupe", ["file", str(path)], "--dedupe")
    assert summary["prompts"] == 3 and summary["duplicates"] == 2
    log = pq.read_table(io.BytesIO(open_store(summary["job_url"]).get("duplicates.parquet"))).to_pylist()
    assert log == [{"source_row": 2, "duplicate_of": 0}, {"source_row": 3, "duplicate_of": 1}]


def test_partiprompts_category_with_trailing_spaces(env, output, tmp_path):
    path = tmp_path / "parti.tsv"
    path.write_text(
        "Prompt\tCategory\tChallenge\tNote\n"
        "a\tAnimals \tBasic\t\nb\tArts\tBasic\t\nc\t Animals\tComplex \t\nd\tAnimals\tSimple Detail\t\n"
    )
    source = ["partiprompts", "--path", str(path)]
    summary = enqueue_json(env, output, "parti-a", source, "--category", "animals", "--challenge", "Basic ",
                           "--challenge", "complex", "--dry-run")  # fmt: skip
    assert (summary["prompts"], summary["skipped_filtered"]) == (2, 2)
    result = enqueue(env, output, "parti-b", source, "--category", "Animls", "--dry-run", check=False)
    assert_one_line_error(result, "--category 'animls' matches no row (the source has: animals, arts)")


def test_s3_paths_use_the_storage_credentials(env, output, tmp_path):
    store = open_store(f"s3://{BUCKET}/sources")
    store.put("metadata.parquet", write_diffusiondb(tmp_path / "m.parquet").read_bytes())
    store.put("anno/train.jsonl.tgz", write_journeydb(tmp_path / "j.tgz").read_bytes())
    ddb = enqueue_json(
        env, output, "s3-ddb", ["diffusiondb", "--path", f"s3://{BUCKET}/sources/metadata.parquet"]
    )
    assert ddb["prompts"] == 4
    jdb = enqueue_json(
        env, output, "s3-jdb", ["journeydb", "--path", f"s3://{BUCKET}/sources/anno/train.jsonl.tgz"]
    )
    assert jdb["prompts"] == 3
    parts = write_diffusiondb_parts(tmp_path / "parts", nested=True)
    for path in sorted(parts.rglob("*.json")):
        store.put(f"parts/{path.relative_to(parts)}", path.read_bytes())
    folder = enqueue_json(env, output, "s3-parts", ["diffusiondb", "--path", f"s3://{BUCKET}/sources/parts/"])
    assert (folder["prompts"], folder["skipped_empty"]) == (3, 1)
    missing = enqueue(env, output, "s3-x", ["file", f"s3://{BUCKET}/sources/nope.txt"], check=False)
    assert_one_line_error(missing, f"not found: s3://{BUCKET}/sources/nope.txt")
    wrong = enqueue({**env, "AWS_SECRET_ACCESS_KEY": "wrong"}, output, "s3-y",
                    ["file", f"s3://{BUCKET}/sources/metadata.parquet"], check=False)  # fmt: skip
    assert wrong.returncode != 0 and "wrong" not in wrong.stderr and "Traceback" not in wrong.stderr


class _Files(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}  # noqa: RUF012 - set per server
    ranges = True

    def do_HEAD(self):
        self._respond(head=True)

    def do_GET(self):
        self._respond(head=False)

    def _respond(self, head: bool) -> None:
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        wanted = self.headers.get("Range") if self.ranges else None
        if wanted:
            start, end = (int(x) for x in wanted.removeprefix("bytes=").split("-"))
            body = data[start : end + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        if self.ranges:
            self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, *args) -> None:
        """Keep the test output quiet."""


@pytest.mark.parametrize("ranges", [True, False])
def test_http_paths_with_and_without_range_requests(env, output, tmp_path, ranges):
    handler = type("Files", (_Files,), {"ranges": ranges, "files": {
        "/metadata.parquet": write_diffusiondb(tmp_path / "m.parquet").read_bytes(),
        "/anno.jsonl": journeydb_lines(),
    }})  # fmt: skip
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        ddb = enqueue_json(
            env, output, f"http-ddb-{ranges}", ["diffusiondb", "--path", f"{base}/metadata.parquet"]
        )
        assert ddb["prompts"] == 4
        jdb = enqueue_json(env, output, f"http-jdb-{ranges}", ["journeydb", "--path", f"{base}/anno.jsonl"])
        assert jdb["prompts"] == 3
        missing = enqueue(env, output, "http-x", ["file", f"{base}/nope.txt"], check=False)
        assert_one_line_error(missing, "not found", "HTTP 404")
    finally:
        server.shutdown()


def test_hub_location_offline_names_path(env, output):
    result = enqueue(env, output, "hub", ["diffusiondb", "--subset", "large"], check=False)
    assert_one_line_error(
        result, "hf://datasets/poloclub/diffusiondb@main/metadata-large.parquet", "HF_HUB_OFFLINE", "--path"
    )
    result = enqueue(env, output, "hub", ["file", "hf://datasets/someone/prompts/p.jsonl"], check=False)
    assert_one_line_error(result, "cannot reach the Hugging Face Hub", "--path")


def test_progress_shows_on_a_terminal_and_json_stays_clean(env, output, tmp_path):
    path = write_diffusiondb(tmp_path / "metadata.parquet")
    leader, follower = pty.openpty()
    command = [
        sys.executable, "-m", "producer", "enqueue", "diffusiondb", "--path", str(path), "--model", "tiny",
        "--job", "tty", "--output", output, "--json",
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, env={**env, "TERM": "xterm", "COLUMNS": "120"}, stdout=subprocess.PIPE, stderr=follower
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    stdout, _ = proc.communicate(timeout=120)
    os.close(leader)
    assert proc.returncode == 0
    assert json.loads(stdout)["prompts"] == 4
    terminal = b"".join(chunks).decode(errors="replace")
    assert "reading rows" in terminal and "sending tasks" in terminal
    quiet = enqueue(env, output, "no-tty", ["diffusiondb", "--path", str(path)], "--json")
    assert quiet.stderr == ""
