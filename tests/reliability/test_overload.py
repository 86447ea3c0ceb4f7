"""Overload: far more work than capacity is refused with RESOURCE_EXHAUSTED, nothing else; memory stays bounded.

Latency and throughput under overload are measured and reported here (docs/reliability.md) but not asserted:
performance figures belong to `make bench`, not to a pass/fail suite on a shared machine."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import psutil
from rel_harness import CLIENT_OPTIONS, histogram_quantile, infer_ok, metric_sum, report
from server_process import start_server

from serving.client import infer_request
from serving.protos import grpc_service_pb2_grpc as pb_grpc

BATCH = 1024
QUEUE_IMAGES = 2048  # two batches may wait; everything beyond is refused
OVERLOAD_CLIENTS = 64  # 64 x 1024 images in flight against a 2048-image queue
BASELINE_CLIENTS = 2
PHASE_S = 4.0
RSS_LIMIT = 2 << 30  # a coarse guard: 64 x 3 MiB requests buffered without bound would pass it quickly


async def _load(url: str, request, clients: int, seconds: float, pid: int) -> dict:
    """Closed-loop clients sending `request` back to back; returns codes, latencies, server RSS samples."""
    proc = psutil.Process(pid)
    latencies: dict[str, list[float]] = {}
    rss: list[int] = []
    stop = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(url, options=CLIENT_OPTIONS) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)

        async def client():
            while time.monotonic() < stop:
                sent = time.monotonic()
                try:
                    await stub.ModelInfer(request, timeout=60)
                    code = "OK"
                except grpc.aio.AioRpcError as err:
                    code = err.code().name
                latencies.setdefault(code, []).append(time.monotonic() - sent)

        async def sample():
            while time.monotonic() < stop:
                rss.append(proc.memory_info().rss)
                await asyncio.sleep(0.1)

        await asyncio.gather(sample(), *[client() for _ in range(clients)])
    ok = latencies.get("OK", [])
    refused = latencies.get("RESOURCE_EXHAUSTED", [])
    return {
        "codes": {code: len(v) for code, v in latencies.items()},
        "images_per_s": round(len(ok) * BATCH / seconds),
        "ok_p50_s": round(float(np.percentile(ok, 50)), 3) if ok else None,
        "ok_p99_s": round(float(np.percentile(ok, 99)), 3) if ok else None,
        "refused_p50_s": round(float(np.percentile(refused, 50)), 3) if refused else None,
        "rss_max_mb": round(max(rss) / 2**20),
    }


async def test_overload_is_shed_and_the_server_recovers(trained_repository, tmp_path, reference):
    server = start_server(
        trained_repository, tmp_path, "--max-batch-size", str(BATCH), "--max-queue-images", str(QUEUE_IMAGES)
    )
    try:
        pid = server.proc.pid
        rss_start = psutil.Process(pid).memory_info().rss
        images = np.resize(reference.images, (BATCH, 784))
        request = infer_request(images, "mnist")
        baseline = await _load(server.url, request, BASELINE_CLIENTS, PHASE_S / 2, pid)
        first = await _load(server.url, request, OVERLOAD_CLIENTS, PHASE_S, pid)
        second = await _load(server.url, request, OVERLOAD_CLIENTS, PHASE_S, pid)
        # Load gone: an ordinary request is answered, and correctly.
        probs, _ = infer_ok(server, reference.images[:100])
        assert reference.check(0, 100, probs)
        text = server.metrics()
        queue_p99 = histogram_quantile(text, "mnist_serving_queue_duration_seconds", 0.99)
        compute_p99 = histogram_quantile(text, "mnist_serving_compute_duration_seconds", 0.99)
        # Refused for the image queue or, before that, for the bytes in flight (unread ones carry no model).
        shed = {r: metric_sum(text, "mnist_serving_shed_total", reason=r) for r in ("queue_full", "inflight_bytes")}
    finally:
        code = server.stop()
    result = {
        "queue_images": QUEUE_IMAGES,
        "clients": OVERLOAD_CLIENTS,
        "batch": BATCH,
        "rss_start_mb": round(rss_start / 2**20),
        "baseline": baseline,
        "overload_1": first,
        "overload_2": second,
        "shed_metric": shed,
        "server_queue_wait_p99_le_s": queue_p99,
        "server_compute_p99_le_s": compute_p99,
    }
    report("overload", result)

    assert code == 0, server.log()
    assert set(baseline["codes"]) == {"OK"}, baseline
    for phase in (first, second):
        assert set(phase["codes"]) == {"OK", "RESOURCE_EXHAUSTED"}, phase  # shed, never failed otherwise
        assert phase["codes"]["RESOURCE_EXHAUSTED"] > phase["codes"]["OK"], phase  # most of it is refused
        assert phase["rss_max_mb"] * 2**20 < RSS_LIMIT, phase
    # No request lost or counted twice: every refusal the clients saw is one shed on the server.
    assert sum(shed.values()) == first["codes"]["RESOURCE_EXHAUSTED"] + second["codes"]["RESOURCE_EXHAUSTED"]
    assert shed["queue_full"] > 0, shed  # the image queue bound is still reached, not only the byte bound
    # Memory does not grow with the number of requests: the second phase stays near the first.
    assert second["rss_max_mb"] < 1.5 * first["rss_max_mb"] + 256, (first, second)
