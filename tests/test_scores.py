"""Scores and embeddings computed on the worker (``--score``, ``--embeddings``).

Real redis-server, SeaweedFS and a real worker process (the ``tiny`` model on the CPU);
the scorer models are tiny random-weight replicas written into a hub cache at the commits
``config/scorers.toml`` pins (``tests/replicas/scorers.py``), so the presets' own loading
code runs. Their vision towers tell images apart (unrelated images' embeddings have cosines
around 0.4, checked below): with a default-initialised one every image gets nearly the same
embedding, and a worker that scored row i's prompt on row j's image would pass.

Every score is checked against an independent computation here, on the PNG decoded from
storage: clip_score and the embeddings through ``transformers``' ``CLIPProcessor``/
``CLIPModel``; aesthetic by LAION's improved-aesthetic-predictor MLP (its ``nn.Sequential``
built here, the file's weights loaded strictly) on the normalised CLIP image embedding;
nsfw_score from diffusers' own ``StableDiffusionSafetyChecker.forward`` (with its
``CLIPImageProcessor``): the score is the scale of the concepts' threshold margins at which
the checker starts to flag the image, found by bisection over ``forward``'s verdicts.

Tolerances: the worker preprocesses in torch on the tensor, the processor in PIL; they give
the same pixel values or values one level apart on a few pixels (checked below), and the
towers run batched here and there, so scores agree to float32 rounding plus that level.
Before the resize matched Pillow's two rounded passes, noise images moved clip_score by up
to 0.06 (of 100); the bounds keep a margin over that: 0.25 for clip_score (100 × a cosine),
2e-3 for cosines, embeddings (float16 storage alone rounds by up to 5e-4) and nsfw_score
(``forward`` rounds each margin to 3 decimals before comparing it with 0, which moves the
scale at which it flags by up to 0.0005 / (threshold − adjustment), 1.3e-3 here), and 0.05
for the aesthetic head, which multiplies embedding differences by its gain (about 20 here).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fewstep import UserError
from fewstep.contract import ShardStats, embeddings_key, metadata_key, stats_key
from fewstep.scorers import scorer_presets, scoring_spec
from fewstep.settings import defaults
from fewstep.storage import Store, open_store, read_table
from producer.dedupe import dedupe, read_near_duplicates
from producer.embeddings import read_embeddings
from producer.enqueue import JobOptions
from producer.enqueue import enqueue as enqueue_job
from producer.finalize import finalize
from producer.gc import collect
from producer.images import tar_members
from producer.report import make_report
from producer.sources.diffusiondb import DiffusionDB
from producer.sources.partiprompts import PartiPrompts
from producer.verify import verify
from tests.prompt_files import write_diffusiondb
from tests.replicas import scorers as replicas
from tests.replicas.hub import HubCache, offline
from tests.support import (
    cli,
    cli_json,
    committed_metadata,
    layout_or_files,
    run_worker_until_done,
    verify_job,
)
from tests.test_cli_errors import assert_one_line_error
from tests.test_faults_tokens import forced_thread_switching, write_prompt_file
from tests.test_preference_scores import PICKSCORE_TOLERANCE, card_pickscore
from tests.test_token_count import fresh_counts, prompts_from_1_to_300_tokens, tiny_directory

CLIP_TOLERANCE = 0.25
COSINE_TOLERANCE = 2e-3
AESTHETIC_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def scorer_hub(tmp_path_factory) -> HubCache:
    """The scorer replicas in a hub cache (workers get ``HF_HUB_CACHE`` pointing at it)."""
    return replicas.build(tmp_path_factory.mktemp("scorer-hub"))


def snapshot(hub: HubCache, name: str) -> Path:
    preset = scorer_presets()[name]
    return hub.snapshot(preset["repo"], preset["revision"])


def _features(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


@torch.no_grad()
def independent_clip(hub: HubCache, pictures: list[Image.Image], prompts: list[str]) -> dict[str, np.ndarray]:
    """clip_score of each picture with its prompt and the normalised image embeddings, by
    transformers' CLIPProcessor and CLIPModel on the replica's files."""
    from transformers import CLIPModel, CLIPProcessor

    clip_dir = snapshot(hub, "clip")
    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    inputs = processor(text=prompts, images=pictures, padding=True, truncation=True, return_tensors="pt")
    image = _unit(_features(model.get_image_features(pixel_values=inputs["pixel_values"])))
    text = _unit(_features(model.get_text_features(input_ids=inputs["input_ids"],
                                                   attention_mask=inputs["attention_mask"])))  # fmt: skip
    return {"clip_score": (100 * (image * text).sum(-1).clamp(min=0)).numpy(), "embedding": image.numpy()}


def laion_aesthetic_mlp(path: Path) -> torch.nn.Module:
    """LAION's improved aesthetic predictor (``MLP.layers`` of its simple_inference.py:
    Linear, Dropout(0.2), Linear, Dropout(0.2), Linear, Dropout(0.1), Linear, Linear), widths
    read from the file, its weights loaded strictly, in eval mode."""
    state = load_file(path)
    w = [state["layers.0.weight"].shape[1]] + [state[f"layers.{i}.weight"].shape[0] for i in (0, 2, 4, 6, 7)]
    nn = torch.nn
    mlp = nn.Module()
    mlp.layers = nn.Sequential(
        nn.Linear(w[0], w[1]), nn.Dropout(0.2), nn.Linear(w[1], w[2]), nn.Dropout(0.2),
        nn.Linear(w[2], w[3]), nn.Dropout(0.1), nn.Linear(w[3], w[4]), nn.Linear(w[4], w[5]),
    )  # fmt: skip
    mlp.load_state_dict(state, strict=True)
    return mlp.eval()


@torch.no_grad()
def checker_flag_scale(checker, pixels: torch.Tensor, steps: int = 24) -> np.ndarray:
    """Per image, the largest λ in [0, 1] at which diffusers' StableDiffusionSafetyChecker.forward
    flags it once each concept's threshold margin (t_i − a) is scaled by λ, a being the 0.01
    forward subtracts where a special-care concept matched: what nsfw_score is (1: flagged as
    is, 0: at no scale). Found by bisection over forward's verdicts, image by image."""
    probe = copy.deepcopy(checker)

    def flags(x: torch.Tensor, concepts: torch.Tensor, thresholds: torch.Tensor) -> list[bool]:
        probe.concept_embeds = torch.nn.Parameter(concepts)
        probe.concept_embeds_weights = torch.nn.Parameter(thresholds)
        return probe(x, np.zeros((len(x), 1, 1, 3)))[1]

    # forward warns at every image it flags; only its verdicts are wanted here.
    quiet = logging.getLogger("diffusers.pipelines.stable_diffusion.safety_checker")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        # With the special-care concepts as its concepts, forward flags exactly where one matched.
        special = flags(pixels, checker.special_care_embeds, checker.special_care_embeds_weights)
        concepts, thresholds = checker.concept_embeds, checker.concept_embeds_weights
        scales = []
        for x, a in zip(pixels[:, None], [0.01 * s for s in special], strict=True):
            if flags(x, concepts, thresholds)[0]:
                scales.append(1.0)
                continue
            lo, hi = 0.0, 1.0
            for _ in range(steps):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if flags(x, concepts, mid * (thresholds - a) + a)[0] else (lo, mid)
            scales.append(lo)
        return np.array(scales)
    finally:
        quiet.setLevel(level)


