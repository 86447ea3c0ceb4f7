"""The real server as a subprocess (`python -m serving`) on free loopback ports: shared by every test package.

tests/ is on pytest's pythonpath (pyproject.toml), so any test module can `from server_process import ...`.
The process itself is started by bench.common.start_serving, the one launcher of tests, bench and scripts: the
caller's SERVING_* and PROMETHEUS_MULTIPROC_DIR variables do not reach it unless a test passes them in `env`.
"""

from __future__ import annotations

import signal
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.common import REPO_ROOT, ChildServer, start_serving

ROOT = REPO_ROOT


@dataclass
class ServerProcess:
    """A running `python -m serving` and how to reach it."""

    child: ChildServer

    @property
    def proc(self) -> subprocess.Popen:
        return self.child.proc

    @property
    def grpc_port(self) -> int:
        return self.child.port

    @property
    def metrics_port(self) -> int:
        return self.child.metrics_port

    @property
    def log_path(self) -> Path:
        return self.child.log_path

    @property
    def args(self) -> list[str]:
        return self.child.cmd

    @property
    def url(self) -> str:
        return self.child.target

    def log(self) -> str:
        return self.log_path.read_text()

    def answered(self) -> int:
        """Successful inferences this server counted (Triton's ModelStatistics, every version), on a new connection."""
        import grpc

        from serving.protos import grpc_service_pb2 as pb
        from serving.protos import grpc_service_pb2_grpc as pb_grpc

        with grpc.insecure_channel(self.url) as channel:
            stats = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
                pb.ModelStatisticsRequest(name="mnist"), timeout=10
            )
        return sum(s.inference_stats.success.count for s in stats.model_stats)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send `sig` and return the exit code (whatever is left of the process group is killed afterwards)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.child.stop(grace=1.0)


def start_server(repository: Path, tmp_path: Path, *extra: str, wait: bool = True, env=None) -> ServerProcess:
    """Start the server; with `wait`, block until the health service says SERVING."""
    server = ServerProcess(start_serving(repository, tmp_path, *extra, env=env, wait=False))
    if wait:
        wait_serving(server)
    return server


def wait_serving(server: ServerProcess, timeout: float = 60) -> None:
    try:
        server.child.wait_serving(timeout)
    except (RuntimeError, TimeoutError):
        server.child.stop(grace=1.0)
        raise
