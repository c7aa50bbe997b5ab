# GPU worker / producer image. Build: docker compose build
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/cache/huggingface \
    FEWSTEP_MODEL_CACHE=/cache/fewstep

WORKDIR /app
COPY pyproject.toml README.md ./
COPY config ./config
COPY fewstep ./fewstep
COPY producer ./producer
COPY worker ./worker
# torch comes with the base image (CUDA build); pip keeps it.
RUN pip install . \
 && useradd --create-home --uid 1000 fewstep \
 && mkdir -p /cache && chown fewstep /cache
USER fewstep
CMD ["worker", "--help"]
