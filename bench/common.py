"""Shared helpers: loopback checks, free ports, child server processes, MNIST and model lookup."""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import logging
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serving.contract import IMAGE_PIXELS

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "mnist"
INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"


class NonLoopbackTarget(ValueError):
    """The target is not a loopback address and remote targets were not allowed."""


def split_target(target: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", target.strip())
    if not match:
        raise ValueError(f"target '{target}' is not host:port")
    host = match.group(1) or match.group(3)
    return host, int(match.group(2) or match.group(4))


def check_target(target: str, allow_remote: bool = False) -> str:
    """Return the target if every address it resolves to is loopback (or allow_remote); else raise. A gRPC
    address list (`ipv4:127.0.0.1:8001,127.0.0.1:8003`, calls spread round robin) is checked address by address."""
    scheme, _, addresses = target.partition(":")
    if scheme in ("ipv4", "ipv6") and addresses:
        for address in addresses.split(","):
            check_target(address, allow_remote)
        return target
    host, port = split_target(target)
    if allow_remote:
        return target
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except socket.gaierror as exc:
        raise NonLoopbackTarget(f"cannot resolve '{host}' ({exc}); only loopback targets are allowed") from None
    remote = sorted(a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_loopback)
    if remote or not addresses:
        raise NonLoopbackTarget(
            f"target {target} resolves to non-loopback {remote}: load tests only run against 127.0.0.1/::1 "
            "unless --allow-remote is given"
        )
    return target


_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the child binds it right after), never one this process handed out
    before: the kernel may give the same ephemeral port to two binds in a row, e.g. a server's gRPC and metrics
    ports (seen: a server refused to start, its metrics endpoint holding the port gRPC was told to bind)."""
    while True:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


# ---------------------------------------------------------------- child processes

_LIVE: set[ChildServer] = set()


# Run as `python -c _PDEATHSIG_EXEC cmd...`: asks for SIGTERM when the parent dies (even by SIGKILL), then execs
# cmd (the request survives exec). NOTE: not a preexec_fn: Python code between fork and exec in a process with
# threads (gRPC's, the tests') can deadlock or crash the child (seen: a segfault in ctypes after fork).
_PDEATHSIG_EXEC = (
    "import ctypes, os, sys\n"
    "try:\n"
    "    ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, 15)  # PR_SET_PDEATHSIG, SIGTERM\n"
    "except Exception:\n"
    "    pass\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n"
)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a server child: this one without SERVING_*, OTEL_* and PROMETHEUS_MULTIPROC_DIR (a
    developer's shell must not change what a test or benchmark runs), plus `extra`, which may set them on purpose."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SERVING_", "OTEL_")) and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def serving_cmd(repository: str | os.PathLike, grpc_port: int, metrics_port: int, *extra: str) -> list[str]:
    """`python -m serving` on loopback ports (the one command line tests, bench and scripts start)."""
    return python_cmd(
        "-m", "serving", "--model-repository", str(repository), "--grpc-port", str(grpc_port),
        "--metrics-port", str(metrics_port), *extra,
    )  # fmt: skip


@dataclass(eq=False)
class ChildServer:
    """A server process (ours, a reference or a peer) in its own process group, killed on stop/exit: the one way
    tests, the benchmark and the scripts start a server child."""

    name: str
    cmd: list[str]
    port: int
    log_path: Path
    proc: subprocess.Popen | None = None
    pids: list[int] = field(default_factory=list)
    env: dict[str, str] | None = None  # added to child_env()
    metrics_port: int = 0
    cwd: Path = REPO_ROOT  # another checkout's root runs that checkout's code (bench.ab's A/B of two commits)
    _stopped: bool = False

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ChildServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _PDEATHSIG_EXEC, *self.cmd],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() also reaches worker processes
                cwd=self.cwd,
                env=child_env(self.env),
            )
        _LIVE.add(self)
        log.info("started %s (pid %d): %s", self.name, self.proc.pid, " ".join(self.cmd))
        return self

    @property
    def url(self) -> str:
        return self.target

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_serving(self, timeout: float = 120.0) -> None:
        """Poll the gRPC health service until it says SERVING (the server's own readiness, models loaded)."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if not self.alive():
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail(200)}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name} not SERVING after {timeout:.0f}s:\n{self.log_tail(200)}")
                try:
                    if (
                        stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                        == health_pb2.HealthCheckResponse.SERVING
                    ):
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)

    def wait_ready(self, timeout: float = 120.0, connections: int = 8) -> None:
        """Poll ServerReady until `connections` separate connections all answer ready=True."""
        import grpc

        from serving.protos import grpc_service_pb2 as pb

        deadline = time.monotonic() + timeout
        ready_conns = 0
        while ready_conns < connections:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not ready after {timeout:.0f}s:\n{self.log_tail()}")
            # A fresh connection each time: with SO_REUSEPORT workers each may land on another process.
            with grpc.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                ready = ch.unary_unary(
                    "/inference.GRPCInferenceService/ServerReady",
                    request_serializer=pb.ServerReadyRequest.SerializeToString,
                    response_deserializer=pb.ServerReadyResponse.FromString,
                )
                try:
                    ok = ready(pb.ServerReadyRequest(), timeout=2.0).ready
                except grpc.RpcError:
                    ok = False
            if ok:
                ready_conns += 1
            else:
                ready_conns = 0
                time.sleep(0.1)
        self.pids = self.process_tree_pids()

    def process_tree_pids(self) -> list[int]:
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root.pid] + [c.pid for c in root.children(recursive=True)]
        except psutil.Error:
            return []

    def cpu_seconds(self) -> float:
        """User+system CPU of the server and all its worker processes so far."""
        import psutil

        total = 0.0
        for pid in self.pids or self.process_tree_pids():
            with contextlib.suppress(psutil.Error):
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
        return total

    def signal(self, sig: int) -> None:
        """Send `sig` to the server's process group (its workers included), without waiting."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after `grace` seconds."""
        _LIVE.discard(self)
        if self.proc is None or self._stopped:
            return
        self._stopped = True
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # Workers may outlive their parent; the group id stays valid while any member lives.
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(grace)
        log.info("stopped %s (exit %s)", self.name, self.proc.returncode)

    def __enter__(self) -> ChildServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def launch(
    name: str, args: list[str], log_dir: Path, port_flag: str = "--port", ready_timeout: float = 120
) -> ChildServer:
    """Start `python <args> <port_flag> <free port>` and wait until it is ready; stopped again on failure."""
    port = free_port()
    child = ChildServer(name, python_cmd(*args, port_flag, str(port)), port, Path(log_dir) / f"{name}.log").start()
    try:
        child.wait_ready(timeout=ready_timeout)
    except BaseException:
        child.stop()
        raise
    return child


