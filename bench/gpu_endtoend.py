"""GPU end to end: model-only vs end-to-end images/s for a real model on one GPU.

For the SD2.1-base architecture (``sdxs-512-0.9``) at 512x512 with AutoencoderTiny,
float16 and the measured best batch size, it runs, in the same process run:

- **model-only**: the tuned pipeline's batches back to back on the GPU, warm-up excluded;
- **end-to-end**: ``producer enqueue`` + a real ``worker`` process with the same options +
  local Redis and SeaweedFS: once with JPEG encoded on the GPU (nvJPEG), once with PNG
  encoded on the CPU;

and prints images/s and the ratio (goals: >= 300 img/s end to end on one H100, and
end-to-end >= 0.9 x model-only). Needs the model's weights in the local Hugging Face
cache, torchvision for nvJPEG, and a GPU; for an offline GPU host without the weights,
``bash bench/device/run.sh`` measures the same with random weights in the real architectures.

``--smoke`` runs the same path on the CPU with the ``tiny`` model and a few images, to
check the script itself on a machine without a GPU; its numbers say nothing about GPUs.

    .venv/bin/python bench/gpu_endtoend.py                       # on a GPU host
    .venv/bin/python bench/gpu_endtoend.py --smoke               # anywhere
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from harness import REPO, local_services, machine, run_job, write_prompts

from worker import speed
from worker.model import load_model


def model_only(model, batch_size: int, images: int) -> float:
    """Images/s of the tuned model alone (its warm-up done before)."""
    batches = images // batch_size
    start = time.perf_counter()
    for _ in range(batches):
        speed.run_batch(model, batch_size)
    return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    """Model-only, then end to end with JPEG on the GPU and PNG on the CPU."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sdxs-512-0.9")
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--batch-size", default="auto", help="N, or auto (measured as the worker does).")
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, tiny model, few images: checks the script."
    )
    args = parser.parse_args()
    if args.smoke:
        args.model, args.images, args.shard_size = "tiny", min(args.images, 64), min(args.shard_size, 16)
        device, options, encoder = "cpu", speed.SpeedOptions(), "cpu"
        flags = ["--device", "cpu"]
    else:
        device, options, encoder = "cuda", speed.SpeedOptions(dtype="float16", vae="tiny"), "gpu"
        flags = ["--device", "cuda", "--dtype", "float16", "--vae", "tiny"]

    print(machine())
    model = load_model(args.model, device)
    applied = speed.apply(model, options)
    if args.batch_size == "auto":
        batch_size = speed.auto_batch_size(model, limit=min(128, args.shard_size))
    else:
        batch_size = int(args.batch_size)
    warm = speed.warm_up(model, batch_size, 2)
    alone = model_only(model, batch_size, args.images)
    settings = ", ".join(f"{k}={v}" for k, v in applied.items()) or "as loaded"
    print(f"{args.model} on {device} ({settings}), batch size {batch_size}: "
          f"model-only {alone:.1f} img/s (warm-up {warm:.1f}s excluded)")  # fmt: skip
    del model
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()

    with local_services() as (svc, env), tempfile.TemporaryDirectory() as scratch:
        prompts = write_prompts(Path(scratch) / "prompts.tsv", args.images)
        logs = REPO / ".fewstep" / "bench-logs"
        logs.mkdir(parents=True, exist_ok=True)
        for label, job_args, jpeg_encoder in (
            (f"JPEG q90 on the {'GPU' if encoder == 'gpu' else 'CPU'}", ["--format", "jpeg"], encoder),
            ("PNG level 1 on the CPU", ["--format", "png", "--png-level", "1"], "cpu"),
        ):
            run, first = run_job(
                env,
                prompts,
                model=args.model,
                images=args.images,
                shard_size=args.shard_size,
                job_args=job_args,
                worker_args=[*flags, "--batch-size", str(batch_size), "--jpeg-encoder", jpeg_encoder],
                log_path=logs / f"gpu-{label.split()[0].lower()}.log",
                storage_pid=svc.weed_pid,
            )
            idle = sum(s.gpu_idle_fraction * s.seconds for s in run.stats) / sum(s.seconds for s in run.stats)
            print(f"{label}: end-to-end {run.rate:.1f} img/s, {run.rate / alone:.3f} x model-only, "
                  f"model idle {100 * idle:.1f}%, encoder {run.stats[0].encoder}; a fresh worker's first "
                  f"shard {first.seconds:.2f}s")  # fmt: skip
    if args.smoke:
        print("smoke run on the CPU: these numbers check the script, they are not GPU figures")


if __name__ == "__main__":
    main()
