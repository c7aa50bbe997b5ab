"""Scores and embeddings of generated images, computed on the device thread.

A job asks for scorers with ``producer enqueue --score clip,aesthetic,nsfw,pickscore,hpsv2`` and for
embeddings with ``--embeddings``; its spec names each scorer's model and revision
(:mod:`fewstep.scorers`). Right after the pipeline call, on the thread that owns the
pipeline, the batch's decoded images (the uint8 tensor out of the pipeline, still on the
device on CUDA; never encoded and decoded again) are scored in one batch:

- ``clip_score`` = 100 × max(cos(image embedding, prompt embedding), 0), the CLIPScore of
  torchmetrics, with a ``transformers`` ``CLIPModel`` (the prompt cut at the CLIP text
  encoder's 77 tokens, as CLIPScore does);
- ``aesthetic``: the LAION improved aesthetic predictor, its layers applied in order to the
  L2-normalised CLIP ViT-L/14 image embedding as LAION's own code does (the published head
  is Linear 768→1024→128→64→16→1 with dropout between, no activations, so at inference
  it is that chain of affine maps; any chain of ``*.weight``/``*.bias`` linears loads);
- ``pickscore`` and ``hpsv2`` (:data:`PREFERENCE`): fine-tuned CLIPs' cos(image, prompt), times
  the logit scale for PickScore as its card does; their tokenizer and preprocessing from the
  processor repository the spec names; HPS v2.1's pickle loads through its opt-in conversion
  (:mod:`worker.scorer_weights`);
- ``nsfw_score``: from the Stable Diffusion safety checker's concept similarities. The
  checker flags an image when, for some concept i, cos(image, concept_i) > t_i − a (t_i
  the concept's threshold, a = 0.01 when a "special care" concept matched, else 0). The
  score is max_i cos_i / (t_i − a), clipped to [0, 1]: how close the image comes to the
  nearest threshold; 1 when the checker would flag the image (it rounds its margins to 3
  decimals first: a margin under 0.0005 scores 1 unflagged). Nothing is blanked.

Each model preprocesses with its own ``preprocessor_config.json`` (resize, centre crop,
rescale, mean/std), done in torch on the tensor (:class:`ImageProcessing`). Models load
lazily, once per worker, on the device thread at the first batch of a job that asks for
them, and are kept (keyed by model and revision) for later jobs; clip, aesthetic and the
embeddings share one CLIP when they name the same one. Every tokenizer here is this
module's own instance, used by the device thread only (see ``worker.loaded_model.TokenCounter``
for why a tokenizer must never be shared between threads).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fewstep import UserError
from fewstep.contract import embeddings_key, embeddings_schema
from fewstep.scorers import scoring_models
from fewstep.storage import Store
from worker import tiny_scorers

log = logging.getLogger("fewstep.worker")

# PIL's resample codes in preprocessor configs → torch interpolation modes.
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def _pair(value: Any, key: str = "height") -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value, value
    return int(value[key]), int(value["width"] if key == "height" else value[key])


@dataclass
class ImageProcessing:
    """A model's image preprocessing, read from its ``preprocessor_config.json`` and done in
    torch on a uint8 (N, H, W, 3) tensor, step for step as transformers' CLIPImageProcessor
    does it: resize (shortest edge, or to height × width), centre crop, rescale, normalise.
    Resizing uses torch's antialiased kernels (PIL's bicubic filter), width then height, each
    pass rounded to whole levels as PIL's uint8 resize gives them."""

    shortest_edge: int | None
    size: tuple[int, int] | None
    resample: str
    crop: tuple[int, int] | None
    rescale: float | None
    mean: list[float] | None
    std: list[float] | None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ImageProcessing:
        """The processing a ``preprocessor_config.json`` describes."""
        size = config.get("size") if config.get("do_resize", True) else None
        shortest = size if isinstance(size, int) else (size or {}).get("shortest_edge")
        resample = config.get("resample", 3)
        if resample not in _RESAMPLE:
            raise UserError(f"image processor resample {resample} is not supported (use 0, 2 or 3)")
        normalize = config.get("do_normalize", True)
        return cls(
            shortest_edge=int(shortest) if shortest else None,
            size=_pair(size) if size and not shortest else None,
            resample=_RESAMPLE[resample],
            crop=_pair(config.get("crop_size")) if config.get("do_center_crop", True) else None,
            rescale=float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else None,
            mean=list(config["image_mean"]) if normalize else None,
            std=list(config["image_std"]) if normalize else None,
        )

    def target(self, height: int, width: int) -> tuple[int, int] | None:
        """The (height, width) the resize step gives an image of ``height`` × ``width``."""
        if self.shortest_edge:
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(self.shortest_edge * long / short)
            return (new_long, self.shortest_edge) if width <= height else (self.shortest_edge, new_long)
        return self.size

    def __call__(self, images):
        """Pixel values (N, 3, h, w) float32 of uint8 images (N, H, W, 3), on their device."""
        import torch
        import torch.nn.functional as F

        x = images.permute(0, 3, 1, 2).float()
        target = self.target(x.shape[2], x.shape[3])
        if target and tuple(target) != tuple(x.shape[2:]):
            # PIL resizes in two passes, width then height, each rounded to uint8 (clipping a
            # bicubic's overshoot): so does this, or noisy images differ by several levels.
            antialias = self.resample != "nearest"
            extra = {"align_corners": False} if antialias else {}
            for size in ((x.shape[2], target[1]), tuple(target)):
                if tuple(size) != tuple(x.shape[2:]):
                    x = F.interpolate(x, size=size, mode=self.resample, antialias=antialias, **extra)
                    x = x.round().clamp(0, 255)
        if self.crop:
            x = _center_crop(x, *self.crop)
        if self.rescale:
            x = x * self.rescale
        if self.mean is not None:
            mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x


