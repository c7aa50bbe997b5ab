"""The 2025 one-step and few-step presets (SANA-Sprint, PixArt-α DMD, Z-Image-Turbo), each
loaded through its real loading code against a tiny random-weight replica in the hub's cache
layout, offline, as ``tests/test_presets.py`` does for the older families.

Besides steps, scheduler, size and dtype, these pipelines cut prompts at their own
``max_sequence_length`` (after wrapping them in an instruction or a chat template), not at
their tokenizer's limit: the tests check ``truncated`` against what the text encoder saw.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewstep.presets import resolve_model
from tests import replicas
from tests.replicas.hub import offline
from tests.replicas.pickles import config_with_replica_shas
from tests.support import cli_json, committed_metadata, run_worker_until_done
from tests.test_end_to_end import SAMPLE
from tests.test_presets import PIXART, Card, Denoiser, check_img2img
from worker import pickle_weights

SANA = "SanaSprintPipeline"
NC = "NON-COMMERCIAL"

CARDS_2025 = {
    "sana-sprint-0.6b-1024": Card(SANA, "SCMScheduler", 2, 4.5, 1024, "bfloat16", license=NC),
    "sana-sprint-1.6b-1024": Card(SANA, "SCMScheduler", 2, 4.5, 1024, "bfloat16", license=NC),
    "pixart-alpha-dmd-512": Card(
        PIXART, "DDPMScheduler", 1, 1.0, 512, "float16", {}, (400,), license="openrail"
    ),
    "z-image-turbo": Card(
        "ZImagePipeline",
        "FlowMatchEulerDiscreteScheduler",
        8,
        0.0,
        1024,
        "bfloat16",
        {"shift": 3.0},
        license="apache",
    ),
}
#: Where each pipeline cuts the prompt, as the card's call sets it (max_sequence_length).
MAX_SEQUENCE_LENGTH = {
    "sana-sprint-0.6b-1024": 300,
    "sana-sprint-1.6b-1024": 300,
    "pixart-alpha-dmd-512": 120,
    "z-image-turbo": 512,
}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Replicas of only the repositories these presets load from (the rest are not needed)."""
    root = tmp_path_factory.mktemp("hub")
    with offline(root):
        yield replicas.build(root, set(CARDS_2025))


@pytest.fixture(scope="module")
def dmd_config(hub, tmp_path_factory):
    """PixArt-α DMD's transformer is a pickle whose real sha256 is not pinned (the preset is
    unavailable): its loading code runs here against config/ pinning the replica's sha256."""
    directory = tmp_path_factory.mktemp("dmd") / "config"
    config_with_replica_shas(hub, {"pixart-alpha-dmd-512"}, directory)
    return directory


@pytest.fixture(autouse=True)
def dmd_converts(dmd_config, tmp_path, monkeypatch):
    """Every test here sees that config, with the conversion opt-in and a fresh model cache."""
    monkeypatch.setenv("FEWSTEP_CONFIG_DIR", str(dmd_config))
    monkeypatch.setenv(pickle_weights.ALLOW_ENV, "1")
    monkeypatch.setenv("FEWSTEP_MODEL_CACHE", str(tmp_path / "models"))


class Calls(Denoiser):
    """Denoiser calls and batch sizes; Z-Image's transformer takes a list of latents."""

    def record(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
        self.batches.append(len(sample) if isinstance(sample, list) else int(sample.shape[0]))


def generate(model, prompts=("a photo of a cat", "two blue cubes"), seeds=(1, 2), steps=None):
    calls = Calls(model)
    try:
        steps = steps or model.preset["steps"]
        guidance = model.preset["guidance"]
        batch = model.generate(
            list(prompts), list(seeds), steps=steps, guidance=guidance, width=64, height=64
        )
    finally:
        calls.handle.remove()
    return batch, calls


@pytest.mark.parametrize("name", sorted(CARDS_2025))
def test_preset_data_matches_the_card(name):
    card, preset = CARDS_2025[name], resolve_model(name)
    assert (preset["pipeline"], preset["scheduler"]["class"]) == (card.pipeline, card.scheduler)
    assert (preset["steps"], preset["guidance"], preset["dtype"]) == (card.steps, card.guidance, card.dtype)
    assert (preset["width"], preset["height"]) == (card.size, card.size)
    assert card.license in preset["license"] and preset["gated"] is False
    assert preset["call"]["max_sequence_length"] == MAX_SEQUENCE_LENGTH[name]
    assert tuple(preset.get("timesteps", ())) == (card.timesteps or ())


@pytest.mark.parametrize("name", sorted(CARDS_2025))
def test_preset_loads_and_runs_as_its_card_says(hub, name):
    from worker.model import _torch_dtype, load_model

    card = CARDS_2025[name]
    model = load_model(name, "cpu")
    pipe = model.pipeline
    assert (type(pipe).__name__, type(pipe.scheduler).__name__) == (card.pipeline, card.scheduler)
    for key, value in card.config.items():
        assert pipe.scheduler.config[key] == value, key

    batch, calls = generate(model)
    assert calls.batches == [2] * card.steps  # one denoiser call per step, no CFG batch
    if card.timesteps:
        assert [round(float(t)) for t in pipe.scheduler.timesteps] == list(card.timesteps)
    assert batch.images.shape == (2, 64, 64, 3) and batch.images.dtype == np.uint8
    assert not np.array_equal(batch.images[0], batch.images[1])
    assert model.dtype == "float32" and next(calls.module.parameters()).dtype == torch.float32
    assert _torch_dtype(model.preset["dtype"], "cuda")[0] == getattr(torch, card.dtype)
    assert model.revision.split()[0] == hub.commit(model.preset["repo"], model.preset["revision"])
    check_img2img(model)


def test_dmd_transformer_and_scheduler_come_from_the_dmd_repository(hub):
    from worker.model import load_model

    model = load_model("pixart-alpha-dmd-512", "cpu")
    dmd = model.preset["components"]["transformer"]
    assert f"transformer={dmd['repo']}@{dmd['revision']}" in model.revision
    assert f"scheduler={dmd['repo']}@{dmd['revision']}" in model.revision
    assert model.pipeline.scheduler.config.beta_schedule == "linear"  # the DMD repository's DDPM
    assert type(model.pipeline.tokenizer).__name__ == "T5Tokenizer"  # the base's T5


def test_z_image_runs_the_cards_eight_forwards_at_its_sigmas(hub):
    """The card's 9 steps ran 8 forwards at sigmas 1, 7/8, ..., 1/8 (shifted by 3): 8 steps here."""
    from worker.model import load_model

    model = load_model("z-image-turbo", "cpu")
    generate(model)
    sigmas = torch.linspace(1.0, 1 / 8, 8)
    shifted = 3.0 * sigmas / (1 + 2.0 * sigmas)
    assert torch.allclose(model.pipeline.scheduler.sigmas[:-1], shifted, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 4])  # 2: the card's, run above
