"""Every preset, faithful to its model card, loaded through its real loading code.

The hub is replaced by tiny random-weight replicas (``tests/replicas``) written into a hub
cache at the commits the presets pin, with ``HF_HUB_OFFLINE=1``: ``from_pretrained``,
``hf_hub_download`` and ``load_lora_weights`` run unchanged. ``CARDS`` below is the
specification, written from the model cards independently of ``config/models.toml``.
"""

from __future__ import annotations

import io
import math
import shutil
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fewstep import UserError
from fewstep.presets import presets, resolve_model
from fewstep.storage import open_store
from tests import replicas
from tests.replicas.hub import offline
from tests.support import cli, cli_json, committed_metadata, layout_or_files, run_worker_until_done
from tests.test_end_to_end import SAMPLE
from worker import pickle_weights


@dataclass(frozen=True)
class Card:
    pipeline: str
    scheduler: str
    steps: int
    guidance: float
    size: int
    dtype: str
    config: dict = field(default_factory=dict)  # scheduler config the card sets
    timesteps: tuple[int, ...] | None = None  # the timesteps the denoiser must see
    cfg: bool = False  # classifier-free guidance: two denoiser batches per step
    license: str = ""  # a word the licence note must contain


SD, SDXL, PIXART = "StableDiffusionPipeline", "StableDiffusionXLPipeline", "PixArtAlphaPipeline"
TRAILING = {"timestep_spacing": "trailing"}
V_PREDICTION = {"prediction_type": "v_prediction"}
NC = "NON-COMMERCIAL"
LIGHTNING = {2: (999, 499), 4: (999, 749, 499, 249), 8: (999, 874, 749, 624, 499, 374, 249, 124)}
# Qwen-Image-Lightning's card: "We use shift=3 in distillation", no terminal stretching.
QWEN_LIGHTNING_SCHEDULER = {
    "base_shift": math.log(3),
    "max_shift": math.log(3),
    "shift": 1.0,
    "shift_terminal": None,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
    "max_image_seq_len": 8192,
}

CARDS = {
    "sdxs-512-0.9": Card(SD, "EulerDiscreteScheduler", 1, 0.0, 512, "float32", TRAILING, (999,)),
    "sdxs-512-dreamshaper": Card(SD, "EulerDiscreteScheduler", 1, 0.0, 512, "float16", TRAILING, (999,)),
    # The authors' sketch demo: one step, no CFG, float32, black-on-white sketches at scale 0.8.
    "sdxs-512-dreamshaper-sketch": Card(
        "StableDiffusionControlNetPipeline",
        "EulerDiscreteScheduler",
        1,
        0.0,
        512,
        "float32",
        TRAILING,
        (999,),
    ),
    "sd-turbo": Card(
        SD, "EulerDiscreteScheduler", 1, 0.0, 512, "float16", TRAILING, (999,), license="COMMERCIAL"
    ),
    "sdxl-turbo": Card(
        SDXL, "EulerAncestralDiscreteScheduler", 1, 0.0, 512, "float16", TRAILING, (999,), license=NC
    ),
    "sdxl-lightning-1step": Card(
        SDXL,
        "EulerDiscreteScheduler",
        1,
        0.0,
        1024,
        "float16",
        {**TRAILING, "prediction_type": "sample"},
        (999,),
    ),
    **{
        f"sdxl-lightning-{n}step": Card(SDXL, "EulerDiscreteScheduler", n, 0.0, 1024, "float16", TRAILING, t)
        for n, t in LIGHTNING.items()
    },
    "lcm-lora-sdv1-5": Card(SD, "LCMScheduler", 4, 1.0, 512, "float16"),
    "lcm-dreamshaper-v7": Card("LatentConsistencyModelPipeline", "LCMScheduler", 4, 8.0, 768, "float32"),
    # The card's SD 1.5 example: 1 step, guidance 1 (its 2-step CFG 1.5 one is Realistic Vision's).
    "yoso-sd15-1step": Card(SD, "LCMScheduler", 1, 1.0, 512, "float16"),
    "yoso-pixart-512": Card(PIXART, "LCMScheduler", 1, 1.0, 512, "float16", V_PREDICTION),
    "yoso-pixart-1024": Card(PIXART, "LCMScheduler", 1, 1.0, 1024, "float16", V_PREDICTION),
    # One velocity prediction at t = 1000 (worker/instaflow.py; the repository's PNDM unused).
    "instaflow-0.9b": Card(
        "InstaFlowPipeline", "PNDMScheduler", 1, 0.0, 512, "float16", {}, (1000,), license=NC
    ),
    "pixart-alpha-512": Card(PIXART, "DPMSolverMultistepScheduler", 20, 4.5, 512, "float16", cfg=True),
    "hyper-sd15-1step": Card(SD, "TCDScheduler", 1, 0.0, 512, "float16"),
    "dmd2-sdxl-4step": Card(
        SDXL, "LCMScheduler", 4, 0.0, 1024, "float16", {}, (999, 749, 499, 249), license=NC
    ),
    "dmd2-sdxl-1step": Card(SDXL, "LCMScheduler", 1, 0.0, 1024, "float16", {}, (399,), license=NC),
    "flux-schnell": Card(
        "FluxPipeline", "FlowMatchEulerDiscreteScheduler", 4, 0.0, 1024, "bfloat16", license="apache"
    ),
    "sd35-large-turbo": Card(
        "StableDiffusion3Pipeline",
        "FlowMatchEulerDiscreteScheduler",
        4,
        0.0,
        1024,
        "bfloat16",
        license="Community",
    ),
    # LLM text encoders (tests/test_presets_flux2_qwen.py: LoRA, token limits, worker rows).
    "flux2-klein-4b": Card(
        "Flux2KleinPipeline", "FlowMatchEulerDiscreteScheduler", 4, 1.0, 1024, "bfloat16", license="apache"
    ),
    **{
        f"qwen-image-lightning-{n}step": Card(
            "QwenImagePipeline",
            "FlowMatchEulerDiscreteScheduler",
            n,
            1.0,
            1328,
            "bfloat16",
            QWEN_LIGHTNING_SCHEDULER,
            license="apache",
        )
        for n in (4, 8)
    },
}

