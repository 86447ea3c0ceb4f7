#!/usr/bin/env bash
# Runs ON the GPU machine, in the last device call (see bench/README.md): joins and unpacks onnxruntime-gpu
# (parts gathered in /tmp/ortc by the earlier calls, the last one carried in .gpu/stage), installs the carried
# wheels into /tmp/site, then runs the GPU check; its JSON, PNG and log land in $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${OUT:=/tmp/gpu-check-out}"; mkdir -p "$OUT" /tmp/ortc
cp .gpu/stage/part* /tmp/ortc/ 2>/dev/null || true
ls -l /tmp/ortc
source .gpu/stage/unpack-on-device.sh || { echo "cannot unpack onnxruntime-gpu"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .gpu/carry/whl/*.whl || { echo "cannot install the carried wheels"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
nproc
python3 -c "import onnxruntime as o, google.protobuf as p, grpc, numpy, pydantic, grpc_health, grpc_reflection; \
print('onnxruntime', o.__version__, o.get_available_providers(), 'protobuf', p.__version__, 'grpcio', grpc.__version__, \
'numpy', numpy.__version__, 'pydantic', pydantic.__version__)" || exit 1
timeout "${CHECK_TIMEOUT_S:-420}" python3 -m bench.gpu_check --require \
  --model-repository .gpu/carry/model_repository --data-dir .gpu/carry/data --results-dir "$OUT/gpu_check" "$@" \
  2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
tar -czf "$OUT/server-logs.tar.gz" -C bench/results/logs gpu_check 2>/dev/null || true
echo "gpu_check exit status: $rc"
exit "$rc"
