"""Token counts (``prompt_tokens``, ``truncated``) are right whatever the other threads do.

The worker counts a shard's tokens on the read-ahead thread and the task thread while the
device thread runs the pipeline, whose own calls set padding and truncation on its
tokenizer. These tests use the real ``tiny`` model and its real CLIP tokenizer, and check
every count against a fresh tokenizer loaded here from the model's files.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
import threading
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from fewstep.contract import stats_key
from fewstep.storage import open_store
from tests.support import cli_json, committed_metadata, run_worker_until_done
from worker import tiny
from worker.model import load_model

# With one tokenizer shared, this failed 8 runs in 8 with CLIP and 3 in 8 with T5 (2 busy cores).
STRESS_SECONDS = 3.0
WORDS = ["a", "photo", "of", "the", "red", "cat", "sitting", "on", "blue", "chair", "moonlight", "astronaut"]


def prompts_from_1_to_300_tokens(count: int, seed: int = 0) -> list[str]:
    """``count`` prompts of 1 to 300 tokens of text, evenly spread (plus begin and end).

    The tiny tokenizer is byte-level with no merges: one token per character of a word,
    spaces dropped, so a prompt of n non-space ASCII characters has n tokens of text."""
    rng = random.Random(seed)
    prompts = []
    for i in range(count):
        wanted = 1 + (i * 299) // max(count - 1, 1)
        words, length = [], 0
        while length < wanted:
            word = rng.choice(WORDS)[: wanted - length]
            words.append(word)
            length += len(word)
        prompts.append(" ".join(words))
    return prompts


def tiny_directory() -> Path:
    """The tiny model's folder (built on first use into ``FEWSTEP_MODEL_CACHE``)."""
    from fewstep.presets import resolve_model

    return tiny.ensure(resolve_model("tiny")["revision"])


def pixart_directory(root: Path) -> Path:
    """The PixArt-α replica (a T5 tokenizer from a SentencePiece model, as the hub has it)."""
    from tests.replicas import pixart

    pixart.pixart_512(root, [])
    return root


@pytest.fixture(scope="module", params=["clip-tiny", "t5-pixart"])
def family(request, model_cache, tmp_path_factory):
    """(the loaded model, its folder) for each tokenizer the presets' pipelines count with:
    CLIP (Stable Diffusion 1/2, SDXL, LCM, Flux, SD3) and T5 (PixArt)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEWSTEP_MODEL_CACHE", str(model_cache))
        if request.param == "clip-tiny":
            yield load_model("tiny", "cpu"), tiny_directory()
        else:
            directory = pixart_directory(tmp_path_factory.mktemp("pixart"))
            yield load_model(str(directory), "cpu"), directory


def fresh_tokenizer(directory: Path):
    """An independent tokenizer, loaded from a model folder's files for the caller only."""
    return AutoTokenizer.from_pretrained(directory / "tokenizer")


def fresh_counts(directory: Path, prompts: list[str]) -> list[int]:
    """Independent counts (begin and end tokens included, as the worker records them)."""
    return [len(ids) for ids in fresh_tokenizer(directory)(prompts, truncation=False)["input_ids"]]


def test_token_counts_from_several_threads_match_a_fresh_tokenizer_while_the_pipeline_encodes(family):
    model, directory = family
    prompts = prompts_from_1_to_300_tokens(60)
    expected = fresh_counts(directory, prompts)
    limit = fresh_tokenizer(directory).model_max_length
    assert min(expected) < 10 and max(expected) > limit  # short prompts and cut ones
    stop = threading.Event()
    errors: list[BaseException] = []
    wrong: list[tuple[int, int]] = []
    encodes = [0]

    def pipeline_encodes() -> None:
        # What the device thread does for every batch: the pipeline's own tokenizer calls
        # (padded, truncated to 77, then untruncated to warn) and the text encoder. It goes
        # on after a failed call, so that a failure cannot end the stress early.
        for prompt in itertools.cycle(prompts[::7]):
            if stop.is_set():
                return
            try:
                model.pipeline.encode_prompt(
                    prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
                )
            except Exception as e:
                errors.append(e)
            encodes[0] += 1

    def count(offset: int, until: float) -> None:
        try:
            for r in itertools.count():
                if time.monotonic() > until:
                    return
                start = (offset + r) % len(prompts)
                batch = prompts[start : start + 5]
                tokens, counted_limit = model.count_tokens(batch)
                assert counted_limit == limit
                wrong.extend((t, e) for t, e in zip(tokens, expected[start:], strict=False) if t != e)
        except BaseException as e:
            errors.append(e)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads as often as possible: the race shows reliably
    try:
        device = threading.Thread(target=pipeline_encodes)
        device.start()
        until = time.monotonic() + STRESS_SECONDS
        counters = [threading.Thread(target=count, args=(11 * i, until)) for i in range(3)]
        for t in counters:
            t.start()
        for t in counters:
            t.join(STRESS_SECONDS + 60)
        stop.set()
        device.join(60)
    finally:
        stop.set()
        sys.setswitchinterval(switch)
    assert not any(t.is_alive() for t in counters)
    assert wrong == [], f"{len(wrong)} wrong counts (counted, right), e.g. {wrong[:5]}"
    assert errors == [], f"{len(errors)} calls raised, e.g. {errors[:3]}"
    assert encodes[0] > 0  # the pipeline really ran alongside


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
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert "Traceback" not in log and "failed" not in log.lower(), log[-3000:]