LORA = {"lcm-lora-sdv1-5", "yoso-sd15-1step", "hyper-sd15-1step", "dmd2-sdxl-4step"}
# Unavailable (pixart-alpha-dmd-512: a pickle with no pinned sha256) or pickle-only parts that
# load only on the conversion opt-in (tests/test_pickle_conversion.py).
REFUSED = {n for n, p in presets().items() if p.get("unavailable") or pickle_weights.pickle_parts(p)}
LOADABLE = sorted(set(CARDS) - REFUSED)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The replicas in a hub cache, this process (and the workers it starts) pointed at it."""
    root = tmp_path_factory.mktemp("hub")
    with offline(root):
        yield replicas.build(root)


class Denoiser:
    """Counts the denoiser's calls, the batch of each and the timesteps it was given."""

    def __init__(self, model):
        self.module = getattr(model.pipeline, "unet", None) or model.pipeline.transformer
        self.batches: list[int] = []
        self.timesteps: list[int] = []
        self.handle = self.module.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        self.batches.append(
            len(sample) if isinstance(sample, list) else int(sample.shape[0])
        )  # Z-Image: a list
        self.timesteps.append(round(float(torch.as_tensor(t).flatten()[0])))


def run(model, prompts=("a photo of a cat", "two blue cubes"), seeds=(1, 2), size=64, **overrides):
    p = model.preset
    args = {"steps": p["steps"], "guidance": p["guidance"], "width": size, "height": size, **overrides}
    denoiser = Denoiser(model)
    try:
        batch = model.generate(
            list(prompts), list(seeds), **model.probe_inputs(len(prompts), size, size), **args
        )
    finally:
        denoiser.handle.remove()
    return batch, denoiser


# One preset per img2img pipeline class (and DMD2, whose fixed timesteps strength cuts): the
# CI budget. Every other table names one of these classes (test_preset_fidelity checks it).
IMG2IMG_RUN = {
    "sd-turbo", "sdxl-turbo", "lcm-dreamshaper-v7", "dmd2-sdxl-4step", "flux-schnell", "sd35-large-turbo",
    "qwen-image-lightning-4step", "sana-sprint-0.6b-1024", "z-image-turbo",
}  # fmt: skip