def independent_scores(hub: HubCache, images: list[np.ndarray], prompts: list[str]) -> dict[str, np.ndarray]:
    """clip_score, aesthetic, nsfw_score and the normalised image embedding of each image,
    computed from the replicas' files with transformers', LAION's and diffusers' own code."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    pictures = [Image.fromarray(a) for a in images]
    out = independent_clip(hub, pictures, prompts)
    head = laion_aesthetic_mlp(snapshot(hub, "aesthetic") / "model.safetensors")
    with torch.no_grad():
        out["aesthetic"] = head.layers(torch.from_numpy(out["embedding"]))[:, 0].numpy()
    nsfw_dir = snapshot(hub, "nsfw")
    checker = StableDiffusionSafetyChecker.from_pretrained(nsfw_dir).eval()
    pixels = CLIPImageProcessor.from_pretrained(nsfw_dir)(pictures, return_tensors="pt").pixel_values
    out["nsfw_score"] = checker_flag_scale(checker, pixels)
    out["pickscore"] = card_pickscore(hub, pictures, prompts)  # PickScore's model card
    return out


def stored_images(store: Store, table) -> list[np.ndarray]:
    """Each row's image, read back from storage as the metadata locates it, decoded."""
    images = []
    for row in table.to_pylist():
        if row["image_offset"] is None:
            data = store.get(row["image_key"])
        else:  # webdataset: a ranged read of the image member
            data = store.get_range(row["image_key"], row["image_offset"], row["bytes"])
        images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    return images