def start_serving(
    repository: str | os.PathLike,
    log: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    wait: bool = True,
    name: str = "serving",
) -> ChildServer:
    """`python -m serving` on free loopback ports, its output in `log` (a directory: server-<port>.log in it);
    with `wait`, returns once it is SERVING (and stops it if it never gets there). Without: call wait_serving, or
    wait_ready where several workers must all be ready."""
    grpc_port, metrics_port = free_port(), free_port()
    log = Path(log)
    log_path = log / f"server-{grpc_port}.log" if log.is_dir() else log
    cmd = serving_cmd(repository, grpc_port, metrics_port, *extra)
    child = ChildServer(name, cmd, grpc_port, log_path, env=env, metrics_port=metrics_port).start()
    if wait:
        try:
            child.wait_serving()
        except BaseException:
            child.stop()
            raise
    return child


@atexit.register
def stop_all_children() -> None:
    """Kill every server the benchmark started and did not stop yet."""
    for child in list(_LIVE):
        child.stop(grace=2.0)


def signal_all_children(sig: int = signal.SIGTERM) -> None:
    """Send `sig` to every live child server's process group at once, without waiting."""
    for child in list(_LIVE):
        child.signal(sig)


def install_sigterm_exit() -> None:
    """SIGTERM becomes SystemExit and SIGINT (Ctrl-C) KeyboardInterrupt, so finally blocks and atexit stop the
    child servers; both first tell every child server to stop, all at once, so that the stops run in parallel
    instead of one grace period after another."""

    def _exit(signum, _frame):
        signal_all_children(signal.SIGTERM)
        raise SystemExit(128 + signum)

    def _interrupt(signum, _frame):
        signal_all_children(signal.SIGTERM)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, _interrupt)


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, *args]


# ---------------------------------------------------------------- data and model


def load_test_set(data_dir: str | os.PathLike = REPO_ROOT / "data") -> tuple[np.ndarray, np.ndarray]:
    """MNIST test images as uint8 (10000, 784) and labels int64 (10000,)."""
    from training.data import load_mnist

    ds = load_mnist(data_dir)
    return ds.x_test.reshape(len(ds.x_test), IMAGE_PIXELS), ds.y_test.astype(np.int64)


def find_model(repository: str | os.PathLike, model: str = MODEL_NAME) -> Path:
    """The newest <repository>/<model>/<version>/model.onnx: the version unversioned requests get."""
    from serving.discovery import scan  # the server's own notion of a version, imported only where needed

    root = Path(repository)
    versions = scan(root).get(model) if root.is_dir() else None
    if not versions:
        raise FileNotFoundError(
            f"no {root / model}/<version>/model.onnx: run `make model` (or pass --model-repository)"
        )
    return versions[max(versions)] / "model.onnx"


def machine_info() -> dict:
    """What the numbers were measured on."""
    import grpc
    import onnxruntime

    cpu_model = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "onnxruntime": onnxruntime.__version__,
        "platform": platform.platform(),
    }
