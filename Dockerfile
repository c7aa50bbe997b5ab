# The fewstep image: GPU worker and producer. Build: docker compose build
# The base brings a CUDA build of torch; pip keeps it (pyproject asks torch>=2.6: transformers 5
# disables an older torch), and every other package is pinned by constraints/lock-no-torch.txt
# (scripts/lock.sh: the lock less torch).
# BASE_IMAGE swaps it for another image with torch and pip on PATH: docker-compose.test.yml
# builds from a local Debian image with a CPU torch (scripts/compose-test.sh makes it).
ARG BASE_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/cache/huggingface \
    FEWSTEP_MODEL_CACHE=/cache/fewstep \
    FEWSTEP_GPU_LOCK_DIR=/locks

WORKDIR /app
COPY pyproject.toml README.md ./
COPY constraints ./constraints
COPY config ./config
COPY fewstep ./fewstep
COPY producer ./producer
COPY worker ./worker
# Not root at run time. /cache (model weights) and /locks (GPU claims) are volumes in
# docker-compose.yml; made here so that new named volumes belong to the fewstep user.
RUN pip install -c constraints/lock-no-torch.txt ".[worker]" \
 && useradd --create-home --uid 1000 fewstep \
 && mkdir -p /cache /locks \
 && chown fewstep /cache /locks
# The workers' root filesystem is read-only (docker-compose.yml): caches that would go to
# ~/.cache or ~/.triton (torch.compile with --compile) go to the /cache volume instead.
ENV XDG_CACHE_HOME=/cache/xdg \
    TRITON_CACHE_DIR=/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor
USER fewstep
CMD ["worker", "--help"]
