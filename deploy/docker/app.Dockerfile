# syntax=docker/dockerfile:1
# SENTINEL application image (CPU): the queue monitor, orchestrator, Controller, Proposer and
# the Celery validate and rollout workers (`sentinel worker validate|rollout`). Build from the
# repository root:
#   docker build -f deploy/docker/app.Dockerfile -t sentinel-app:0.1.0 .
# Base images are pinned by version; bump them deliberately.

FROM python:3.11.11-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# A wheel first, then the venv from it: the final stage never sees the source tree or a compiler.
RUN pip install --upgrade pip \
    && pip wheel --no-deps --wheel-dir /wheels . \
    && pip install "$(ls /wheels/*.whl)[tau2,workers]" \
    && python -m compileall -q /opt/venv

FROM python:3.11.11-slim-bookworm
# util-linux (unshare) is part of the base system; the sandbox uses it for network isolation.
COPY --from=builder /opt/venv /opt/venv
RUN groupadd --gid 10001 sentinel \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin sentinel
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    LITELLM_LOCAL_MODEL_COST_MAP=True
WORKDIR /tmp
USER 10001:10001
ENTRYPOINT ["sentinel"]
CMD ["monitor"]
