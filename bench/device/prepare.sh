#!/usr/bin/env bash
# Run HERE (not on the GPU machine), from the repository root, before the device calls of `make gpu-check`.
# Builds everything the GPU machine lacks, all ignored by git (.gpu/):
#   .gpu/parts/partNN        onnxruntime-gpu (pinned version) split into parts of PART_MB  ($SHARED_GPU/pack-ort-gpu.sh)
#   .gpu/carry/whl/          wheels the device image lacks, for Python 3.12 manylinux, versions from our pins/venv
#   .gpu/carry/model_repository, .gpu/carry/data/mnist.npz   the model to serve and the test set
# The call sequence is in bench/README.md ("GPU check on a lent device").
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
# SHARED_GPU: the folder holding the packing script pack-ort-gpu.sh (provided with the lent machine).
SHARED_GPU=${SHARED_GPU:?set SHARED_GPU to the folder with pack-ort-gpu.sh}
PY=${PY:-.venv/bin/python}
MODEL_REPO=${MODEL_REPO:-model_repository}
ORT_VERSION=$(python3 deploy/docker/requirements.py --extra runtime | sed -n 's/^onnxruntime==//p')
mkdir -p .gpu/carry/whl .gpu/carry/data

# 1. onnxruntime-gpu in parts (the shared script keeps them under .gpu/parts).
ORT_GPU_VERSION=$ORT_VERSION PART_MB=${PART_MB:-40} bash "$SHARED_GPU/pack-ort-gpu.sh"

# 2. Wheels: what the server imports that the device image does not have (its KINDS.md package list):
#    pinned ones from pyproject.toml, their dependencies at the versions of our own virtualenv.
pinned=$(python3 deploy/docker/requirements.py --extra serve | grep -E '^(grpcio-health-checking|grpcio-reflection|protobuf|pydantic|pydantic-settings)==')
deps=$($PY - <<'PY'
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in ("pydantic-core", "annotated-types", "typing-inspection", "python-dotenv", "typing-extensions")))
PY
)
rm -f .gpu/carry/whl/*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .gpu/carry/whl $pinned $deps

# 3. The model (the newest version of the repository, else a 1-epoch one) and the MNIST test set.
rm -rf .gpu/carry/model_repository
if ls "$MODEL_REPO"/mnist/*/model.onnx >/dev/null 2>&1; then
  cp -r "$MODEL_REPO" .gpu/carry/model_repository
else
  $PY -m training --model-repository .gpu/carry/model_repository --epochs 1
fi
cp data/mnist.npz .gpu/carry/data/mnist.npz

ls .gpu/parts; du -sh .gpu/carry .gpu/parts/part*
echo "ready: $(ls .gpu/parts/part* | wc -l) part(s); follow bench/README.md (GPU check on a lent device)"