def check_img2img(model) -> None:
    """A preset with an img2img table runs it: the pipeline built from the loaded modules (no
    copy), int(steps x strength) denoising steps from the given images."""
    img2img = model.preset.get("img2img")
    if not img2img or model.name not in IMG2IMG_RUN:
        return
    from PIL import Image

    pipe, steps, strength = model.pipeline, img2img["steps"], img2img["strength"]
    images = [Image.new("RGB", (64, 64), (v, v, v)) for v in (40, 220)]
    batch, denoiser = run(model, images=images, strength=strength, steps=steps)
    assert type(model.img2img()).__name__ == img2img["pipeline"]
    for part in ("unet", "transformer", "vae", "text_encoder"):  # the same modules, no copy
        assert getattr(model.img2img(), part, None) is getattr(pipe, part, None), part
    # LCM's own img2img pipeline spreads all its steps below the strength's timestep.
    runs = steps if img2img["pipeline"] == "LatentConsistencyModelImg2ImgPipeline" else int(steps * strength)
    assert len(denoiser.batches) == runs and batch.images.shape == (2, 64, 64, 3)


def builtins() -> set[str]:
    """Presets built locally (the demo's tiny model, the benchmarks' synthetic one): no card."""
    return {name for name, p in presets().items() if p["repo"].startswith("builtin:")}


def all_cards() -> dict[str, Card]:
    """The cards here and those of the newer families, specified and tested in their own module."""
    from tests.test_presets_2025 import CARDS_2025  # imported late: that module imports this one

    return {**CARDS, **CARDS_2025}


def test_every_preset_has_a_card_and_every_card_a_preset():
    assert builtins() == {"tiny", "tiny-controlnet", "synthetic"}
    assert set(presets()) - builtins() == set(all_cards())


@pytest.mark.parametrize("name", sorted(CARDS))
def test_preset_data_matches_the_card(name):
    card, preset = CARDS[name], resolve_model(name)
    assert (preset["pipeline"], preset["scheduler"]["class"]) == (card.pipeline, card.scheduler)
    assert (preset["steps"], preset["guidance"], preset["dtype"]) == (card.steps, card.guidance, card.dtype)
    assert (preset["width"], preset["height"]) == (card.size, card.size)
    assert card.license in preset["license"] and preset["license"]
    if "timesteps" in preset:
        assert tuple(preset["timesteps"]) == card.timesteps and len(preset["timesteps"]) == preset["steps"]


@pytest.mark.parametrize("name", LOADABLE)
def test_preset_loads_and_runs_as_its_card_says(hub, name):
    from worker.model import _torch_dtype, load_model

    card = CARDS[name]
    model = load_model(name, "cpu")
    pipe = model.pipeline
    assert type(pipe).__name__ == card.pipeline
    assert type(pipe.scheduler).__name__ == card.scheduler
    for key, value in card.config.items():
        assert pipe.scheduler.config[key] == value, key
    assert model.sampler == model.preset["sampler"]

    batch, denoiser = run(model)
    # As many denoiser calls as steps; one batch per prompt, two where the card uses CFG.
    assert denoiser.batches == [2 * (2 if card.cfg else 1)] * card.steps
    if card.timesteps:
        assert tuple(denoiser.timesteps) == card.timesteps
    assert batch.images.shape == (2, 64, 64, 3) and batch.images.dtype == np.uint8
    assert not np.array_equal(batch.images[0], batch.images[1])

    check_img2img(model)

    # float32 on a CPU; on a GPU the card's dtype.
    assert model.dtype == "float32" and next(denoiser.module.parameters()).dtype == torch.float32
    assert _torch_dtype(model.preset["dtype"], "cuda")[0] == getattr(torch, card.dtype)
    # The revision names the commit that ran: the pinned one, or the one an unpinned branch
    # (SD 1.5's "main") resolved to.
    assert model.revision.split()[0] == hub.commit(model.preset["repo"], model.preset["revision"])


@pytest.mark.parametrize("name", sorted(LORA))
def test_lora_is_fused_into_the_unet_and_its_layers_unloaded(hub, name):
    from diffusers import UNet2DConditionModel

    from worker.model import load_model

    preset = resolve_model(name)
    fused = load_model(name, "cpu").pipeline.unet
    base = UNet2DConditionModel.from_pretrained(
        preset["repo"], subfolder="unet", revision=preset["revision"], variant=preset.get("variant")
    )
    fused_weights, base_weights = fused.state_dict(), base.state_dict()
    assert fused_weights.keys() == base_weights.keys()  # no adapter layers left
    changed = {k for k in base_weights if not torch.equal(fused_weights[k], base_weights[k].float())}
    assert changed and all(k.split(".")[-2] in ("to_q", "to_k", "to_v", "0") for k in changed)
    lora = preset["lora"]
    assert f"lora={lora['repo']}@{lora['revision']}" in load_model(name, "cpu").revision


