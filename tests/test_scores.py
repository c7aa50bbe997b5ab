"""Scores and embeddings computed on the worker (``--score``, ``--embeddings``).

Real redis-server, SeaweedFS and a real worker process (the ``tiny`` model on the CPU);
the scorer models are tiny random-weight replicas written into a hub cache at the commits
``config/scorers.toml`` pins (``tests/replicas/scorers.py``), so the presets' own loading
code runs. Every score is checked against an independent computation here: the same
replica through ``transformers``' ``CLIPProcessor``/``CLIPModel`` (and diffusers' safety
checker with its ``CLIPImageProcessor``) on the PNG decoded from storage, with the same
formula.

Tolerances: the worker preprocesses in torch on the tensor, the processor in PIL; they give
the same pixel values or values one level apart on a few pixels (checked below), and the
towers run batched here and there, so scores agree to float32 rounding plus that level.
Before the resize matched Pillow's two rounded passes, noise images moved clip_score by up
to 0.06 (of 100); the bounds keep a margin over that: 0.25 for clip_score (100 × a cosine),
2e-3 for cosines, embeddings (float16 storage alone rounds by up to 5e-4) and nsfw_score,
and 0.05 for the aesthetic head, which multiplies embedding differences by its gain (about
20 here).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fewstep import UserError
from fewstep.contract import ShardStats, embeddings_key, metadata_key, stats_key
from fewstep.scorers import scorer_presets, scoring_spec
from fewstep.storage import Store, open_store, read_table
from producer.dedupe import dedupe
from producer.embeddings import read_embeddings
from producer.enqueue import JobOptions
from producer.enqueue import enqueue as enqueue_job
from producer.finalize import finalize
from producer.gc import collect
from producer.images import tar_members
from producer.report import make_report
from producer.sources.partiprompts import PartiPrompts
from producer.verify import verify
from tests.replicas import scorers as replicas
from tests.replicas.hub import HubCache, offline
from tests.support import cli, cli_json, committed_metadata, run_worker_until_done, verify_job
from tests.test_faults_tokens import forced_thread_switching, write_prompt_file
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
def independent_scores(hub: HubCache, images: list[np.ndarray], prompts: list[str]) -> dict[str, np.ndarray]:
    """clip_score, aesthetic, nsfw_score and the normalised image embedding of each image,
    computed from the replicas' files with transformers' and diffusers' own classes."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    pictures = [Image.fromarray(a) for a in images]
    clip_dir = snapshot(hub, "clip")
    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    inputs = processor(text=prompts, images=pictures, padding=True, truncation=True, return_tensors="pt")
    image = _unit(_features(model.get_image_features(pixel_values=inputs["pixel_values"])))
    text = _unit(_features(model.get_text_features(input_ids=inputs["input_ids"],
                                                   attention_mask=inputs["attention_mask"])))  # fmt: skip
    out = {"clip_score": (100 * (image * text).sum(-1).clamp(min=0)).numpy(), "embedding": image.numpy()}

    state = load_file(snapshot(hub, "aesthetic") / "model.safetensors")
    x = image
    for index in (0, 2, 4, 6, 7):  # LAION's MLP: Linear, Dropout, ..., no activations
        x = x @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    out["aesthetic"] = x[:, 0].numpy()

    nsfw_dir = snapshot(hub, "nsfw")
    checker = StableDiffusionSafetyChecker.from_pretrained(nsfw_dir).eval()
    pixels = CLIPImageProcessor.from_pretrained(nsfw_dir)(pictures, return_tensors="pt").pixel_values
    embeds = _unit(checker.visual_projection(checker.vision_model(pixels)[1]))
    special = embeds @ _unit(checker.special_care_embeds).T - checker.special_care_embeds_weights
    adjustment = 0.01 * (special > 0).any(dim=1, keepdim=True)
    ratio = (embeds @ _unit(checker.concept_embeds).T) / (checker.concept_embeds_weights - adjustment)
    out["nsfw_score"] = ratio.max(dim=1).values.clamp(0, 1).numpy()
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
        "--output", output, "--width", "64", "--height", "64", *extra, env=env,
    )  # fmt: skip


def enqueue_here(output: str, job: str, path: Path, **options) -> dict:
    opts = JobOptions(job=job, output=output, model="tiny", width=64, height=64, shard_size=4, **options)
    return enqueue_job(PartiPrompts(str(path)), opts, progress=False)


def check_scores(table, expected: dict[str, np.ndarray], columns: tuple[str, ...]) -> None:
    tolerance = {
        "clip_score": CLIP_TOLERANCE,
        "aesthetic": AESTHETIC_TOLERANCE,
        "nsfw_score": COSINE_TOLERANCE,
    }
    for column in ("clip_score", "aesthetic", "nsfw_score"):
        values = table.column(column).to_pylist()
        if column not in columns:
            assert values == [None] * len(values), column
            continue
        assert None not in values, column
        np.testing.assert_allclose(values, expected[column], rtol=0, atol=tolerance[column], err_msg=column)


def test_worker_scores_like_an_independent_clip_commits_embeddings_and_producer_tools_read_them(
    env, output, tmp_path, scorer_hub
):
    prompts = prompts_from_1_to_300_tokens(8, seed=3)  # cut at 77 tokens by CLIP, and short ones
    path = write_prompt_file(tmp_path / "p.tsv", prompts)
    scored = enqueue(env, output, "scored", path, "--shard-size", "4", "--score", "clip,aesthetic",
                     "--score", "nsfw", "--embeddings")  # fmt: skip
    # The other two in this process (a CLI start costs seconds): a webdataset job, and one without --score.
    tar = enqueue_here(output, "tar", write_prompt_file(tmp_path / "t.tsv", prompts[:4]),
                       layout="webdataset", score=("clip",), embeddings=True)  # fmt: skip
    plain = enqueue_here(output, "plain", write_prompt_file(tmp_path / "q.tsv", prompts[:2]))
    # One worker for the three jobs, switching threads every 10 µs, reading ahead: the device
    # thread scores (tokenizing with the scorer's tokenizer) while other threads count tokens.
    worker_env = {
        **forced_thread_switching(env, tmp_path / "switching"),
        "HF_HUB_CACHE": str(scorer_hub.root),
    }
    run_worker_until_done(worker_env, output, "scored", "tar", "plain", args=("--batch-size", "2"),
                          log_path=tmp_path / "worker.log", timeout=240)  # fmt: skip
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]

    # Files layout, every scorer: each column against the independent computation.
    store = open_store(scored["job_url"])
    table = committed_metadata(scored["job_url"])
    assert table.column("prompt").to_pylist() == prompts
    expected = independent_scores(scorer_hub, stored_images(store, table), prompts)
    check_scores(table, expected, ("clip_score", "aesthetic", "nsfw_score"))
    assert min(table.column("nsfw_score").to_pylist()) > 0 and max(table.column("clip_score").to_pylist()) > 0
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
    # What the worker wrote is what the producer's tools use: dedupe reads the real embeddings
    # (nothing reaches a similarity of 1 but an image with itself), finalize --where filters on
    # the real scores, report plots them.
    assert dedupe(tar_store, 0.99999)["near_duplicates"] == 0
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
        ("clip=", "give a local directory or a hub id"),
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
        "error: --score: unknown scorer 'bogus'; choose from clip, aesthetic, nsfw\n"
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
    from worker.scoring import AestheticHead, convert_aesthetic

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
