# syntax=docker/dockerfile:1
# The HTTP function's image: the API (`acestep-serverless serve`) alone, for a container service (ECS,
# Cloud Run, Fly, Kubernetes, a plain Docker host). No torch and no pipeline: it inserts and reads job
# rows, so it starts in about a second. Build from the repository root (.dockerignore keeps the context
# to the sources):
#
#   docker build -f infra/docker/http.Dockerfile -t REGISTRY/acestep-http:0.1.0 .
#   docker run -p 8001:8001 -e ACESTEP_DATABASE_URL=postgresql://... -e ACESTEP_STORAGE_URL=s3://BUCKET/PREFIX \
#       -e ACESTEP_SECRET_KEY=... -e ACESTEP_ENV=production REGISTRY/acestep-http:0.1.0
#
# Its packages are the pinned set of the Modal API image (infra/modal/requirements-api.lock, written by
# infra/modal/lock.py from pyproject.toml without torch, transformers, diffusers, peft and pgserver);
# the project itself goes in without dependencies on top of them.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---- builder: the pinned API packages and the project wheel in /opt/venv ---------------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
COPY infra/modal/requirements-api.lock /tmp/requirements-api.lock
RUN pip install -r /tmp/requirements-api.lock
WORKDIR /src
COPY pyproject.toml README.md ./
COPY handler ./handler
COPY db ./db
COPY pipeline ./pipeline
COPY migrations ./migrations
# The project without its dependencies (the lock has the API's); then check that the API, the CLI and
# the migrations import from what is installed, without torch.
RUN pip wheel --no-deps --wheel-dir /wheels . \
    && pip install --no-deps /wheels/acestep_serverless-*.whl \
    && python -c "import sys, handler.cli, handler.http.app, handler.http.services, migrations; \
sys.exit('torch was imported' if 'torch' in sys.modules else 0)"

# ---- the HTTP image -------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS http
# /app: the user's working folder (ACESTEP_DATA_DIR is .acestep under it; production writes nothing
# there: the secret comes from ACESTEP_SECRET_KEY and the audio goes to ACESTEP_STORAGE_URL).
RUN groupadd --system --gid 10001 acestep \
    && useradd --system --uid 10001 --gid acestep --no-create-home --home-dir /app --shell /usr/sbin/nologin acestep \
    && install -d -o acestep -g acestep /app
COPY --from=builder /opt/venv /opt/venv
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ACESTEP_HOST=0.0.0.0 \
    ACESTEP_PORT=8001
USER 10001:10001
WORKDIR /app
EXPOSE 8001

# Healthy = the API answers GET /health with 200 (a live process with its database; whether a GPU worker
# is live is in the body, not in the container's health).
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-m", "handler.healthcheck", "--http"]

# `serve` by default; `migrate` (once per release, before the new image serves) and `create-key NAME`
# run in the same image: `docker run ... REGISTRY/acestep-http:0.1.0 migrate`.
ENTRYPOINT ["acestep-serverless"]
CMD ["serve"]
