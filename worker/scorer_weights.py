"""Scorer weights published only as pickles, converted once to safetensors.

LAION's aesthetic head (``sac+logos+ava1-l14-linearMSE.pth``): ``worker scorers
convert-aesthetic`` (:func:`convert_aesthetic`), for ``--score aesthetic=DIR``.

HPS v2.1's OpenCLIP checkpoint, as a transformers ``CLIPModel`` (:func:`converted_scorer`):
xswu/HPSv2 publishes ``HPS_v2.1_compressed.pt`` only: a pickle of ``{"state_dict": ...}``
holding an OpenCLIP ViT-H-14. A worker never unpickles it unless it was started with
``--allow-pickle-conversion`` (:mod:`worker.pickle_weights`: torch >= 2.6, the file's
sha256 equal to the one ``config/scorers.toml`` pins). It is then read once with
``torch.load(weights_only=True)`` and written as a transformers CLIP directory
(``config.json``, ``model.safetensors``, the tokenizer and ``preprocessor_config.json`` of the
scorer's processor repository) under ``<FEWSTEP_MODEL_CACHE>/converted/<sha256>/``; that
directory is what loads, then and later, and also works as ``--score hpsv2=DIR``.

The two layouts hold the same network: OpenCLIP's ``VisionTransformer`` and ``TextTransformer``
(pre-LayerNorm residual blocks, GELU, class-token and argmax-token pooling, projections as
``x @ proj``) are transformers' ``CLIPVisionTransformer`` and ``CLIPTextTransformer`` with
``in_proj`` split into q/k/v and the projections transposed, as transformers' own
``convert_clip_original_pytorch_to_hf.py`` maps them. Head counts are not in the weights:
``architecture`` gives OpenCLIP's head widths (ViT-H-14: 80 vision, 64 text).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fewstep import UserError
from worker import pickle_weights

_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def _blocks(state: dict, source: str, target: str) -> dict:
    """One tower's residual blocks, OpenCLIP names to transformers'."""
    out = {}
    layers = sorted({int(k[len(source) :].split(".")[0]) for k in state if k.startswith(source)})
    for i in layers:
        a, b = f"{source}{i}.", f"{target}{i}."
        for name, new in _BLOCK.items():
            for kind in ("weight", "bias"):
                out[f"{b}{new}.{kind}"] = state[f"{a}{name}.{kind}"]
        for kind in ("weight", "bias"):
            q, k, v = state[f"{a}attn.in_proj_{kind}"].chunk(3, dim=0)
            out.update({f"{b}self_attn.q_proj.{kind}": q, f"{b}self_attn.k_proj.{kind}": k,
                        f"{b}self_attn.v_proj.{kind}": v})  # fmt: skip
    return out


def clip_state(state: dict) -> dict:
    """An OpenCLIP CLIP's state dict in transformers' ``CLIPModel`` names."""
    out = {
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].T,
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].T,
        "logit_scale": state["logit_scale"],
    }
    out.update(_blocks(state, "transformer.resblocks.", "text_model.encoder.layers."))
    out.update(_blocks(state, "visual.transformer.resblocks.", "vision_model.encoder.layers."))
    return {k: v.float().contiguous() for k, v in out.items()}


def clip_config(state: dict, architecture: dict[str, int], tokenizer) -> Any:
    """The ``CLIPConfig`` of an OpenCLIP state dict (shapes) and its head widths."""
    from transformers import CLIPConfig

    def tower(prefix: str, head_width: int) -> dict[str, Any]:
        blocks = f"{prefix}resblocks."
        width = state[f"{blocks}0.ln_1.weight"].shape[0]
        layers = len({k[len(blocks) :].split(".")[0] for k in state if k.startswith(blocks)})
        return {
            "hidden_size": width,
            "intermediate_size": state[f"{prefix}resblocks.0.mlp.c_fc.weight"].shape[0],
            "num_hidden_layers": layers,
            "num_attention_heads": width // head_width,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-5,
        }

    patch = state["visual.conv1.weight"].shape[-1]
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text = {
        **tower("transformer.", architecture["text_head_width"]),
        "vocab_size": state["token_embedding.weight"].shape[0],
        "max_position_embeddings": state["positional_embedding"].shape[0],
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {**tower("visual.transformer.", architecture["vision_head_width"]), "image_size": patch * grid,
              "patch_size": patch}  # fmt: skip
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=state["visual.proj"].shape[1])


def weights_only_state(path: str) -> dict:
    """The state dict of a torch pickle, read with ``torch.load(weights_only=True)`` (tensors and
    plain containers only, never code); ``{"state_dict": ...}`` unwrapped, ``module.`` prefixes
    (a DistributedDataParallel wrapper's) removed."""
    import torch

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except Exception as e:  # not a torch file, or one that needs code to unpickle
        raise UserError(f"{path}: not a weights-only torch file ({type(e).__name__})") from None
    state = saved.get("state_dict", saved) if isinstance(saved, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def convert(source: str, target: Path, architecture: dict[str, int], processor: str, label: str) -> Path:
    """Write the CLIP directory of the OpenCLIP checkpoint ``source`` at ``target`` (atomically),
    with the tokenizer and image preprocessing of the local directory ``processor``."""
    from transformers import CLIPModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(processor)
    state = weights_only_state(source)
    try:
        config = clip_config(state, architecture, tokenizer)
        model = CLIPModel(config)
        weights = clip_state(state)
    except KeyError as e:
        raise UserError(f"scorer {label}: {Path(source).name} is not an OpenCLIP CLIP (no {e})") from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise UserError(
            f"scorer {label}: converted weights do not fit CLIPModel ({(missing + unexpected)[:3]})"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".clip-", dir=target.parent))
    try:
        model.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)
        shutil.copyfile(
            os.path.join(processor, "preprocessor_config.json"), scratch / "preprocessor_config.json"
        )
        (scratch / "source.json").write_text(
            json.dumps({"converted_from": label, "architecture": architecture})
        )
        try:
            os.rename(scratch, target)
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise  # another worker won the race only if its conversion is there
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def converted_scorer(entry: dict[str, Any], download, processor: str) -> str:
    """The local CLIP directory of a pickle scorer ``entry`` (the job spec's): converted before,
    or now on this worker's opt-in; one line naming the opt-in when it is not given.
    ``download(filename)`` fetches a file of the entry's repository at its revision."""
    sha = entry["sha256"]
    target = pickle_weights.converted_dir(sha)
    if (target / "model.safetensors").is_file():
        return str(target)
    label = f"{entry['model']}/{entry['file']}"
    what = f"{label} is published as a pickle only"
    if not pickle_weights.allowed():
        raise UserError(
            f"{what}; start the worker with {pickle_weights.OPT_IN} to convert it once to safetensors "
            "(read with torch.load weights_only=True), or give --score NAME=DIR"
        )
    if pickle_weights._torch_version() < pickle_weights.MIN_TORCH:
        raise UserError(f"{what}; converting it needs torch >= 2.6 (CVE-2025-32434)")
    path = download(entry["file"])
    actual = pickle_weights._sha256(path)
    if actual != sha:
        raise UserError(f"{label} has sha256 {actual}, not the pinned {sha}; refusing to convert it")
    return str(convert(path, target, entry["architecture"], processor, label))


def convert_aesthetic(source: str, directory: str) -> str:
    """Convert LAION's pickled aesthetic head (``sac+logos+ava1-l14-linearMSE.pth``) to
    ``DIRECTORY/model.safetensors``, for ``--score aesthetic=DIRECTORY``; returns the file.

    ``torch.load(weights_only=True)`` unpickles tensors and plain containers only, never code.
    """
    from safetensors.torch import save_file

    state = weights_only_state(source)
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, "model.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, target)
    from worker.scoring import AestheticHead

    AestheticHead(target, "cpu")  # refuses what would not load as a head
    return target
