# syntax=docker/dockerfile:1
# Gateway image: FastAPI + SQLAlchemy + Celery client + Alembic. The gateway never imports torch,
# so this image installs only the project's base dependencies (no `worker` extra). The same image
# runs the one-shot `migrate` service (`alembic upgrade head`).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LLMQ_DATA_DIR=/data

# The same uid/gid as the worker image. /data is the container's own (upload spools); artifacts go to
# the S3 store (LLMQ_ARTIFACT_URL), never to a disk shared with other services.
RUN groupadd --system --gid 10001 llmq \
    && useradd --system --uid 10001 --gid llmq --create-home --home-dir /home/llmq llmq \
    && mkdir -p /data \
    && chown llmq:llmq /data

WORKDIR /app

# Dependencies first, read from pyproject.toml, so a source change does not reinstall them.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); print('\n'.join(d['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY shared/ shared/
COPY gateway/ gateway/
COPY worker/ worker/
COPY cli/ cli/
COPY client/ client/
COPY migrations/ migrations/
COPY alembic.ini ./
RUN pip install --no-cache-dir . \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"

USER llmq
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

CMD ["uvicorn", "gateway.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]
