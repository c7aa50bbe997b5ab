"""What scoring adds per image: the model alone against the model plus a job's scorers.

In one process, on one device, with the worker's own code (``worker.model.load_model``,
``worker.scoring.Scoring``): a model generates batches back to back (after one warm-up
batch), then the same images are scored by each scorer set a job can ask for, as the
worker's device thread does right after each pipeline call; it prints milliseconds per
image and scoring's time as a fraction of generation's. Scorer models are random-weight
replicas written into a temporary hub cache at the commits ``config/scorers.toml`` pins:
``--scorers tiny`` (the tests' replicas) or ``--scorers vit-l14`` (the real sizes: CLIP
ViT-L/14 text and vision towers, the safety checker's ViT-L/14 vision tower, LAION's
768-1024-128-64-16-1 head; random weights cost the same FLOPs). It also prints the bytes
per image of an embeddings object (zstd parquet) at the replica's dimension and at 768.

On a CPU, with tiny models, the fraction says how the worker's code scales with the
model's cost there, and **nothing about a GPU**, where the generator and the scorers have
other relative costs. On a GPU, a random-weight model in a real architecture
(``--model sdxs-512``, built by ``bench/device/models.py``) against ``--scorers vit-l14``
measures the issue's target (scoring adds at most 15 % per image at SDXS-class rates).

    .venv/bin/python bench/scoring.py                                   # tiny, CPU
    .venv/bin/python bench/scoring.py --scorers vit-l14 --batches 2     # real-size scorers, CPU
    .venv/bin/python bench/scoring.py --device cuda --model sdxs-512 --scorers vit-l14 --batch 16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.harness import machine  # noqa: E402
from fewstep.scorers import scoring_spec  # noqa: E402
from worker.scoring import Scoring, embeddings_bytes  # noqa: E402

SETS = {
    "clip": (["clip"], False),
    "clip+aesthetic+nsfw": (["clip,aesthetic,nsfw"], False),
    "clip+aesthetic+nsfw+embeddings": (["clip,aesthetic,nsfw"], True),
}
PROMPTS = [
    "a photo of a cat sitting on a red chair",
    "an astronaut riding a horse on the moon, highly detailed, 4k, trending on artstation",
    "a bowl of soup that looks like a monster, knitted out of wool",
    "two blue cubes next to a green sphere",
]


def load_generator(name: str, device: str, scratch: Path):
    """(model, generation settings): the ``tiny`` preset or a model directory (bench/device/run.py
    passes the one it built, with FEWSTEP_CONFIG_DIR set for it), or a bench/device config
    (random weights) built here."""
    from worker.model import load_model

    if name == "tiny" or Path(name).is_dir():
        model = load_model("tiny", device)
        p = model.preset
        return model, {
            "steps": p["steps"],
            "guidance": p["guidance"],
            "width": p["width"],
            "height": p["height"],
        }
    from bench.device import models

    directory = models.build(name, scratch / name, smoke=False, device=device, dtype="float16")
    model = load_model(str(directory), device)
    return model, models.settings(models.spec(name), smoke=False)


def embedding_bytes_per_image(dim: int, rows: int = 1024) -> float:
    """Bytes per image of an embeddings object of ``rows`` random unit vectors of ``dim``."""
    vectors = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return len(embeddings_bytes(list(range(rows)), vectors.astype(np.float16))) / rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny", help="tiny, a model directory, or a bench/device config")
    parser.add_argument("--scorers", choices=["tiny", "vit-l14"], default="tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--batches", type=int, default=6, help="timed batches (after one warm-up)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the fastest of each counts")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    from tests.replicas import scorers as replicas
    from tests.replicas.hub import offline

    with tempfile.TemporaryDirectory() as scratch, offline(Path(scratch) / "hub"):
        size = replicas.VIT_L14 if args.scorers == "vit-l14" else replicas.TINY
        replicas.build(Path(scratch) / "hub", size)
        model, gen = load_generator(args.model, args.device, Path(scratch))
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
        seeds = list(range(args.batch))
        keep = args.device.startswith("cuda")

        def generate(offset: int):
            return model.generate(prompts, [s + offset for s in seeds], keep_on_device=keep, **gen).images

        generate(0)  # warm-up: lazy set-up is not generation time
        scoring = Scoring(model.device, model.dtype)
        specs = {label: scoring_spec(score, embeddings) for label, (score, embeddings) in SETS.items()}
        images = args.batch * args.batches
        # Rounds of (generate every batch, then score them with each set): on a shared machine
        # the fastest round of each is the least disturbed.
        rounds: dict[str, list[float]] = {"generate": [], **{label: [] for label in specs}}
        for r in range(args.repeat):
            start = time.perf_counter()
            batches = [generate(1000 * (i + 1)) for i in range(args.batches)]
            rounds["generate"].append(1000 * (time.perf_counter() - start) / images)
            for label, spec in specs.items():
                if r == 0:
                    scoring.score(spec, batches[0], prompts)  # loads the models and warms them up
                start = time.perf_counter()
                for batch in batches:
                    scoring.score(spec, batch, prompts)
                rounds[label].append(1000 * (time.perf_counter() - start) / images)
        generate_ms = min(rounds["generate"])
        results = {
            "machine": machine(),
            "device": args.device,
            "model": args.model,
            "size": f"{gen['width']}x{gen['height']}",
            "steps": gen["steps"],
            "scorers": args.scorers,
            "batch": args.batch,
            "images": images,
            "rounds_ms_per_image": {k: [round(v, 3) for v in vs] for k, vs in rounds.items()},
            "generate_ms_per_image": round(generate_ms, 3),
            "sets": {
                label: {
                    "score_ms_per_image": round(min(rounds[label]), 3),
                    "added": round(min(rounds[label]) / generate_ms, 4),
                }
                for label in specs
            },
        }
        results["embedding_bytes_per_image"] = {
            str(size["projection_dim"]): round(embedding_bytes_per_image(size["projection_dim"]), 1),
            "768": round(embedding_bytes_per_image(768), 1),
        }
    print(results["machine"])
    print(
        f"{args.model} on {args.device}, {results['size']}, {gen['steps']} steps, batch {args.batch}, "
        f"{images} images, fastest of {args.repeat} rounds: generation {generate_ms:.1f} ms/image"
    )
    for label, r in results["sets"].items():
        print(f"  + {label:32s} {r['score_ms_per_image']:8.2f} ms/image  (+{100 * r['added']:.1f} %)")
    print(f"embeddings object, bytes per image: {results['embedding_bytes_per_image']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