def test_unet_checkpoint_file_replaces_the_base_unet(hub):
    from huggingface_hub import hf_hub_download

    from worker.model import load_model

    model = load_model("sdxl-lightning-4step", "cpu")
    spec = model.preset["components"]["unet"]
    expected = load_file(hf_hub_download(spec["repo"], spec["file"], revision=spec["revision"]))
    weights = model.pipeline.unet.state_dict()
    assert expected.keys() == weights.keys()
    assert all(torch.equal(weights[k], v.float()) for k, v in expected.items())


def test_components_from_other_repositories_replace_the_base_ones(hub):
    from worker.model import load_model

    yoso = load_model("yoso-pixart-1024", "cpu")
    assert type(yoso.pipeline.transformer).__name__ == "PixArtTransformer2DModel"
    assert yoso.pipeline.transformer.config.sample_size == 128  # the 1024 transformer, not the base's
    assert type(yoso.pipeline.tokenizer).__name__ == "T5Tokenizer"  # read from spiece.model


def test_pickle_weights_are_refused_with_one_clear_line(hub, tmp_path):
    from worker.model import load_model

    with pytest.raises(
        UserError, match=r"dmd2_sdxl_1step_unet_fp16\.bin\); pass --allow-pickle-conversion"
    ) as e:
        load_model("dmd2-sdxl-1step", "cpu")
    assert "\n" not in str(e.value)

    # A directory whose UNet exists only as a pickle is refused too, not unpickled.
    local = tmp_path / "pickled"
    shutil.copytree(hub.snapshot("IDKiro/sdxs-512-0.9", resolve_model("sdxs-512-0.9")["revision"]), local)
    weights = local / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), weights.with_suffix(".bin"))
    weights.unlink()
    with pytest.raises(UserError, match="no safetensors weights found; fewstep refuses pickle weights"):
        load_model(str(local), "cpu")


def test_nsfw_flags_are_recorded_and_the_images_kept(hub):
    from worker.model import load_model

    flagged, _ = run(load_model("lcm-lora-sdv1-5", "cpu"))  # this replica's checker flags everything
    assert flagged.nsfw == [True, True]
    assert all(image.std() > 0 for image in flagged.images)  # not blanked
    clean, _ = run(load_model("sdxs-512-dreamshaper", "cpu"))
    assert clean.nsfw == [False, False]
    none, _ = run(load_model("sd-turbo", "cpu"))
    assert none.nsfw == [None, None]  # no checker in the repository


def test_sampler_switches_per_job_and_back(hub):
    from worker.model import load_model

    model = load_model("pixart-alpha-512", "cpu")
    model.use_sampler("sa-solver")
    assert (model.sampler, type(model.pipeline.scheduler).__name__) == ("sa-solver", "SASolverScheduler")
    _, denoiser = run(model, steps=3)
    assert denoiser.batches == [4] * 3
    model.use_sampler("dpm-solver")
    assert type(model.pipeline.scheduler).__name__ == "DPMSolverMultistepScheduler"
    with pytest.raises(UserError, match="has no sampler 'euler'"):
        model.use_sampler("euler")


def test_hub_id_and_local_directory_load_with_generic_settings(hub):
    from worker.model import load_model

    commit = hub.commit("stabilityai/sd-turbo", resolve_model("sd-turbo")["revision"])
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        load_model("stabilityai/sd-turbo", "cpu")  # "main" is not in the cache yet
    (hub.root / "models--stabilityai--sd-turbo" / "refs" / "main").parent.mkdir(exist_ok=True)
    (hub.root / "models--stabilityai--sd-turbo" / "refs" / "main").write_text(commit)
    by_id = load_model("stabilityai/sd-turbo", "cpu")
    assert (by_id.revision, by_id.sampler, by_id.preset["kind"]) == (commit, "EulerDiscreteScheduler", "hub")
    local = load_model(str(hub.snapshot("stabilityai/sd-turbo", commit)), "cpu")
    assert (local.revision, local.preset["kind"]) == (None, "local")
    assert run(local)[0].images.shape == (2, 64, 64, 3)


