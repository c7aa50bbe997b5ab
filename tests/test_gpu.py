"""The CUDA-only paths of the worker, on a real GPU with the tiny model (random weights).

Marked ``gpu`` and skipped, with one reason, where no CUDA GPU is visible; ``bench/device/run.sh``
runs them first on a GPU host (``pytest -m gpu tests/test_gpu.py``). They use no Redis or S3:
only the model, the encode stage and the device.
"""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from worker import speed
from worker.batching import BatchSizes
from worker.encode import ImageFormat, choose_jpeg_encoder, encode, encode_jpeg_on_device, to_host
from worker.model import load_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA GPU (torch.cuda.is_available() is False); bench/device/run.sh runs these on one",
    ),
]

PROMPTS = ["a lighthouse on a cliff at dawn", "a red bicycle in the snow", "a bowl of ramen", "a fox"]


def tiny(dtype: str | None = None, **options):
    model = load_model("tiny", "cuda")
    speed.apply(model, speed.SpeedOptions(dtype=dtype, **options))
    return model


def generate(model, keep_on_device: bool = True):
    preset = model.preset
    return model.generate(
        PROMPTS,
        [1, 2, 3, 4],
        steps=int(preset["steps"]),
        guidance=float(preset["guidance"]),
        width=int(preset["width"]),
        height=int(preset["height"]),
        keep_on_device=keep_on_device,
    )


@pytest.fixture(scope="module")
def model():
    return tiny()


def test_pinned_side_stream_copy_gives_the_same_pixels_as_a_plain_cpu_copy(model):
    images = generate(model).images
    assert images.is_cuda and images.dtype == torch.uint8
    plain = images.cpu().numpy()
    copied = to_host(images).array()
    assert copied.shape == plain.shape == (4, 128, 128, 3)
    assert np.array_equal(copied, plain)


def test_nvjpeg_bytes_decode_to_the_same_size_and_close_pixels(model):
    assert choose_jpeg_encoder("gpu", "cuda").startswith("nvjpeg")
    images = generate(model).images
    pixels = images.cpu().numpy()
    encoded = encode_jpeg_on_device(images, quality=90)
    assert len(encoded) == 4
    for data, original in zip(encoded, pixels, strict=True):
        decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert decoded.shape == original.shape
        cpu = np.asarray(Image.open(io.BytesIO(encode(original, ImageFormat("jpeg", quality=90)))))
        gpu_error = np.abs(decoded.astype(int) - original).mean()
        cpu_error = np.abs(cpu.astype(int) - original).mean()
        # Another encoder, other rounding: about as close to the pixels as Pillow's JPEG.
        assert gpu_error <= 1.5 * cpu_error + 1.0, (gpu_error, cpu_error)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_generates_finite_images(dtype):
    model = tiny(dtype)
    assert model.dtype == dtype and model.pipeline.unet.dtype == getattr(torch, dtype)
    with torch.inference_mode():
        out = model.pipeline(prompt=PROMPTS, num_inference_steps=1, guidance_scale=0.0, width=128,
                             height=128, output_type="pt")  # fmt: skip
    assert out.images.shape == (4, 3, 128, 128)
    assert torch.isfinite(out.images).all()


def test_channels_last_and_compile_produce_images():
    model = tiny("float16", channels_last=True)
    assert model.pipeline.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    eager = generate(model, keep_on_device=False).images
    assert speed.compile_denoiser(model, "default")
    compiled = generate(model, keep_on_device=False).images
    assert eager.shape == compiled.shape == (4, 128, 128, 3)
    # Compiled kernels round differently in float16; the images stay the same pictures.
    assert np.abs(eager.astype(int) - compiled).mean() < 10


CLAIM = (
    "import sys; from pathlib import Path; "
    "from worker.gpu_claim import claim_gpu, cuda_device_count, try_claim; "
    "d = claim_gpu(cuda_device_count(), Path(sys.argv[1])); print(d, flush=True); "
    "print(try_claim(cuda_device_count(), Path(sys.argv[1])), flush=True); sys.stdin.read()"
)


def test_device_claim_takes_the_gpu_and_a_second_claim_finds_none_free(tmp_path):
    if torch.cuda.device_count() != 1:
        pytest.skip(f"written for one GPU; {torch.cuda.device_count()} visible")
    holder = subprocess.Popen([sys.executable, "-c", CLAIM, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "cuda:0"
        assert holder.stdout.readline().strip() == "None"  # its one GPU is held: by itself
        probe = "import sys; from pathlib import Path; from worker.gpu_claim import try_claim; " \
            "print(try_claim(1, Path(sys.argv[1])))"  # fmt: skip
        other = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True,
                               timeout=60)  # fmt: skip
        assert other.stdout.strip() == "None"
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    model = load_model("tiny", "cuda:0")  # the claimed name loads and runs
    assert generate(model).images.device == torch.device("cuda", 0)


def test_a_real_out_of_memory_error_halves_the_batch_until_it_fits():
    total = torch.cuda.get_device_properties(0).total_memory
    sizes = BatchSizes(fixed=8)
    ran = []

    def run(size: int) -> int:
        ran.append(size)
        if size > 2:  # more than the GPU has: CUDA's own out-of-memory error
            torch.empty(2 * total, dtype=torch.uint8, device="cuda")
        return size

    result, size, too_large = sizes.fit(512, 512, run)
    assert (result, size, too_large) == (2, 2, (8, 4)) and ran == [8, 4, 2]
    assert sizes.size(512, 512) == 2  # kept for that resolution
    assert torch.cuda.memory_allocated() < total // 2  # nothing of the failed calls is held


def test_a_kernel_size_limit_error_of_this_torch_is_taken_for_a_batch_too_large():
    """The SD VAE's decoder upsamples 256 channels to 512x512: from a batch of 33 the output passes
    2**31 elements. If this torch's CUDA kernel refuses that, the worker must halve the batch."""
    from worker.batching import is_batch_too_large

    latents = torch.zeros(33, 256, 256, 256, dtype=torch.float16, device="cuda")
    try:
        out = torch.nn.functional.interpolate(latents.to(memory_format=torch.channels_last), scale_factor=2.0)
    except RuntimeError as e:
        assert is_batch_too_large(e), str(e)
    else:
        numel = out.numel()
        del out
        assert numel > 2**31
        pytest.skip("this torch upsamples past INT_MAX elements: no size-limit error to recognise")
    finally:
        del latents
        torch.cuda.empty_cache()
