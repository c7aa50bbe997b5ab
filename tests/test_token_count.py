"""Token counts (``prompt_tokens``, ``truncated``) are right whatever the other threads do.

The worker counts a shard's tokens on the read-ahead thread and the task thread while the
device thread runs the pipeline, whose own calls set padding and truncation on its
tokenizer. This test uses real pipelines and tokenizers (the ``tiny`` model's CLIP, the
PixArt replica's T5) and checks every count against a fresh tokenizer loaded here from the
model's files. Fault test (m), through a real worker, is ``tests/test_faults_tokens.py``.
"""

from __future__ import annotations

import itertools
import random
import sys
import threading
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

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
