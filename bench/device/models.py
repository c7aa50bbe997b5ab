"""Random-weight models in the real architectures, saved as local diffusers directories.

Each ``configs/<name>.json`` holds a pipeline's component configs as its repository has them
(``config``; where it came from in ``source``) and tiny stand-ins for the CPU smoke run
(``smoke``). Nothing is downloaded: weights are random (they cost the same FLOPs as trained
ones), tokenizers are the byte-level CLIP vocabulary of the ``tiny`` preset. ``worker
--model <directory>`` then loads the result exactly as it loads any local pipeline; a copy
of ``config/`` per model (``FEWSTEP_CONFIG_DIR``) gives it the settings a preset would
(steps, guidance, size, dtype) and points ``--vae tiny`` at TAESD / TAESDXL built here too.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
#: AutoencoderTiny's defaults are TAESD's architecture; TAESDXL has the same one.
TINY_VAES = {"sd": "taesd", "sdxl": "taesdxl"}


def spec(name: str) -> dict[str, Any]:
    """The model's spec from ``configs/<name>.json``."""
    return json.loads((CONFIGS / f"{name}.json").read_text())


def settings(model: dict[str, Any], smoke: bool) -> dict[str, Any]:
    """Size, steps and guidance the model runs at (the smoke run's own size where it has one)."""
    picked = {k: model[k] for k in ("width", "height", "steps", "guidance")}
    if smoke:
        picked.update(model.get("smoke") or {})
    return picked


def _component(name: str, part: dict[str, Any], smoke: bool):
    import diffusers
    import transformers

    config = part["smoke"] if smoke and "smoke" in part else part["config"]
    cls = getattr(diffusers, part["class"], None) or getattr(transformers, part["class"])
    if name == "scheduler":
        return cls.from_config(config)
    if issubclass(cls, transformers.PreTrainedModel):
        return cls(cls.config_class(**config))
    return cls(**config)


def build(name: str, directory: Path, *, smoke: bool, device: str, dtype: str) -> Path:
    """``configs/<name>.json`` as a saved diffusers pipeline in ``directory`` (kept if already there)."""
    import diffusers
    import torch

    from worker.tiny import clip_tokenizer

    if (directory / "model_index.json").is_file():
        return directory
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    model = spec(name)
    parts: dict[str, Any] = {}
    for part_name, part in model["components"].items():
        if part_name == "scheduler":  # a scheduler keeps its tables on the CPU
            parts[part_name] = _component(part_name, part, smoke)
            continue
        with torch.device(device):  # random init on the GPU: seconds, where the CPU takes minutes
            parts[part_name] = _component(part_name, part, smoke).to(getattr(torch, dtype))
    if model.get("tokenizer") == "t5":
        tokenizer = t5_tokenizer()
    else:
        with tempfile.TemporaryDirectory() as scratch:
            tokenizer = clip_tokenizer(Path(scratch))
    parts["tokenizer"] = tokenizer
    if "text_encoder_2" in parts:
        parts["tokenizer_2"] = tokenizer
    pipeline_cls = getattr(diffusers, model["pipeline"])
    if model["pipeline"] == "StableDiffusionPipeline":
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline = pipeline_cls(**parts).to("cpu")  # saved from host memory
    partial = directory.with_name(directory.name + ".partial")
    pipeline.save_pretrained(partial, safe_serialization=True)
    partial.rename(directory)
    return directory


def t5_tokenizer():
    """A T5 (Unigram) tokenizer over letters and digits: every prompt tokenizes, no SentencePiece
    model or download needed. The encoder's cost is set by the sequence length, not the vocabulary."""
    import string

    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(p + c, -3.0 - len(p)) for c in string.ascii_lowercase + string.digits for p in ("\u2581", "")]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_tiny_vae(directory: Path, *, smoke: bool) -> Path:
    """TAESD's architecture (AutoencoderTiny's defaults) with random weights, in float32 as
    madebyollin's repositories ship it (the worker casts it to the model's dtype)."""
    from diffusers import AutoencoderTiny

    if (directory / "config.json").is_file():
        return directory
    smoke_config = spec("sdxs-512")["components"]["vae"]["smoke"]
    AutoencoderTiny(**(smoke_config if smoke else {})).save_pretrained(directory, safe_serialization=True)
    return directory


def config_dir(directory: Path, model: dict[str, Any], smoke: bool, tiny_vaes: dict[str, str]) -> Path:
    """A copy of the repository's ``config/`` whose ``[generic_model]`` runs this model as its
    preset would, and whose ``[tiny_vae]`` points at the local TAESD / TAESDXL."""
    import sys

    sys.path.insert(0, str(HERE.parent.parent))
    from tests.support import config_dir as edited_config

    directory.mkdir(parents=True, exist_ok=True)
    run = settings(model, smoke)
    generic = {**run, "dtype": "float16"}
    return Path(edited_config(directory, generic_model=generic, tiny_vae=tiny_vaes))
