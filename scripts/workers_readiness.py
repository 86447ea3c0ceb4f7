"""Readiness with --workers, as a Kubernetes probe and a fresh client see it.

    python scripts/workers_readiness.py [--starts 20] [--workers 2 4] [--connections 16]

Each start: the server with `--workers N`, probed with grpc.health.v1 on a new connection each time (as the
kubelet's gRPC probe does) until one probe says SERVING; at that moment `--connections` fresh connections each
send one ModelInfer (the kernel spreads new connections over the workers). Every call must be answered OK: a
worker that said SERVING while another was still loading would send some of them UNAVAILABLE "not loaded yet".
Prints one JSON line per start and a summary; exit 1 if any call was not answered OK.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import start_serving  # noqa: E402
from serving.client import infer_request  # noqa: E402
from serving.protos import grpc_service_pb2_grpc as pb_grpc  # noqa: E402

FRESH = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own, not one shared in this process


def probe(target: str, timeout: float = 1.0) -> int | None:
    """One health check on a new connection: the status, or None when it got no answer."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target, options=FRESH) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status
        except grpc.RpcError:
            return None


def wait_first_serving(target: str, alive, timeout: float = 120.0) -> int:
    """Probe on new connections until one says SERVING; the number of probes it took."""
    from grpc_health.v1 import health_pb2

    deadline = time.monotonic() + timeout
    probes = 0
    while True:
        probes += 1
        if probe(target) == health_pb2.HealthCheckResponse.SERVING:
            return probes
        if not alive() or time.monotonic() > deadline:
            raise RuntimeError(f"no probe said SERVING after {probes} probes")
        time.sleep(0.02)


def call_fresh(target: str, images: np.ndarray, connections: int) -> Counter:
    """One ModelInfer on each of `connections` new connections, all at once: the status codes."""

    def one(_: int) -> str:
        with grpc.insecure_channel(target, options=FRESH) as channel:
            try:
                pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(images, "mnist"), timeout=30)
            except grpc.RpcError as err:
                return f"{err.code().name}: {err.details()}"
            return "OK"

    with ThreadPoolExecutor(connections) as pool:
        return Counter(pool.map(one, range(connections)))


def trial(repository: Path, workdir: Path, workers: int, images: np.ndarray, connections: int) -> dict:
    """One start with `workers` workers: probes until SERVING, then the fresh calls; codes and exit code."""
    server = start_serving(repository, workdir, "--workers", str(workers), wait=False)
    try:
        probes = wait_first_serving(server.target, server.alive)
        codes = call_fresh(server.target, images, connections)
    finally:
        server.signal(signal.SIGINT)  # drain without the drain delay
        try:
            exit_code = server.proc.wait(60)
        finally:
            server.stop()
    return {"workers": workers, "probes": probes, "codes": dict(codes), "exit_code": exit_code}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--starts", type=int, default=20)
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    images = np.zeros((1, 28, 28), np.uint8)
    failed = 0
    for workers in args.workers:
        for _ in range(args.starts):
            with tempfile.TemporaryDirectory() as workdir:
                result = trial(args.model_repository, Path(workdir), workers, images, args.connections)
            print(json.dumps(result), flush=True)
            failed += set(result["codes"]) != {"OK"}
    print(f"{failed} of {args.starts * len(args.workers)} starts had a call not answered OK")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
