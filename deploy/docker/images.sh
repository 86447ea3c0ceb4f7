#!/usr/bin/env bash
# Build the images from the real Dockerfiles with buildah (no Docker daemon needed), from the repository root:
#
#   bash deploy/docker/images.sh [cpu|model|training|gpu-rehearsal ...]     (default: cpu model training)
#
# Base image: the official python:3.11.14-slim-bookworm where a registry answers; where none does (this project's
# machines reach only PyPI and Debian's archive), a stand-in made here from Debian's archive: the same Debian
# release (bookworm) and Python minor version (3.11), `python`/`pip` on PATH from a venv at /usr/local as in the
# official image, cached as localhost/mnist-base:python3.11-bookworm (its folder in build/images/). Images:
#   mnist-serving:0.1.0-cpu        serving-cpu.Dockerfile
#   mnist-serving:0.1.0-cpu-model  serving-model.Dockerfile, the model repository baked in (context: $REPO)
#   mnist-training:0.1.0           training.Dockerfile
#   gpu-rehearsal                  serving.Dockerfile's steps on the stand-in base (no CUDA base is reachable: the
#                                  steps run as far as they go without CUDA, so a typo in them fails here)
# Builds use chroot isolation (the OCI runtime cannot start containers on these machines) and the host network.
set -euo pipefail
cd "$(dirname "$0")/../.."

TAG=${TAG:-0.1.0}
REPO=${REPO:-model_repository}
OFFICIAL=docker.io/library/python:3.11.14-slim-bookworm
STAND_IN=localhost/mnist-base:python3.11-bookworm
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WORK=build/images

say() { echo "images: $*" >&2; }

stand_in_base() {
    if buildah inspect --type image "$STAND_IN" >/dev/null 2>&1; then
        echo "$STAND_IN"
        return
    fi
    say "making $STAND_IN from Debian's archive (debootstrap bookworm, python3.11; about a minute)"
    local rootfs=$WORK/rootfs
    rm -rf "$rootfs" && mkdir -p "$WORK"
    debootstrap --variant=minbase \
        --include=python3.11,python3.11-venv,python3-distutils,python3-lib2to3,python3-pip-whl,python3-setuptools-whl,ca-certificates,passwd \
        bookworm "$rootfs" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
    chroot "$rootfs" python3.11 -m venv /usr/local  # python, pip on PATH as in the official image
    # This machine's CA bundle: pip inside the builds trusts what pip here trusts.
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    local c
    c=$(buildah from scratch)
    buildah copy -q "$c" "$rootfs" / >/dev/null
    buildah config --env PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
        --cmd python3 "$c"
    buildah commit -q "$c" "$STAND_IN" >/dev/null
    buildah rm "$c" >/dev/null
    rm -rf "$rootfs"
    echo "$STAND_IN"
}

base_image() {
    if [ -n "${BASE_IMAGE:-}" ]; then echo "$BASE_IMAGE"; return; fi
    if buildah inspect --type image "$OFFICIAL" >/dev/null 2>&1 \
        || timeout 60 buildah pull -q "$OFFICIAL" >/dev/null 2>&1; then
        echo "$OFFICIAL"
    else
        say "no registry answers for $OFFICIAL: using the stand-in base"
        stand_in_base
    fi
}

bud() {  # bud TAG DOCKERFILE CONTEXT [build args...]
    local tag=$1 file=$2 context=$3
    shift 3
    say "building $tag ($file)"
    local started=$SECONDS
    # docker format: the OCI format drops SHELL (bash -o pipefail), which the Dockerfiles' RUN steps rely on.
    buildah bud --isolation chroot --network host --layers --format docker -q -t "$tag" -f "$file" "$@" "$context" \
        >/dev/null
    say "built $tag in $((SECONDS - started)) s: $(buildah images --format '{{.Size}}' "$tag" | head -1)"
}

main() {
    local targets=("$@")
    [ ${#targets[@]} -gt 0 ] || targets=(cpu model training)
    local base
    base=$(base_image)
    say "base image: $base"
    for target in "${targets[@]}"; do
        case $target in
            cpu) bud "mnist-serving:$TAG-cpu" deploy/docker/serving-cpu.Dockerfile . --build-arg "BASE_IMAGE=$base" ;;
            model)
                ls "$REPO"/*/*/model.onnx >/dev/null 2>&1 || { say "no model in $REPO: make model first"; exit 1; }
                bud "mnist-serving:$TAG-cpu-model" deploy/docker/serving-model.Dockerfile "$REPO" \
                    --build-arg "SERVING_IMAGE=localhost/mnist-serving:$TAG-cpu" ;;
            training) bud "mnist-training:$TAG" deploy/docker/training.Dockerfile . --build-arg "BASE_IMAGE=$base" ;;
            gpu-rehearsal)
                bud "mnist-serving:$TAG-gpu-rehearsal" deploy/docker/serving.Dockerfile . \
                    --build-arg "BASE_IMAGE=$base" --build-arg "DATA_IMAGE=$base" ;;
            *) say "unknown image $target"; exit 2 ;;
        esac
    done
}

main "$@"