def _center_crop(x, height: int, width: int):
    """transformers' centre crop: offsets rounded down; zero padding where the image is smaller."""
    import torch.nn.functional as F

    h, w = x.shape[2], x.shape[3]
    if h < height or w < width:
        ph, pw = max(height - h, 0), max(width - w, 0)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        h, w = x.shape[2], x.shape[3]
    top, left = (h - height) // 2, (w - width) // 2
    return x[:, :, top : top + height, left : left + width]


# --- loading ------------------------------------------------------------------------------


def _label(model: str, revision: str | None) -> str:
    return f"{model}@{revision}" if revision else model


def _file(model: str, revision: str | None, filename: str) -> str:
    """A file of a scorer's model: in its local directory, or from the hub (cache) at ``revision``."""
    model = tiny_scorers.location(model, revision)
    if os.path.isdir(model):
        path = os.path.join(model, filename)
        if not os.path.isfile(path):
            raise UserError(f"scorer model {model} has no {filename}")
        return path
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(model, filename, revision=revision)
    except Exception as e:  # offline, missing file, unknown repo: one line for the attempt record
        what = f"scorer model {_label(model, revision)}"
        raise UserError(f"{what}: cannot get {filename} ({_why(e)})") from None


def _why(e: Exception) -> str:
    """Why a hub file could not be had, in words: the usual cause first."""
    name = type(e).__name__
    if name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or "offline" in str(e).lower():
        return "not in the Hugging Face cache and the hub is not reachable"
    return name


