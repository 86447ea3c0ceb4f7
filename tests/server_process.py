"""The real server as a subprocess (`python -m serving`) on free loopback ports: shared by every test package.

tests/ is on pytest's pythonpath (pyproject.toml), so any test module can `from server_process import ...`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import free_port

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ServerProcess:
    """A running `python -m serving` and how to reach it."""

    proc: subprocess.Popen
    grpc_port: int
    metrics_port: int
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def start_server(repository: Path, tmp_path: Path, *extra: str, wait: bool = True, env=None) -> ServerProcess:
    """Start the server; with `wait`, block until the health service says SERVING."""
    grpc_port, metrics_port = free_port(), free_port()
    args = [
        sys.executable, "-m", "serving", "--model-repository", str(repository),
        "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port), *extra,
    ]  # fmt: skip
    log_path = tmp_path / f"server-{grpc_port}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, env=full_env)
    server = ServerProcess(proc, grpc_port, metrics_port, log_path, args)
    if wait:
        wait_serving(server)
    return server


def wait_serving(server: ServerProcess, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(server.url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.log()}")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"server not SERVING within {timeout}s:\n{server.log()}")