def test_sana_sprint_runs_one_to_four_steps(hub, steps):
    """The intermediate timestep the pipeline uses by default exists only at 2 steps."""
    from worker.model import load_model

    model = load_model("sana-sprint-0.6b-1024", "cpu")
    _, calls = generate(model, prompts=("a cat",), seeds=(3,), steps=steps)
    assert calls.batches == [1] * steps


def prompt_of(model, tokens: int) -> str:
    """A prompt of exactly ``tokens`` tokens (as the worker counts them) ending in "~", a
    character no instruction or template around it contains."""
    for n in range(tokens + 1):
        # Spaced words for SentencePiece tokenizers, one run of letters for byte-level BPE.
        for prompt in (" ".join(["b"] * n + ["~"]), "b" * n + "~"):
            if model.count_tokens([prompt])[0][0] == tokens:
                return prompt
    raise AssertionError(f"no prompt of {tokens} tokens")


@pytest.mark.parametrize("name", ["sana-sprint-0.6b-1024", "pixart-alpha-dmd-512", "z-image-turbo"])
def test_truncated_is_true_exactly_when_the_text_encoder_lost_part_of_the_prompt(hub, name):
    from worker.model import load_model

    model = load_model(name, "cpu")
    limit = model.count_tokens(["a"])[1]
    assert limit == model.preset["token_limit"]
    seen: list[torch.Tensor] = []
    hook = model.pipeline.text_encoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(args[0] if args else kwargs["input_ids"]), with_kwargs=True
    )
    tilde = model.pipeline.tokenizer("~", add_special_tokens=False)["input_ids"][-1]
    try:
        for tokens in (limit, limit + 1):
            prompt = prompt_of(model, tokens)
            counted, _ = model.count_tokens([prompt])
            seen.clear()
            generate(model, prompts=(prompt,), seeds=(1,))
            whole = bool((seen[0] == tilde).any())  # the prompt's last token reached the encoder
            assert (counted[0] > limit) == (not whole), (tokens, limit)
    finally:
        hook.remove()


def test_worker_records_a_row_for_z_image_turbo(hub, env, output, tmp_path):
    """A real worker holding Z-Image-Turbo writes rows with the card's steps and cfg, the
    flow-match sampler, the model and its revision, and the prompt's token count."""
    job = cli_json(
        "producer", "enqueue", "partiprompts", "--path", str(SAMPLE), "--model", "z-image-turbo",
        "--job", "zit", "--output", output, "--limit", "2", "--shard-size", "2", "--width", "64",
        "--height", "64", env=env,
    )  # fmt: skip
    run_worker_until_done(
        env,
        output,
        "zit",
        model="z-image-turbo",
        log_path=tmp_path / "worker.log",
        timeout=300,
        exit_timeout=120,
    )
    preset = resolve_model("z-image-turbo")
    rows = committed_metadata(job["job_url"]).to_pylist()
    assert len(rows) == 2
    for row in rows:
        assert (row["sampler"], row["step"], row["cfg"]) == ("flow-match-euler", 8, 0.0)
        assert (row["model"], row["model_revision"]) == ("z-image-turbo", hub.commit(preset["repo"], "main"))
        assert (row["width"], row["height"], row["nsfw"]) == (64, 64, None)
        assert row["prompt_tokens"] > 0 and row["truncated"] is False
