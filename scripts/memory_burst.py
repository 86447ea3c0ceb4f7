"""Memory under a burst: many clients sending 1024-image FP32 requests to one server process it starts.

    python scripts/memory_burst.py [--server-arg=--max-inflight-bytes=8388608]

Reports the server's peak RSS (sampled every 20 ms), the status codes (only OK and RESOURCE_EXHAUSTED are
allowed; every request sent must come back), and images/s of the accepted requests, first with a few clients
(the unloaded throughput) and then in the burst. Extra environment for the server (allocator settings):
--server-env MALLOC_ARENA_MAX=2. Exit 1 if any request got another code or no answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import free_port  # noqa: E402
from serving.client import infer_request  # noqa: E402
from serving.protos import grpc_service_pb2_grpc as pb_grpc  # noqa: E402

BATCH = 1024
OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


def start(repository: Path, extra: list[str], env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [sys.executable, "-m", "serving", "--model-repository", str(repository), "--grpc-port", str(port),
            "--metrics-port", "0", "--max-batch-size", str(BATCH), *extra]  # fmt: skip
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
    url = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    with grpc.insecure_channel(url) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"server exited:\n{log_path.read_text()}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return proc, url
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server not SERVING in 120 s")


async def phase(url: str, request, clients: int, channels: int, seconds: float, pid: int, stream: bool) -> dict:
    """Closed-loop clients over `channels` connections for `seconds`; codes, accepted images/s, peak RSS.
    `stream`: each client sends over one ModelStreamInfer stream, one request at a time (a refusal is the
    answer's error_message, whose "CODE: ..." prefix is counted)."""
    proc = psutil.Process(pid)
    codes: Counter = Counter()
    sent = 0
    rss: list[int] = []
    stop = time.monotonic() + seconds
    chans = [
        grpc.aio.insecure_channel(url, options=[*OPTIONS, ("grpc.use_local_subchannel_pool", 1)])
        for _ in range(channels)
    ]
    stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in chans]

    async def stream_client(i: int):
        nonlocal sent
        call = stubs[i % channels].ModelStreamInfer(timeout=seconds + 60)
        while time.monotonic() < stop:
            sent += 1
            await call.write(request)
            answer = await call.read()
            codes[answer.error_message.split(":", 1)[0] if answer.error_message else "OK"] += 1
        await call.done_writing()
        await call.code()

    async def client(i: int):
        nonlocal sent
        stub = stubs[i % channels]
        while time.monotonic() < stop:
            sent += 1
            try:
                await stub.ModelInfer(request, timeout=60)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as err:
                codes[err.code().name] += 1

    async def sample():
        while time.monotonic() < stop:
            rss.append(proc.memory_info().rss)
            await asyncio.sleep(0.02)

    started = time.monotonic()
    await asyncio.gather(sample(), *[(stream_client if stream else client)(i) for i in range(clients)])
    elapsed = time.monotonic() - started
    for c in chans:
        await c.close()
    return {
        "clients": clients,
        "sent": sent,
        "codes": dict(codes),
        "answered": sum(codes.values()),
        "ok_images_per_s": round(codes["OK"] * BATCH / elapsed),
        "rss_peak_mib": round(max(rss) / 2**20),
        "rss_after_mib": round(proc.memory_info().rss / 2**20),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=ROOT / "build" / "model_repository")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--channels", type=int, default=8, help="client connections (clients share them)")
    parser.add_argument("--baseline-clients", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--stream", action="store_true", help="ModelStreamInfer instead of unary ModelInfer")
    parser.add_argument("--server-arg", action="append", default=[], help="extra server flag (repeatable)")
    parser.add_argument("--server-env", action="append", default=[], help="NAME=VALUE for the server")
    parser.add_argument("--log", type=Path, default=ROOT / "build" / "memory_burst.log")
    args = parser.parse_args(argv)
    env = dict(kv.split("=", 1) for kv in args.server_env)
    extra = [a for arg in args.server_arg for a in arg.split("=", 1)]
    args.log.parent.mkdir(parents=True, exist_ok=True)
    images = np.random.default_rng(0).integers(0, 256, (BATCH, 784), dtype=np.uint8)
    request = infer_request(images, "mnist", datatype="FP32")
    proc, url = start(args.model_repository, extra, env, args.log)
    try:
        idle = round(psutil.Process(proc.pid).memory_info().rss / 2**20)
        base = asyncio.run(phase(url, request, args.baseline_clients, 1, args.seconds / 2, proc.pid, args.stream))
        burst = asyncio.run(phase(url, request, args.clients, args.channels, args.seconds, proc.pid, args.stream))
    finally:
        proc.terminate()
        proc.wait(30)
    result = {"server_args": extra, "server_env": env, "stream": args.stream, "rss_idle_mib": idle, "baseline": base,
              "burst": burst}  # fmt: skip
    sys.stdout.write(json.dumps(result, indent=1) + "\n")
    bad = [p for p in (base, burst) if set(p["codes"]) - {"OK", "RESOURCE_EXHAUSTED"} or p["answered"] != p["sent"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