def test_tiny_images_depend_on_the_prompt(env):
    from worker.model import load_model

    model = load_model("tiny", "cpu")
    batch, _ = run(model, prompts=("a red cube", "a blue ball"), seeds=(7, 7))
    assert not np.array_equal(batch.images[0], batch.images[1])


def dry_run(env, model: str, *args: str):
    return cli(
        "producer", "enqueue", "partiprompts", "--path", str(SAMPLE), "--model", model, "--job", "presets",
        "--output", "s3://unused/x", "--dry-run", *args, env=env, check=False,
    )  # fmt: skip


def test_producer_refuses_samplers_and_steps_the_preset_cannot_run(env):
    result = dry_run(env, "pixart-alpha-512", "--sampler", "euler")
    assert result.returncode == 2 and "choose one of dpm-solver, sa-solver" in result.stderr
    result = dry_run(env, "dmd2-sdxl-4step", "--steps", "2")
    assert result.returncode == 2 and "steps must be 4" in result.stderr
    assert "Traceback" not in result.stderr
    assert dry_run(env, "pixart-alpha-512", "--sampler", "sa-solver").returncode == 0


def test_worker_models_lists_presets_with_their_settings(env):
    table = cli("worker", "models", env=env).stdout.partition("\n\n")[0]  # notes follow a blank line
    lines = {line.split()[0]: line for line in table.splitlines()}
    assert set(all_cards()) | builtins() | {"preset"} == set(lines)
    assert lines["pixart-alpha-512"].split()[1:6] == [
        "20",
        "4.5",
        "512x512",
        "float16",
        "dpm-solver,sa-solver",
    ]
    assert "NON-COMMERCIAL" in lines["sdxl-turbo"]


def enqueue(env, output: str, job: str, model: str, *extra: str) -> dict:
    return cli_json(
        "producer", "enqueue", "partiprompts", "--path", str(SAMPLE), "--model", model, "--job", job,
        "--output", output, "--limit", "4", "--shard-size", "4", "--width", "64", "--height", "64",
        *layout_or_files(extra), env=env,
    )  # fmt: skip


def test_worker_records_what_ran_per_job(hub, env, output, tmp_path):
    """A real worker holding PixArt runs one job with SA-Solver and one with the default
    DPM-Solver; the metadata records the sampler, steps, cfg, model and revision that ran."""
    sa = enqueue(env, output, "sa", "pixart-alpha-512", "--sampler", "sa-solver", "--steps", "2")
    dpm = enqueue(env, output, "dpm", "pixart-alpha-512", "--steps", "3", "--guidance", "2")
    run_worker_until_done(
        env, output, "sa", "dpm", model="pixart-alpha-512", log_path=tmp_path / "worker.log",
        timeout=300, exit_timeout=120,
    )  # fmt: skip
    revision = resolve_model("pixart-alpha-512")["revision"]
    for summary, sampler, steps, cfg in ((sa, "sa-solver", 2, 4.5), (dpm, "dpm-solver", 3, 2.0)):
        rows = committed_metadata(summary["job_url"]).to_pylist()
        assert len(rows) == 4
        for row in rows:
            assert (row["sampler"], row["step"], row["cfg"]) == (sampler, steps, cfg)
            assert (row["model"], row["model_revision"]) == ("pixart-alpha-512", revision)
            assert (row["width"], row["height"], row["nsfw"]) == (64, 64, None)


def test_worker_records_nsfw_flags_and_keeps_the_images(hub, env, output, tmp_path):
    job = enqueue(env, output, "lcm", "lcm-lora-sdv1-5")
    run_worker_until_done(
        env, output, "lcm", model="lcm-lora-sdv1-5", log_path=tmp_path / "worker.log",
        timeout=300, exit_timeout=120,
    )  # fmt: skip
    store = open_store(job["job_url"])
    preset = resolve_model("lcm-lora-sdv1-5")
    for row in committed_metadata(job["job_url"]).to_pylist():
        assert (row["nsfw"], row["sampler"], row["step"], row["cfg"]) == (True, "lcm", 4, 1.0)
        base = hub.commit(preset["repo"], preset["revision"])  # SD 1.5 is unpinned: what "main" was
        assert row["model_revision"] == f"{base} lora={preset['lora']['repo']}@{preset['lora']['revision']}"
        pixels = np.asarray(Image.open(io.BytesIO(store.get(row["image_key"]))))
        assert pixels.shape == (64, 64, 3) and pixels.std() > 0
