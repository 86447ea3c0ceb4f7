#!/usr/bin/env bash
# Generate serving/protos/ from protos/*.proto (or into $1) with package-relative imports and a private pool.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/serving/protos}"
python="${PYTHON:-python3}"
if [[ -z "${PYTHON:-}" && -x "$root/.venv/bin/python" ]]; then
  python="$root/.venv/bin/python"
fi

mkdir -p "$out"
rm -f "$out"/*_pb2.py "$out"/*_pb2.pyi "$out"/*_pb2_grpc.py
cd "$root/protos"
"$python" -m grpc_tools.protoc -I . \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  *.proto
# model_config.proto has no service, so its grpc module would be empty.
rm -f "$out/model_config_pb2_grpc.py"

# Package-relative imports, and the package's own descriptor pool instead of the default one:
# tritonclient registers the same file and message names (inference.*) in the default pool,
# and both must load in one process.
sed -i \
  -e 's/^import \([A-Za-z0-9_]*_pb2\) as /from . import \1 as /' \
  -e 's/^from google.protobuf.internal import builder as _builder$/&\nfrom . import pool as _pool/' \
  -e 's/_descriptor_pool\.Default()\.AddSerializedFile(/_pool.POOL.AddSerializedFile(/' \
  "$out"/*_pb2.py "$out"/*_pb2.pyi "$out"/*_pb2_grpc.py
