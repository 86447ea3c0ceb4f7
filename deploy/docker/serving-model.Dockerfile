# syntax=docker/dockerfile:1
# A serving image with the model repository baked in (no volume needed). The build context is the model
# repository itself, so the root .dockerignore (which keeps models out of the other images) does not apply:
#   docker build -f deploy/docker/serving-model.Dockerfile \
#     --build-arg SERVING_IMAGE=mnist-serving:0.1.0-cpu -t mnist-serving:0.1.0-cpu-model model_repository
ARG SERVING_IMAGE=mnist-serving:0.1.0-cpu
FROM ${SERVING_IMAGE}
COPY --chown=10001:10001 . /models/
