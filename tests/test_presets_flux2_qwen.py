"""FLUX.2 [klein] 4B and Qwen-Image-Lightning: what the shared card tests
(``tests/test_presets.py``: pipeline, scheduler config, denoiser calls, size, dtype) do not
cover. The Lightning LoRA is fused into Qwen-Image's transformer, the card's scheduler gives
the denoiser its shift-3 timesteps, the token limit is where these LLM text encoders' pipelines
cut the prompt, and a real worker writes each preset's metadata rows.

Offline, against the tiny replicas of ``tests/replicas/qwen.py`` in a hub cache.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewstep.presets import resolve_model
from tests import replicas
from tests.replicas.hub import offline
from tests.support import committed_metadata, run_worker_until_done
from tests.test_presets import enqueue

KLEIN = "flux2-klein-4b"
LIGHTNING = ("qwen-image-lightning-4step", "qwen-image-lightning-8step")
PRESETS = {"flux2-klein-4b", "qwen-image-lightning-4step", "qwen-image-lightning-8step"}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """This file's replicas only, in a hub cache this process (and its workers) reads offline."""
    root = tmp_path_factory.mktemp("hub")
    with offline(root):
        yield replicas.build(root, PRESETS)


@pytest.mark.parametrize("name", LIGHTNING)
def test_lightning_lora_is_fused_into_the_qwen_image_transformer(hub, name):
    from diffusers import QwenImageTransformer2DModel

    from worker.model import load_model

    preset = resolve_model(name)
    model = load_model(name, "cpu")
    base = QwenImageTransformer2DModel.from_pretrained(
        preset["repo"], subfolder="transformer", revision=preset["revision"]
    )
    fused, original = model.pipeline.transformer.state_dict(), base.state_dict()
    assert fused.keys() == original.keys()  # adapter layers unloaded
    changed = {k for k in original if not torch.equal(fused[k], original[k].float())}
    assert changed and all(k.split(".")[-2] in ("to_q", "to_k", "to_v", "0") for k in changed)
    lora = preset["lora"]
    assert lora["file"].endswith(".safetensors") and f"{preset['steps']}steps" in lora["file"]
    assert f"lora={lora['repo']}@{lora['revision']}" in model.revision


@pytest.mark.parametrize("name", LIGHTNING)
def test_lightning_denoiser_sees_the_cards_shift_3_timesteps(hub, name):
    """The card's config (base_shift = max_shift = ln 3, exponential, no terminal stretch) makes
    the pipeline's sigmas linspace(1, 1/n, n) into 3s / (1 + 2s) at any size; the repository's
    own config (shift_terminal 0.02, size-dependent shift) would give others."""
    from worker.model import load_model

    model = load_model(name, "cpu")
    seen: list[float] = []
    hook = model.pipeline.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(float(kwargs["timestep"].flatten()[0]) * 1000),
        with_kwargs=True,
    )
    try:
        model.generate(["a cat"], [1], steps=model.preset["steps"], guidance=1.0, width=64, height=64)
    finally:
        hook.remove()
    sigmas = np.linspace(1.0, 1.0 / model.preset["steps"], model.preset["steps"])
    assert seen == pytest.approx(list(1000 * 3 * sigmas / (1 + 2 * sigmas)), abs=1e-3)


def _seen_tokens(model, prompt: str) -> int:
    """How many prompt-and-template tokens the pipeline itself passes on for ``prompt``."""
    pipe = model.pipeline
    if type(pipe).__name__ == "QwenImagePipeline":
        # The pipeline drops its system prefix by a token count (34) that holds for the real
        # tokenizer; the replica's byte-level tokenizer needs its own count of that prefix.
        prefix = pipe.prompt_template_encode.split("{}")[0]
        pipe.prompt_template_encode_start_idx = len(pipe.tokenizer(prefix)["input_ids"])
        embeds, _ = pipe.encode_prompt([prompt], device="cpu", max_sequence_length=512)
        return embeds.shape[1]
    masks: list[int] = []
    hook = pipe.text_encoder.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(int(kwargs["attention_mask"].sum())), with_kwargs=True
    )
    try:
        pipe.encode_prompt([prompt], device="cpu", max_sequence_length=512)
    finally:
        hook.remove()
    return masks[0]


@pytest.mark.parametrize("name", [KLEIN, LIGHTNING[0]])
def test_token_limit_is_where_the_pipeline_cuts_the_prompt(hub, name):
    """The replica's tokenizer makes one token per character: a prompt of n letters has n tokens."""
    from worker.model import load_model

    model = load_model(name, "cpu")
    cut = model.preset["max_sequence_length"]
    (short,), limit = model.count_tokens(["a cat"])
    template = cut - limit  # tokens the counter expects the pipeline's template to add
    assert short == 5 and 0 < template < 40
    assert _seen_tokens(model, "a cat") == short + template  # the same template as the pipeline's
    for n in (limit, limit + 1):  # fits exactly; one token over
        (count,), _ = model.count_tokens(["a" * n])
        assert count == n
        seen = _seen_tokens(model, "a" * n)
        assert seen == min(n + template, cut)
        assert (seen < n + template) == (count > limit)  # cut by the pipeline == `truncated`


@pytest.mark.parametrize("name", [KLEIN, LIGHTNING[0]])
def test_worker_writes_metadata_rows_for_the_preset(hub, env, output, tmp_path, name):
    """A real worker holding the preset commits rows saying what ran, with token counts.

    One Lightning preset only (a worker run costs ~40 s here): the 8-step one differs in its
    LoRA file and step count, which the tests above check through the same loading code."""
    job = enqueue(env, output, "llm", name)
    run_worker_until_done(
        env, output, "llm", model=name, log_path=tmp_path / "worker.log", timeout=300, exit_timeout=120
    )
    preset = resolve_model(name)
    rows = committed_metadata(job["job_url"]).to_pylist()
    assert len(rows) == 4
    for row in rows:
        assert (row["model"], row["sampler"]) == (name, preset["sampler"])
        assert (row["step"], row["cfg"]) == (preset["steps"], preset["guidance"])
        assert (row["width"], row["height"], row["nsfw"]) == (64, 64, None)
        assert row["model_revision"].split()[0] == hub.commit(preset["repo"], preset["revision"])
        if "lora" in preset:
            assert f"lora={preset['lora']['repo']}@{preset['lora']['revision']}" in row["model_revision"]
        assert row["prompt_tokens"] == len(row["prompt"].encode()) and row["truncated"] is False