def enqueue(env, output, job: str, path: Path, *extra: str) -> dict:
    return cli_json(
        "producer", "enqueue", "partiprompts", "--path", str(path), "--model", "tiny", "--job", job,
        "--output", output, "--width", "64", "--height", "64", *layout_or_files(extra), env=env,
    )  # fmt: skip


def enqueue_here(output: str, job: str, path: Path, **options) -> dict:
    options = {"layout": "files", **options}
    opts = JobOptions(job=job, output=output, model="tiny", width=64, height=64, shard_size=4, **options)
    return enqueue_job(PartiPrompts(str(path)), opts, progress=False)


def check_scores(table, expected: dict[str, np.ndarray], columns: tuple[str, ...]) -> None:
    tolerance = {
        "clip_score": CLIP_TOLERANCE,
        "aesthetic": AESTHETIC_TOLERANCE,
        "nsfw_score": COSINE_TOLERANCE,
        "pickscore": PICKSCORE_TOLERANCE,
    }
    for column in tolerance:
        values = table.column(column).to_pylist()
        if column not in columns:
            assert values == [None] * len(values), column
            continue
        assert None not in values, column
        np.testing.assert_allclose(values, expected[column], rtol=0, atol=tolerance[column], err_msg=column)


#: The "dup" job's DiffusionDB rows (prompt, seed): row 4 repeats row 1's prompt and seed.
DUP_ROWS = [("a red cube on a table", 11), ("a lighthouse at night", 22), ("green fields, oil painting", 33),
            ("a bowl of ramen", 44), ("a lighthouse at night", 22),
            ("a paper boat on a lake", 77)]  # fmt: skip
REPEATED = (4, 1)