def _from_pretrained(cls, model: str, revision: str | None, **kwargs):
    # Weights as safetensors only (a tokenizer has none), never remote code.
    model = tiny_scorers.location(model, revision)
    source = {"revision": revision} if revision and not os.path.isdir(model) else {}
    if hasattr(cls, "config_class"):  # a model, not a tokenizer
        kwargs["use_safetensors"] = True
    try:
        return cls.from_pretrained(model, **source, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot load scorer model {_label(model, revision)}: {first}") from None


#: A CLIP processor's files: the tokenizer's and the image preprocessing's.
PROCESSOR_FILES = [
    "preprocessor_config.json",
    "tokenizer*",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
]


def _directory(model: str, revision: str | None, patterns: list[str]) -> str:
    """A local directory holding a scorer repository's files that match ``patterns``."""
    model = tiny_scorers.location(model, revision)
    if os.path.isdir(model):
        return model
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model, revision=revision, allow_patterns=patterns)
    except Exception as e:  # offline, unknown repo: one line for the attempt record
        raise UserError(f"scorer model {_label(model, revision)}: cannot get its files ({_why(e)})") from None


def _processing(model: str, revision: str | None) -> ImageProcessing:
    with open(_file(model, revision, "preprocessor_config.json")) as f:
        return ImageProcessing.from_config(json.load(f))


def _features(output):
    # transformers 5 returns an output object (pooler_output projected), 4 a tensor.
    return output if not hasattr(output, "pooler_output") else output.pooler_output


class Clip:
    """A CLIP model with its own tokenizer and image processing (device thread only); those
    two from ``processor`` ({"model", "revision"}) where the model's card takes them elsewhere."""

    def __init__(self, model: str, revision: str | None, device: str, dtype, processor: dict | None = None):
        from transformers import CLIPModel, CLIPTokenizer

        self.label = _label(model, revision)
        self.model = _from_pretrained(CLIPModel, model, revision, dtype=dtype).to(device).eval()
        source = (processor["model"], processor["revision"]) if processor else (model, revision)
        self.tokenizer = _from_pretrained(CLIPTokenizer, *source)
        self.processing = _processing(*source)
        positions = self.model.config.text_config.max_position_embeddings
        self.max_length = min(int(self.tokenizer.model_max_length), int(positions))
        self.dim = int(self.model.config.projection_dim)

    def image_embeddings(self, images):
        """L2-normalised image embeddings (float32) of uint8 (N, H, W, 3) images."""
        pixels = self.processing(images).to(self.model.dtype)
        features = _features(self.model.get_image_features(pixel_values=pixels)).float()
        return features / features.norm(dim=-1, keepdim=True)

    def text_embeddings(self, prompts: list[str]):
        """L2-normalised text embeddings (float32), each prompt cut at the text encoder's length."""
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.model.device)
        features = _features(self.model.get_text_features(**tokens)).float()
        return features / features.norm(dim=-1, keepdim=True)


#: Preference scorers, each a fine-tuned CLIP: the score is cos(image, prompt), times the
#: model's logit scale where its authors' scoring code multiplies by it (PickScore's card does,
#: HPS v2's img_score.py does not).
PREFERENCE = {"pickscore": True, "hpsv2": False}

_INDEX = re.compile(r"(\d+)")


class AestheticHead:
    """The LAION improved aesthetic predictor's head: its linear layers in order (no activations)."""

    def __init__(self, path: str, device: str):
        from safetensors.torch import load_file

        state = load_file(path, device=device)
        names = sorted(
            (k[: -len(".weight")] for k, v in state.items() if k.endswith(".weight") and v.ndim == 2),
            key=lambda n: [int(p) if p.isdigit() else p for p in _INDEX.split(n)],
        )
        if not names:
            raise UserError(f"aesthetic head {path}: no linear layers in the file")
        self.layers = [(state[f"{n}.weight"].float(), state.get(f"{n}.bias")) for n in names]
        for (a, _), (b, _) in zip(self.layers, self.layers[1:], strict=False):
            if a.shape[0] != b.shape[1]:
                shapes = f"{tuple(a.shape)}, {tuple(b.shape)}"
                raise UserError(f"aesthetic head {path}: layer shapes {shapes} do not chain")
        if self.layers[-1][0].shape[0] != 1:
            outputs = self.layers[-1][0].shape[0]
            raise UserError(f"aesthetic head {path}: the last layer gives {outputs} values, not 1")
        self.dim = int(self.layers[0][0].shape[1])

    def __call__(self, embeddings):
        x = embeddings.float()
        for weight, bias in self.layers:
            x = x @ weight.T + (bias.float() if bias is not None else 0)
        return x[:, 0]


