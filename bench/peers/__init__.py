"""Peer servers measured in the same benchmark run: MLServer, KServe and NVIDIA Triton (through PyTriton) serving the
same model.onnx on onnxruntime CPU.

Each lives in its own virtualenv under build/peers/<name> (they pin other grpcio/protobuf versions than ours), with
the versions of the pyproject.toml extras `peer-mlserver` / `peer-kserve` / `peer-triton` (never installed into the
project venv).
`python -m bench.peers install` (make peers) creates them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from bench.common import REPO_ROOT, free_port

PEERS = ("mlserver", "kserve", "triton")
HERE = Path(__file__).resolve().parent
# The interpreter each peer's venv is made from (default: python3 on PATH). Triton's Python backend stub links the
# libpython3.11.so of Debian's python3.11, so its venv must be made from that interpreter.
BASE_PYTHON = {"triton": "/usr/bin/python3.11"}


def venv(name: str) -> Path:
    return REPO_ROOT / "build" / "peers" / name


def pins(name: str) -> list[str]:
    """The peer's extra, with `mnist-serving[runtime]` replaced by that extra's pins (the one onnxruntime pin)."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    out: list[str] = []
    for spec in optional[f"peer-{name}"]:
        if spec.startswith(project["name"] + "["):
            out += optional[spec[spec.index("[") + 1 : spec.index("]")]]
        else:
            out.append(spec)
    return out


def install(name: str, base_python: str | None = None) -> None:
    """Create build/peers/<name> with the pinned packages (idempotent: skipped when the pins are unchanged)."""
    root, specs = venv(name), pins(name)
    base_python = base_python or BASE_PYTHON.get(name, "python3")
    stamp = root / "installed.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == specs:
        return
    subprocess.run([base_python, "-m", "venv", "--clear", str(root)], check=True)
    py = str(root / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    subprocess.run([py, "-m", "pip", "install", "--quiet", *specs], check=True)
    subprocess.run([py, "-m", "pip", "check"], check=True)
    stamp.write_text(json.dumps(specs))


def missing(name: str) -> str | None:
    stamp = venv(name) / "installed.json"
    if not stamp.is_file() or json.loads(stamp.read_text()) != pins(name):
        return f"{venv(name)} is not installed with {pins(name)}: run `make peers`"
    return None


def command(name: str, model: Path, grpc_port: int, workdir: Path) -> list[str]:
    """The command that serves `model` as model 'mnist' over the V2 gRPC protocol on `grpc_port`."""
    bin_dir = venv(name) / "bin"
    if name == "triton":
        return [
            str(bin_dir / "python"), str(HERE / "triton_server.py"), "--model-onnx", str(model),
            "--grpc-port", str(grpc_port), "--http-port", str(free_port()), "--metrics-port", str(free_port()),
            "--workspace", str(workdir / "pytriton"),
        ]  # fmt: skip
    if name == "kserve":
        return [
            str(bin_dir / "python"), str(HERE / "kserve_server.py"), "--model-onnx", str(model),
            "--grpc-port", str(grpc_port), "--http-port", str(free_port()),
        ]  # fmt: skip
    (workdir / "mnist").mkdir(parents=True, exist_ok=True)
    # NOTE: parallel_workers 0 runs inference in the server process: MLServer 1.7.1's worker pool dies at start
    # with the uvloop its own pins resolve to ("There is no current event loop"). Everything else is default.
    settings = {
        "grpc_port": grpc_port, "http_port": free_port(), "metrics_port": free_port(), "host": "127.0.0.1",
        "parallel_workers": 0,
    }  # fmt: skip
    (workdir / "settings.json").write_text(json.dumps(settings))
    model_settings = {
        "name": "mnist",
        "implementation": "mlserver_runtime.OnnxMnist",
        "parameters": {"uri": str(model), "version": "1"},
    }
    (workdir / "mnist" / "model-settings.json").write_text(json.dumps(model_settings))
    return ["env", f"PYTHONPATH={HERE}", str(bin_dir / "mlserver"), "start", str(workdir)]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] != ["install"]:
        print("usage: python -m bench.peers install [mlserver|kserve|triton ...]", file=sys.stderr)
        return 2
    for name in args[1:] or PEERS:
        base = BASE_PYTHON.get(name, "python3")
        if not shutil.which(base):
            # `make bench` then runs without this peer and says so; asked for by name, it is an error.
            print(f"{name}: skipped, {base} is not here (Debian: apt-get install python3.11)", file=sys.stderr)
            if args[1:]:
                return 1
            continue
        install(name)
        print(f"{name}: {venv(name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
