# syntax=docker/dockerfile:1
# Worker image: the model stack (torch, transformers, peft, bitsandbytes, trl) for the `train` and
# `generate` Celery queues. The PyPI torch wheel for Linux x86_64 is the CUDA build and brings its
# CUDA libraries as nvidia-* wheels, so a plain Python base is enough; the host needs the NVIDIA
# driver and the NVIDIA Container Toolkit, and compose reserves the GPU.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LLMQ_DATA_DIR=/data \
    HF_HOME=/data/hf \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Same uid/gid as the gateway image. /data is the container's own (training scratch, the adapter
# cache); compose mounts only the hub's download cache at /data/hf, and a fresh named volume takes
# the owner of the image's folder when it is first mounted.
RUN groupadd --system --gid 10001 llmq \
    && useradd --system --uid 10001 --gid llmq --create-home --home-dir /home/llmq llmq \
    && mkdir -p /data/hf \
    && chown -R llmq:llmq /data

WORKDIR /app

# torch alone is several GB: its own layer, kept when any other pin changes. The pin matches the
# `worker` extra in pyproject.toml (a test holds them together).
# The CPU override (docker-compose.cpu.yml) builds with https://download.pytorch.org/whl/cpu instead.
ARG TORCH_INDEX_URL=https://pypi.org/simple
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" torch==2.13.0

# The rest of the dependencies, read from pyproject.toml, before the source is copied.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(d['dependencies'] + d['optional-dependencies']['worker']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY shared/ shared/
COPY gateway/ gateway/
COPY worker/ worker/
COPY cli/ cli/
COPY client/ client/
COPY migrations/ migrations/
COPY alembic.ini ./
RUN pip install --no-cache-dir ".[worker]"

USER llmq

# The generate worker by default; compose runs the train worker with `-Q train`.
CMD ["celery", "-A", "worker.app", "worker", "-Q", "generate", "--pool", "solo", "--concurrency", "1", "--loglevel", "INFO"]