class SafetyConcepts:
    """The Stable Diffusion safety checker's concept similarities as a score (see the module docs)."""

    def __init__(self, model: str, revision: str | None, device: str, dtype):
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

        checker = _from_pretrained(StableDiffusionSafetyChecker, model, revision, dtype=dtype)
        self.checker = checker.to(device).eval()
        self.processing = _processing(model, revision)

    def __call__(self, images):
        c = self.checker
        pixels = self.processing(images).to(c.dtype)
        embeds = c.visual_projection(c.vision_model(pixels)[1]).float()
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)

        def cosines(concepts):
            concepts = concepts.float()
            return embeds @ (concepts / concepts.norm(dim=-1, keepdim=True)).T

        special = cosines(c.special_care_embeds) - c.special_care_embeds_weights.float()
        adjustment = (special > 0).any(dim=1, keepdim=True).float() * 0.01
        thresholds = (c.concept_embeds_weights.float() - adjustment).clamp(min=1e-6)
        return (cosines(c.concept_embeds) / thresholds).max(dim=1).values.clamp(0, 1)


# --- a job's scorers ---------------------------------------------------------------------


@dataclass
class BatchScores:
    """What scoring gave one batch: per-row values by metadata column, embeddings, time."""

    columns: dict[str, list[float]]
    embeddings: np.ndarray | None  # (rows, dim) float16, L2-normalised
    seconds: float


