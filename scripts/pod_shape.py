"""How to spend two cores: one server with --workers 2 (one pod of 2 CPUs) or two single-process servers behind
client-side round robin (two pods of 1 CPU). Same closed-loop load on each, alternated in one run; prints
requests/s, p99 and total RSS (the figures behind the CPU overlay's shape, deploy/README.md).

    .venv/bin/python scripts/pod_shape.py --model-repository model_repository [--rounds 2 --seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import launch, load_test_set  # noqa: E402
from serving.client import channel_options, infer_request  # noqa: E402
from serving.protos import grpc_service_pb2_grpc as pb_grpc  # noqa: E402

SERVER = ["-m", "serving", "--metrics-port", "0", "--intra-op-threads", "1", "--device", "cpu"]


async def load(target: str, seconds: float, concurrency: int, batch: int, images: np.ndarray) -> tuple[float, float]:
    """Closed loop over 8 connections: (requests/s, p99 ms)."""
    channels = [
        grpc.aio.insecure_channel(target, options=channel_options() + [("grpc.use_local_subchannel_pool", 1)])
        for _ in range(8)
    ]
    requests = [infer_request(images[i : i + batch], "mnist") for i in range(0, 512, batch)]
    latencies: list[float] = []
    stop = time.monotonic() + seconds

    async def caller(i: int) -> None:
        stub = pb_grpc.GRPCInferenceServiceStub(channels[i % len(channels)])
        while (t0 := time.monotonic()) < stop:
            await stub.ModelInfer(requests[i % len(requests)], timeout=10)
            latencies.append(time.monotonic() - t0)

    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    for ch in channels:
        await ch.close()
    return len(latencies) / seconds, float(np.percentile(latencies, 99) * 1e3)


def rss_mib(servers) -> int:
    total = 0
    for s in servers:
        for pid in s.process_tree_pids():
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                pass
    return round(total / 2**20)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", default="model_repository")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    images, _ = load_test_set()
    images = images.reshape(-1, 784)[:1024]
    logs = Path(tempfile.mkdtemp(prefix="pod-shape-"))
    base = [*SERVER, "--model-repository", args.model_repository]
    shapes = {
        "one server, --workers 2": lambda: [launch("workers2", [*base, "--workers", "2"], logs, "--grpc-port")],
        "two servers, round robin": lambda: [launch(f"single{i}", base, logs, "--grpc-port") for i in (1, 2)],
    }
    results: dict[str, list] = {name: [] for name in shapes}
    for _ in range(args.rounds):
        for name, start in shapes.items():
            servers = start()
            target = servers[0].target if len(servers) == 1 else "ipv4:" + ",".join(s.target for s in servers)
            try:
                row = {"rss_idle_mib": rss_mib(servers)}
                for c, batch in ((1, 1), (32, 1), (4, 256)):
                    rps, p99 = asyncio.run(load(target, args.seconds, c, batch, images))
                    row[f"c{c}_b{batch}"] = {"req_s": round(rps), "img_s": round(rps * batch), "p99_ms": round(p99, 2)}
                row["rss_after_mib"] = rss_mib(servers)
            finally:
                for s in servers:
                    s.stop()
            results[name].append(row)
            print(name, json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
