# syntax=docker/dockerfile:1
# Training image: TensorFlow (CPU) trains the seed's MLP and exports the next ONNX version into /models.
# Build from the repository root:  docker build -f deploy/docker/training.Dockerfile -t mnist-training:0.1.0 .
# Run: docker run --user "$(id -u):$(id -g)" -v "$PWD/model_repository:/models" mnist-training:0.1.0
ARG BASE_IMAGE=python:3.11.14-slim-bookworm

# ---- build: a venv with the train extra ------------------------------------------------------------------
FROM ${BASE_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml ./
COPY deploy/docker/requirements.py deploy/docker/requirements.py
RUN python deploy/docker/requirements.py --extra train > requirements.txt \
    && pip install --requirement requirements.txt
# README.md (the package description) after the dependency layer: editing it reinstalls nothing. training/ and the
# model contract it shares with the server (serving/contract.py: names, shapes, scaling); not the server itself.
COPY README.md ./
COPY serving/__init__.py serving/contract.py serving/
COPY training/ training/
RUN pip install --no-deps . \
    && pip check \
    && python -c "import training.data"
# Real MNIST, fetched once at build time so that training needs no network.
RUN python -m training.data --data-dir /opt/mnist-data

# ---- runtime ------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin app \
    && mkdir /models /logs \
    && chown 10001:10001 /models /logs
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/mnist-data /opt/mnist-data
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TF_CPP_MIN_LOG_LEVEL=1
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["python", "-m", "training"]
CMD ["--model-repository", "/models", "--data-dir", "/opt/mnist-data", "--log-dir", "/logs"]