class Scoring:
    """The scorer models this worker has loaded, reused across jobs; device thread only."""

    def __init__(self, device: str, dtype: str = "float32"):
        self.device = device
        self.dtype_name = dtype
        self._models: dict[tuple[str, str, str | None], Any] = {}

    def _dtype(self):
        import torch

        return getattr(torch, self.dtype_name) if self.device.startswith("cuda") else torch.float32

    def _load(self, kind: str, model: str, revision: str | None, file: str | None = None, processor=None):
        key = (kind, model, revision)
        if key not in self._models:
            start = time.perf_counter()
            if kind == "clip":
                loaded: Any = Clip(model, revision, self.device, self._dtype())
            elif kind in PREFERENCE:
                loaded = Clip(model, revision, self.device, self._dtype(), processor)
            elif kind == "aesthetic":
                loaded = AestheticHead(_file(model, revision, file or "model.safetensors"), self.device)
            else:
                loaded = SafetyConcepts(model, revision, self.device, self._dtype())
            self._models[key] = loaded
            seconds = time.perf_counter() - start
            log.info("loaded %s scorer %s in %.1fs", kind, _label(model, revision), seconds)
        return self._models[key]

    def _converted(self, entry: dict[str, Any]) -> tuple[str, None]:
        """(directory, None) of a pickle scorer's conversion (:mod:`worker.scorer_weights`)."""
        key = ("converted", entry["model"], entry["sha256"])
        if key not in self._models:
            from worker.scorer_weights import converted_scorer

            p = entry["processor"]
            processor = _directory(p["model"], p["revision"], PROCESSOR_FILES)
            download = lambda filename: _file(entry["model"], entry["revision"], filename)  # noqa: E731
            self._models[key] = converted_scorer(entry, download, processor)
        return self._models[key], None

    def prepare(self, scoring: dict[str, Any] | None) -> None:
        """Load every model the job's ``scoring`` names (once per worker); one that cannot be
        loaded fails with one line naming its role (``aesthetic's backbone``) and its option."""
        for m in scoring_models(scoring):
            if m["kind"] == "processor":
                continue  # loaded with its scorer
            try:
                if m.get("pickle"):
                    self._load(m["kind"], *self._converted(scoring["scorers"][m["role"]]))
                else:
                    self._load(m["kind"], m["model"], m["revision"], m["file"], m.get("processor"))
            except UserError as e:
                raise UserError(
                    f"{m['role']}: {e}; give the job another ({m['option']}, or --score tiny to try "
                    "scores offline), or put it in this worker's Hugging Face cache"
                ) from None

    def score(self, scoring: dict[str, Any] | None, images, prompts: list[str]) -> BatchScores | None:
        """Scores (and embeddings) of a batch for the job's ``scoring`` spec; None when it has none.

        ``images``: the pipeline's uint8 (N, H, W, 3) output, a device tensor or a numpy array.
        """
        if not scoring:
            return None
        import torch

        self.prepare(scoring)  # loads at the job's first batch; errors name the scorer's role

        start = time.perf_counter()
        scorers = scoring.get("scorers") or {}
        columns: dict[str, list[float]] = {}
        with torch.inference_mode():
            x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
            x = x.to(self.device)
            embedded: dict[tuple[str, str | None], Any] = {}

            def image_embeddings(model: str, revision: str | None):
                if (model, revision) not in embedded:
                    embedded[(model, revision)] = self._load("clip", model, revision).image_embeddings(x)
                return embedded[(model, revision)]

            if "clip" in scorers:
                s = scorers["clip"]
                text = self._load("clip", s["model"], s["revision"]).text_embeddings(prompts)
                cos = (image_embeddings(s["model"], s["revision"]) * text).sum(dim=-1)
                columns[s["column"]] = (100 * cos.clamp(min=0)).cpu().tolist()
            if "aesthetic" in scorers:
                s = scorers["aesthetic"]
                head = self._load("aesthetic", s["model"], s["revision"], s.get("file"))
                backbone = image_embeddings(s["backbone"]["model"], s["backbone"]["revision"])
                if backbone.shape[1] != head.dim:
                    raise UserError(
                        f"aesthetic head reads {head.dim}-d embeddings, backbone gives {backbone.shape[1]}-d"
                    )
                columns[s["column"]] = head(backbone).cpu().tolist()
            for name, scaled in PREFERENCE.items():
                if name in scorers:
                    s = scorers[name]
                    if s.get("pickle"):
                        model = self._load(name, *self._converted(s))
                    else:
                        model = self._load(name, s["model"], s["revision"], processor=s.get("processor"))
                    cos = (model.image_embeddings(x) * model.text_embeddings(prompts)).sum(dim=-1)
                    scale = model.model.logit_scale.exp().float() if scaled else 1.0
                    columns[s["column"]] = (scale * cos).cpu().tolist()
            if "nsfw" in scorers:
                s = scorers["nsfw"]
                columns[s["column"]] = self._load("nsfw", s["model"], s["revision"])(x).cpu().tolist()
            vectors = None
            if scoring.get("embeddings"):
                m = scoring["embedding_model"]
                vectors = image_embeddings(m["model"], m["revision"]).to(torch.float16).cpu().numpy()
        return BatchScores(columns, vectors, time.perf_counter() - start)


def embeddings_bytes(row_ids: list[int], matrix: np.ndarray) -> bytes:
    """An embeddings object (:func:`fewstep.contract.embeddings_schema`) as parquet bytes."""
    dim = matrix.shape[1]
    flat = pa.array(np.ascontiguousarray(matrix, dtype=np.float16).reshape(-1), type=pa.float16())
    table = pa.table(
        {"row_id": pa.array(row_ids, pa.int64()), "embedding": pa.FixedSizeListArray.from_arrays(flat, dim)},
        schema=embeddings_schema(dim),
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def write_embeddings(
    store: Store, shard: int, attempt_id: str, row_ids: list[int], matrix: np.ndarray
) -> None:
    """Write one attempt's embeddings object; before its commit, so a commit implies its embeddings."""
    store.put(embeddings_key(shard, attempt_id), embeddings_bytes(row_ids, matrix))
