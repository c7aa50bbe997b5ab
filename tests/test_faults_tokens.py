"""Fault test (m): a real worker reading ahead records every row's token count right.

Real redis-server and SeaweedFS, a real worker process with the ``tiny`` model, forced
thread switching, many two-prompt shards at batch size 1, prompts of 1 to 300 tokens:
every committed row's ``prompt_tokens`` and ``truncated`` are checked against a fresh
tokenizer loaded here. (The race itself is rare per shard; ``tests/test_token_count.py``
provokes it reliably. This test checks the worker's own wiring end to end.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fewstep.contract import stats_key
from fewstep.storage import open_store
from tests.support import cli_json, committed_metadata, run_worker_until_done, verify_job
from tests.test_token_count import fresh_counts, prompts_from_1_to_300_tokens, tiny_directory


def write_prompt_file(path: Path, prompts: list[str]) -> Path:
    """A PartiPrompts-style TSV of ``prompts``."""
    lines = ["Prompt\tCategory\tChallenge\tNote"] + [f"{p}\tTokens\tLength\t" for p in prompts]
    path.write_text("\n".join(lines) + "\n")
    return path


def forced_thread_switching(env: dict[str, str], directory: Path) -> dict[str, str]:
    """``env`` for a process that switches threads every 10 µs from its start: a
    ``sitecustomize`` module (which Python imports at start-up) first on its path."""
    directory.mkdir()
    (directory / "sitecustomize.py").write_text("import sys\n\nsys.setswitchinterval(1e-5)\n")
    path = os.pathsep.join(p for p in (str(directory), env.get("PYTHONPATH", "")) if p)
    return {**env, "PYTHONPATH": path}


def test_m_worker_reading_ahead_records_every_rows_token_count_and_truncation_right(env, output, tmp_path):
    prompts = prompts_from_1_to_300_tokens(40, seed=1)
    job = cli_json(
        "producer", "enqueue", "partiprompts", "--path", str(write_prompt_file(tmp_path / "p.tsv", prompts)),
        "--model", "tiny", "--job", "tokens", "--output", output, "--shard-size", "2",
        "--width", "64", "--height", "64", env=env,
    )  # fmt: skip
    assert job["prompts"] == len(prompts) and job["shards"] == 20
    run_worker_until_done(
        forced_thread_switching(env, tmp_path / "switching"), output, "tokens",
        args=("--batch-size", "1"), log_path=tmp_path / "worker.log", timeout=240,
    )  # fmt: skip

    table = committed_metadata(job["job_url"])
    assert table.column("prompt").to_pylist() == prompts
    expected = fresh_counts(tiny_directory(), prompts)
    assert min(expected) == 1 + 2 and max(expected) == 300 + 2  # begin and end tokens counted
    recorded = table.column("prompt_tokens").to_pylist()
    wrong = [(r, e) for r, e in zip(recorded, expected, strict=True) if r != e]
    assert wrong == [], f"{len(wrong)} rows with wrong prompt_tokens (recorded, right): {wrong[:5]}"
    assert table.column("truncated").to_pylist() == [e > 77 for e in expected]
    # The read-ahead really ran: shards opened (and counted) on the read-ahead thread while
    # the device thread generated the shard before, then batches generated ahead from them.
    store = open_store(job["job_url"])
    ahead = [json.loads(store.get(stats_key(s)))["batches_ahead"] for s in range(1, job["shards"] + 1)]
    assert sum(1 for n in ahead if n > 0) >= job["shards"] // 2, ahead
    # No attempt failed on the way ("Unable to create tensor", over-long inputs): each shard
    # committed by its first attempt.
    assert set(table.column("attempt").to_pylist()) == {1}
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
    verify_job("tokens", output, env)