@pytest.fixture(scope="module")
def jobs(local_services, model_cache, scorer_hub, tmp_path_factory) -> dict:
    """Four jobs run by one real worker, once for the module: "scored" (files layout, every
    scorer, embeddings; prompts of 1 to 300 tokens), "tar" (webdataset, clip and embeddings),
    "plain" (no --score) and "dup" (clip and embeddings; a DiffusionDB file whose row 4 repeats
    row 1's prompt and seed, in another shard)."""
    tmp = tmp_path_factory.mktemp("scores")
    output = f"s3://fewstep-test/runs/{uuid.uuid4().hex[:8]}"
    values = {
        **local_services.env(),
        "HF_HUB_OFFLINE": "1",
        "FEWSTEP_MODEL_CACHE": str(model_cache),
        "FEWSTEP_QUEUE_PREFIX": "t" + uuid.uuid4().hex[:10],
        "PYTHONUNBUFFERED": "1",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in values.items():
            mp.setenv(key, value)
        env = dict(os.environ)
        prompts = prompts_from_1_to_300_tokens(8, seed=3)  # cut at 77 tokens by CLIP, and short ones
        path = write_prompt_file(tmp / "p.tsv", prompts)
        # enqueue checks that the scorer weights are in the cache (the same one as the worker's here).
        scored = enqueue({**env, "HF_HUB_CACHE": str(scorer_hub.root)}, output, "scored", path,
                         "--shard-size", "4", "--score", "clip,aesthetic", "--score", "nsfw,pickscore",
                         "--embeddings")  # fmt: skip
        # The others in this process (a CLI start costs seconds).
        with offline(scorer_hub.root):
            tar = enqueue_here(output, "tar", write_prompt_file(tmp / "t.tsv", prompts[:4]),
                               layout="webdataset", score=("clip",), embeddings=True)  # fmt: skip
            rows = [(f"{i:08d}-0000-0000-0000-000000000000.png", p, 1, seed, 50, 7.0, 8, 512, 512, None, None,
                     0.0, 0.0) for i, (p, seed) in enumerate(DUP_ROWS)]  # fmt: skip
            source = DiffusionDB(str(write_diffusiondb(tmp / "metadata.parquet", rows)))
            options = JobOptions(job="dup", output=output, model="tiny", width=64, height=64, shard_size=3,
                                 score=("clip",), embeddings=True)  # fmt: skip
            dup = enqueue_job(source, options, progress=False)
        plain = enqueue_here(output, "plain", write_prompt_file(tmp / "q.tsv", prompts[:2]))
        # One worker for the jobs, switching threads every 10 µs, reading ahead: the device
        # thread scores (tokenizing with the scorer's tokenizer) while other threads count tokens.
        worker_env = {**forced_thread_switching(env, tmp / "switching"), "HF_HUB_CACHE": str(scorer_hub.root)}
        run_worker_until_done(worker_env, output, "scored", "tar", "plain", "dup", args=("--batch-size", "2"),
                              log_path=tmp / "worker.log", timeout=240)  # fmt: skip
        log = (tmp / "worker.log").read_text(errors="replace")
        assert "Traceback" not in log, log[-3000:]
        yield {"env": env, "output": output, "prompts": prompts, "scored": scored, "tar": tar, "plain": plain,
               "dup": dup}  # fmt: skip


def test_worker_scores_like_an_independent_clip_commits_embeddings_and_producer_tools_read_them(
    jobs, scorer_hub
):
    env, output, prompts = jobs["env"], jobs["output"], jobs["prompts"]
    scored, tar, plain = jobs["scored"], jobs["tar"], jobs["plain"]
    # Files layout, every scorer: each column against the independent computation.
    store = open_store(scored["job_url"])
    table = committed_metadata(scored["job_url"])
    assert table.column("prompt").to_pylist() == prompts
    expected = independent_scores(scorer_hub, stored_images(store, table), prompts)
    check_scores(table, expected, ("clip_score", "aesthetic", "nsfw_score", "pickscore"))
    assert min(table.column("nsfw_score").to_pylist()) > 0 and max(table.column("clip_score").to_pylist()) > 0
    # diffusers' checker flags one of these images as it is: the score it was compared with is 1.
    assert (expected["nsfw_score"] == 1).sum() == 1, expected["nsfw_score"]
    # The counting threads were not disturbed by the scorer's tokenizer, nor it by them.
    assert table.column("prompt_tokens").to_pylist() == fresh_counts(tiny_directory(), prompts)
    assert set(table.column("attempt").to_pylist()) == {1}
    # Embeddings: every committed row once, unit length, the same vectors CLIP gives.
    row_ids, matrix = read_embeddings(store)
    assert row_ids.tolist() == table.column("row_id").to_pylist()
    assert matrix.dtype == np.float16 and matrix.shape == (8, replicas.HIDDEN)
    np.testing.assert_allclose(np.linalg.norm(matrix.astype(np.float32), axis=1), 1, atol=1e-2)
    np.testing.assert_allclose(
        matrix.astype(np.float32), expected["embedding"], rtol=0, atol=COSINE_TOLERANCE
    )
    spec = json.loads(store.get("job.json"))
    clip, recorded = scorer_presets()["clip"], spec["scoring"]["scorers"]["clip"]
    assert (recorded["model"], recorded["revision"]) == (clip["repo"], clip["revision"])
    assert spec["scoring"]["embeddings"] is True and set(spec["scoring"]["scorers"]) == {
        "clip",
        "aesthetic",
        "nsfw",
        "pickscore",
    }
    # PickScore's processor is the one its card names, recorded with the scorer.
    pick = scorer_presets()["pickscore"]["processor"]
    assert spec["scoring"]["scorers"]["pickscore"]["processor"] == {
        "model": pick["repo"],
        "revision": pick["revision"],
    }

    # Webdataset layout, clip only: read back from the tars; the .json members carry the scores.
    tar_store = open_store(tar["job_url"])
    tar_table = committed_metadata(tar["job_url"])
    tar_expected = independent_scores(scorer_hub, stored_images(tar_store, tar_table), prompts[:4])
    check_scores(tar_table, tar_expected, ("clip_score",))
    first = tar_table.slice(0, 1).to_pylist()[0]
    member = tar_members(tar_store.get(first["image_key"]))[f"{first['row_id']:012d}.json"][1]
    assert json.loads(member)["clip_score"] == first["clip_score"]
    assert len(read_embeddings(tar_store)[0]) == 4
    verify_job("tar", output, env)
    # What the worker wrote is what the producer's tools use: finalize --where filters on the
    # real scores, report plots them (dedupe: its own test below).
    scores = sorted(tar_table.column("clip_score").to_pylist())
    kept = finalize(tar_store, where=(f"clip_score >= {scores[2]}",))
    assert kept["rows"] == len([x for x in scores if x >= scores[2]]) and kept["filters"][0]["removed"] == 2
    card, clip = tar_store.get("README.md").decode(), scorer_presets()["clip"]
    assert f"scores computed on the worker: `clip` ({clip['repo']}@{clip['revision']})" in card
    assert f"- scorer `clip` (`{clip['repo']}`): {clip['licence']}" in card
    made = make_report([tar_store])
    assert made["scores"] == ["clip_score"] and made["thumbnails"] > 0, made
    assert tar_store.exists("report/index.html")

    # Without --score: null columns, no embeddings, no scoring in job.json, no scoring time.
    plain_store = open_store(plain["job_url"])
    check_scores(committed_metadata(plain["job_url"]), {}, ())
    assert list(plain_store.list("embeddings/")) == []
    assert "scoring" not in json.loads(plain_store.get("job.json"))
    with pytest.raises(UserError, match="no image embeddings"):
        read_embeddings(plain_store)
    stats = [ShardStats.from_json(json.loads(s.get(stats_key(n)))) for s, shards in
             ((store, 2), (tar_store, 1), (plain_store, 1)) for n in range(1, shards + 1)]  # fmt: skip
    assert all(st.score_s > 0 for st in stats[:3]) and stats[3].score_s == 0
    # Reading ahead happened, so batches generated ahead carried their scores (all checked above).
    assert sum(st.batches_ahead for st in stats) > 0, [st.batches_ahead for st in stats]

    # gc removes a losing attempt's embeddings object and keeps the committed one.
    committed = read_table(store, metadata_key(1), ["attempt_id"]).column("attempt_id")[0].as_py()
    loser = embeddings_key(1, "20000101T000000.000000Z-0badcafe")
    store.put(loser, store.get(embeddings_key(1, committed)))
    swept = collect(store, min_age=3600, delete=True)
    assert [(f["shard"], f["attempt"], f["objects"]) for f in swept["folders"]] == [
        (1, "20000101T000000.000000Z-0badcafe", 1)
    ]
    assert not store.exists(loser) and store.exists(embeddings_key(1, committed))
    assert verify(store)["ok"]
    # verify fails a committed shard whose embeddings object is missing.
    second = read_table(store, metadata_key(2), ["attempt_id"]).column("attempt_id")[0].as_py()
    store.delete(embeddings_key(2, second))
    result = cli("producer", "verify", "scored", "--output", output, "--json", env=env, check=False)
    summary = json.loads(result.stdout)
    assert result.returncode == 1 and not summary["ok"]
    assert summary["problems"] == [f"{embeddings_key(2, second)}: missing (the job has --embeddings)"]


def test_each_score_depends_on_its_own_image_so_a_score_of_another_rows_image_fails_the_comparison(
    jobs, scorer_hub
):
    """What makes the comparisons above mean "the worker scored row i's image": the replicas tell
    the job's images apart by far more than the tolerances, so a worker that paired any two rows'
    images the wrong way round would miss the independent values on one row at least."""
    table = committed_metadata(jobs["scored"]["job_url"])
    images, prompts = stored_images(open_store(jobs["scored"]["job_url"]), table), jobs["prompts"]
    expected = independent_scores(scorer_hub, images, prompts)
    n, pairs = len(images), np.triu_indices(len(images), 1)
    # Unrelated images, unrelated embeddings (a default-initialised tiny CLIP: 0.999 and more).
    cosines = (expected["embedding"] @ expected["embedding"].T)[pairs]
    assert cosines.mean() < 0.6 and cosines.max() < 0.95, cosines.round(3)
    # crossed[i, j]: row i's prompt with row j's image. Swapping rows i and j moves row i's or
    # row j's clip_score off its own value by more than the tolerance.
    pictures = [Image.fromarray(a) for a in images]
    crossed = np.stack([independent_clip(scorer_hub, pictures, [p] * n)["clip_score"] for p in prompts])
    np.testing.assert_allclose(np.diag(crossed), expected["clip_score"], rtol=0, atol=1e-3)
    own = np.diag(crossed)
    off = np.abs(crossed - own[:, None])  # off[i, j]: row i's score moved by showing it row j's image
    moved = np.maximum(off, off.T)[pairs]
    assert moved.min() > 2 * CLIP_TOLERANCE, crossed.round(2)
    # The image-only scores differ between any two rows by more than their tolerance.
    for column, tolerance in (("aesthetic", AESTHETIC_TOLERANCE), ("nsfw_score", COSINE_TOLERANCE)):
        values = expected[column]
        apart = np.abs(values[:, None] - values[None, :])[pairs]
        assert apart.min() > tolerance, (column, values.round(4))


def test_dedupe_at_the_default_threshold_finds_a_repeated_prompt_and_seed_in_worker_embeddings_only(jobs):
    """`producer dedupe` at its documented default threshold on the embeddings the worker wrote:
    the row that repeats another's prompt and seed (the same image, from another shard) is found,
    none of the distinct images is."""
    store = open_store(jobs["dup"]["job_url"])
    threshold = float(defaults()["dedupe"]["threshold"])  # what `producer dedupe` uses by default
    summary = dedupe(store, threshold)
    assert (summary["rows"], summary["near_duplicates"], summary["method"]) == (len(DUP_ROWS), 1, "exact")
    found = read_near_duplicates(store)[0].to_pylist()
    assert [(f["row_id"], f["duplicate_of"]) for f in found] == [REPEATED]
    assert found[0]["similarity"] >= 0.999
    # The distinct images are not near the threshold: an embedding of every image alike (or of
    # the prompt) would put them all above it.
    row_ids, matrix = read_embeddings(store)
    vectors = matrix.astype(np.float32)
    similarity = vectors @ vectors.T
    distinct = [i for i in range(len(row_ids)) if row_ids[i] != REPEATED[0]]
    others = similarity[np.ix_(distinct, distinct)][np.triu_indices(len(distinct), 1)]
    assert others.max() < threshold - 0.03, similarity.round(3)


def test_score_option_records_presets_and_overrides_and_refuses_unknown_scorers(env, tmp_path, scorer_hub):
    presets = scorer_presets()
    local = snapshot(scorer_hub, "clip")
    spec = scoring_spec(["clip,aesthetic", f"clip={local}", "nsfw=someone/safety@v2"], embeddings=True)
    assert spec["scorers"]["clip"]["model"] == str(local) and spec["scorers"]["clip"]["revision"] is None
    assert spec["embedding_model"] == {"model": str(local), "revision": None}  # the clip scorer's model
    # The aesthetic head reads the CLIP it was trained on, whatever clip= says.
    assert spec["scorers"]["aesthetic"]["backbone"] == {"model": presets["clip"]["repo"],
                                                        "revision": presets["clip"]["revision"]}  # fmt: skip
    assert (spec["scorers"]["nsfw"]["model"], spec["scorers"]["nsfw"]["revision"]) == ("someone/safety", "v2")
    assert scoring_spec([], embeddings=False) is None
    assert scoring_spec([], embeddings=True)["embedding_model"]["model"] == presets["clip"]["repo"]

    # A local directory scores exactly as the same files from the hub cache.
    from worker.scoring import Scoring

    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    prompts = ["a red cube", "two cats", ""]
    from_dir = Scoring("cpu").score(scoring_spec([f"clip={local}"], True), images, prompts)
    with offline(scorer_hub.root):
        from_hub = Scoring("cpu").score(scoring_spec(["clip"], True), images, prompts)
    assert from_dir.columns == from_hub.columns
    assert np.array_equal(from_dir.embeddings, from_hub.embeddings)
    # A directory with pickle weights only is refused, in one line.
    pickled = tmp_path / "pickled-clip"
    shutil.copytree(local, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(local / "model.safetensors"), pickled / "pytorch_model.bin")
    with pytest.raises(UserError, match="cannot load scorer model") as refused:
        Scoring("cpu").score(scoring_spec([f"clip={pickled}"]), images, prompts)
    assert "\n" not in str(refused.value)

    for score, message in (
        ("clip=not a hub id", "neither a local directory nor a hub id"),
        (f"aesthetic={tmp_path}", "the directory has no model.safetensors"),
        ("clip=", "give tiny, a local directory or a hub id"),
        ("aesthetic.backbone", "give aesthetic.backbone=DIR"),
        (f"aesthetic.backbone={local}", "add aesthetic to --score"),
    ):
        with pytest.raises(UserError, match=message):
            scoring_spec([score])
    # On the command line: one line, the user-error exit status, no traceback.
    path = write_prompt_file(tmp_path / "p.tsv", ["a cat"])
    result = cli(
        "producer", "enqueue", "partiprompts", "--path", str(path), "--model", "tiny", "--job", "x",
        "--output", str(tmp_path / "out"), "--score", "clip,bogus", "--dry-run", env=env, check=False,
    )  # fmt: skip
    assert result.returncode == 2 and result.stderr == (
        "error: --score: unknown scorer 'bogus'; choose from clip, aesthetic, nsfw, pickscore, hpsv2, or "
        "tiny (all of them, random weights built locally), aesthetic.backbone=\n"
    ), result.stderr


def test_image_processing_on_the_tensor_matches_the_clip_processor_within_one_level(scorer_hub):
    from transformers import CLIPImageProcessor

    from worker.scoring import ImageProcessing

    directory = snapshot(scorer_hub, "clip")
    config = json.loads((directory / "preprocessor_config.json").read_text())
    processor = CLIPImageProcessor.from_pretrained(directory)
    rng = np.random.default_rng(1)
    # Square and landscape sizes, scaled by 1.6 to 12.8. (Pillow runs its two passes height
    # first for some other sizes, e.g. 90x41 to 87x40: there noisy images differ by up to 12
    # levels on 2% of pixels; docs/SCORES.md says so.)
    for height, width in ((64, 64), (48, 80), (512, 512)):
        images = rng.integers(0, 256, (2, height, width, 3), dtype=np.uint8)
        ours = ImageProcessing.from_config(config)(torch.from_numpy(images))
        theirs = processor([Image.fromarray(a) for a in images], return_tensors="pt").pixel_values
        assert ours.shape == theirs.shape == (2, 3, 32, 32)
        # One level of 255, normalised by the smallest std: the two resize filters' rounding.
        assert (ours - theirs).abs().max() <= 1 / 255 / min(config["image_std"]) + 1e-5


def test_convert_aesthetic_turns_laions_pickle_into_safetensors_and_refuses_code(tmp_path):
    from worker.scorer_weights import convert_aesthetic
    from worker.scoring import AestheticHead

    replicas.aesthetic_head(tmp_path / "head.safetensors")
    state = load_file(tmp_path / "head.safetensors")
    torch.save(state, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    target = convert_aesthetic(str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"), str(tmp_path / "out"))
    converted = load_file(target)
    assert converted.keys() == state.keys() and all(torch.equal(converted[k], state[k]) for k in state)
    assert AestheticHead(target, "cpu").dim == replicas.HIDDEN
    torch.save({"head": _Pickled()}, tmp_path / "code.pth")  # unpickling it would run code
    with pytest.raises(UserError, match="not a weights-only torch file"):
        convert_aesthetic(str(tmp_path / "code.pth"), str(tmp_path / "refused"))
    assert not (tmp_path / "refused" / "model.safetensors").exists()


class _Pickled:
    """An object torch.load(weights_only=True) must refuse to unpickle."""


def test_enqueue_refuses_scorers_it_cannot_find_in_one_line_naming_each_and_how_to_provide_it(
    env, tmp_path, scorer_hub
):
    path = write_prompt_file(tmp_path / "p.tsv", ["a cat"])
    args = ("producer", "enqueue", "partiprompts", "--path", str(path), "--model", "tiny", "--job", "x",
            "--output", str(tmp_path / "out"), "--dry-run")  # fmt: skip
    empty = {**env, "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    result = cli(*args, "--score", "clip,aesthetic,nsfw", env=empty, check=False)
    assert_one_line_error(
        result,
        "scorer weights missing: clip and aesthetic's backbone (openai/clip-vit-large-patch14@32bd642: not "
        "cached), aesthetic (ttj/sac-logos-ava1-l14-linearMSE@1e77fa0: not cached), nsfw (",
        "hf download openai/clip-vit-large-patch14 --revision 32bd64288804d66eefd0ccbe215aa642df71cc41",
        "--score aesthetic.backbone=DIR",
        "--score tiny",
    )
    # With the head given as a directory, the backbone is still needed, and named.
    head = snapshot(scorer_hub, "aesthetic")
    result = cli(*args, "--score", f"aesthetic={head}", env=empty, check=False)
    assert_one_line_error(result, "aesthetic's backbone (openai/clip-vit-large-patch14@32bd642")
    assert "aesthetic (" not in result.stderr
    backbone = snapshot(scorer_hub, "clip")
    given = cli(*args, "--score", f"aesthetic={head},aesthetic.backbone={backbone}", "--json", env=empty)
    assert json.loads(given.stdout)["prompts"] == 1
    # In the cache: accepted; --no-scorer-check accepts what this machine cannot see.
    cli(*args, "--score", "clip,aesthetic,nsfw", env={**env, "HF_HUB_CACHE": str(scorer_hub.root)})
    cli(*args, "--score", "clip", "--no-scorer-check", env=empty)


def test_worker_names_the_aesthetic_backbone_it_cannot_load(tmp_path, scorer_hub):
    from worker.scoring import Scoring

    head = snapshot(scorer_hub, "aesthetic")
    images = np.zeros((1, 64, 64, 3), dtype=np.uint8)
    with offline(tmp_path / "empty-cache"), pytest.raises(UserError) as refused:
        Scoring("cpu").score(scoring_spec([f"aesthetic={head}"]), images, ["a cat"])
    message = str(refused.value)
    assert message.startswith("aesthetic's backbone: cannot load scorer model openai/clip-vit-large")
    assert "--score aesthetic.backbone=DIR" in message and "\n" not in message


def test_tiny_scorer_set_scores_offline_with_random_weights_built_locally(env, output, tmp_path):
    """`--score tiny --embeddings` on an empty hub cache: every column and the embeddings."""
    path = write_prompt_file(tmp_path / "p.tsv", ["a red cube", "two cats on a sofa", "a lighthouse", "rain"])
    empty = {**env, "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    job = enqueue(empty, output, "tiny-scored", path, "--shard-size", "2", "--score", "tiny", "--embeddings")
    spec = json.loads(open_store(job["job_url"]).get("job.json"))["scoring"]
    assert {n: s["model"] for n, s in spec["scorers"].items()} == {
        "clip": "builtin:tiny-clip", "aesthetic": "builtin:tiny-aesthetic", "nsfw": "builtin:tiny-nsfw",
        "pickscore": "builtin:tiny-pickscore", "hpsv2": "builtin:tiny-hpsv2",
    }  # fmt: skip
    assert spec["scorers"]["aesthetic"]["backbone"]["model"] == "builtin:tiny-clip"
    assert spec["embedding_model"]["model"] == "builtin:tiny-clip"
    run_worker_until_done(empty, output, "tiny-scored", log_path=tmp_path / "worker.log", timeout=240)
    table = committed_metadata(job["job_url"])
    for column in ("clip_score", "aesthetic", "nsfw_score", "pickscore", "hpsv2"):
        assert None not in table.column(column).to_pylist(), column
    row_ids, matrix = read_embeddings(open_store(job["job_url"]))
    assert len(row_ids) == 4 and matrix.shape[1] == replicas.HIDDEN
    # The worker started with an empty cache said so, in one line, at start.
    log = (tmp_path / "worker.log").read_text(errors="replace")
    [warning] = [line for line in log.splitlines() if "jobs with --score" in line]
    assert "scorer weights missing: clip and aesthetic's backbone" in warning and "--score tiny" in warning
