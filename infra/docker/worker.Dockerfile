# syntax=docker/dockerfile:1
# The GPU worker image, one for RunPod and Modal (and any Docker host with the NVIDIA container runtime).
# Build from the repository root (the context is kept small by .dockerignore):
#
#   docker build -f infra/docker/worker.Dockerfile -t REGISTRY/acestep-worker:0.1.0 .
#   docker build -f infra/docker/worker.Dockerfile --build-arg BAKE_WEIGHTS=1 \
#       --build-arg WITH_MODELS="acestep-5Hz-lm-4B" -t REGISTRY/acestep-worker:0.1.0-weights .
#
# The GPU stack is pinned as one set: vllm pins torch and torchaudio exactly (vllm 0.32.0 wants
# torch==2.13.0 and torchaudio==2.11.0), and torch 2.13's CUDA build is CUDA 13.0, hence the CUDA 13.0
# base (hosts need an NVIDIA driver >= 580). Change the set together, e.g. for a CUDA 12.8 host:
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 --build-arg TORCH_VERSION=... \
#   --build-arg VLLM_VERSION=<the vllm release that pins that torch>
#
# Weights: none in the image by default. The worker reads ACESTEP_CHECKPOINT_DIR (/weights): mount the
# weights volume there (a Modal volume; on RunPod serverless the network volume is at /runpod-volume, so
# set ACESTEP_CHECKPOINT_DIR=/runpod-volume/<folder>) and fill it once with the image's
# `download-models` mode. BAKE_WEIGHTS=1 downloads them into /weights at build time instead (about 10 GB
# more image; a volume mounted at /weights would hide them).

ARG CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.8

FROM ${UV_IMAGE} AS uv

# ---- builder: Python, the pinned GPU stack, the project wheel with its extras, all in /opt/venv ----------
FROM ${CUDA_IMAGE} AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG PYTHON_VERSION=3.11
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
COPY --from=uv /uv /usr/local/bin/uv
# A standalone CPython (python-build-standalone, chosen by the pinned uv) and a venv with pip in it
# (Modal wants python and pip on PATH).
RUN uv python install "${PYTHON_VERSION}" \
    && uv venv --seed --python "${PYTHON_VERSION}" /opt/venv

# torch first, from the CUDA index that names its build (uv looks there before PyPI, and takes a package
# from the first index that has it); the layers below keep it, as vllm's pin is the same release.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --extra-index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
ARG VLLM_VERSION=0.32.0
ARG TORCHAUDIO_VERSION=2.11.0
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install "torch==${TORCH_VERSION}" "vllm==${VLLM_VERSION}" "torchaudio==${TORCHAUDIO_VERSION}"

# The project as a wheel (package data included: db/*.sql, migrations, pipeline/data, handler/http/*.json),
# then installed with its extras. Only these sources are in the build context (see .dockerignore).
WORKDIR /src
COPY pyproject.toml README.md ./
COPY handler ./handler
COPY db ./db
COPY pipeline ./pipeline
COPY migrations ./migrations
RUN python -m pip wheel --no-deps --no-cache-dir --wheel-dir /wheels .
ARG EXTRAS=gpu,runpod
RUN --mount=type=cache,target=/root/.cache/uv \
    set -- /wheels/acestep_serverless-*.whl \
    && uv pip install "torch==${TORCH_VERSION}" "vllm==${VLLM_VERSION}" "$1[${EXTRAS}]" \
    && uv pip check \
    && python -c "import sys, torch; v = torch.__version__; \
sys.exit(0 if v.split('+')[0] == '${TORCH_VERSION}' and torch.version.cuda else f'torch {v} (CUDA {torch.version.cuda}) is not the pinned CUDA build ${TORCH_VERSION}')" \
    && python -c "import handler.cli, handler.healthcheck, pipeline.service, db, migrations"

# ---- the worker image --------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS worker
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG DEBIAN_FRONTEND=noninteractive
# libsndfile1: audio files (soundfile); tini: PID 1 that forwards SIGTERM (a soft stop) and reaps the
# pipeline processes; gcc/libc6-dev: triton (vllm, torch.compile) compiles its small launchers at run time.
# Distribution packages are left to the pinned base image's release (their exact versions come and go).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libsndfile1 tini gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 acestep \
    && useradd --system --uid 10001 --gid acestep --create-home --home-dir /home/acestep --shell /usr/sbin/nologin acestep \
    && mkdir -p /weights /app \
    && chown acestep:acestep /weights /app
COPY --from=builder /opt/python /opt/python
COPY --from=builder /opt/venv /opt/venv
COPY --chmod=0755 infra/docker/entrypoint.sh /usr/local/bin/acestep-entrypoint
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/acestep \
    HF_HOME=/home/acestep/.cache/huggingface \
    ACESTEP_CHECKPOINT_DIR=/weights \
    ACESTEP_HEALTH_FILE=/tmp/acestep-worker.alive
USER 10001:10001
WORKDIR /app

# BAKE_WEIGHTS=1: the real checkpoints into /weights now, checked by download-models' layout check (the
# build fails on an incomplete download). WITH_MODELS: extra models, space or comma separated
# (acestep-5Hz-lm-4B, acestep-v15-base, ...: pipeline/download.py lists them).
ARG BAKE_WEIGHTS=0
ARG WITH_MODELS=""
RUN if [ "${BAKE_WEIGHTS}" = "1" ]; then \
        set -- ; \
        for name in $(echo "${WITH_MODELS}" | tr ',' ' '); do set -- "$@" --with "${name}"; done; \
        acestep-serverless download-models /weights "$@" && rm -rf /weights/.cache; \
    elif [ "${BAKE_WEIGHTS}" != "0" ]; then \
        echo "BAKE_WEIGHTS must be 0 or 1, not ${BAKE_WEIGHTS}" >&2; exit 1; \
    fi

# Healthy = loadable checkpoints and a worker heartbeat (handler.healthcheck.beat, from the worker's
# heartbeat loop) at most 120 s old. The start period covers the model load before the first beat
# (reading ~10 GB from a network volume and starting vllm take minutes); failures in it do not count.
HEALTHCHECK --interval=30s --timeout=20s --start-period=600s --retries=3 \
    CMD ["python", "-m", "handler.healthcheck"]

ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/acestep-entrypoint"]
