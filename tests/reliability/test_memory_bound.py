"""The per-process bytes-in-flight bound: large requests beyond it get RESOURCE_EXHAUSTED, none is lost."""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import numpy as np
from rel_harness import CLIENT_OPTIONS, infer_ok, metric_sum, metric_value, report
from server_process import start_server

from serving.client import infer_request
from serving.protos import grpc_service_pb2_grpc as pb_grpc

BATCH = 1024
REQUEST_BYTES = BATCH * 784 * 4  # FP32 tensor bytes, plus a small envelope
CLIENTS, PER_CLIENT = 12, 4


async def _burst(url: str, request) -> tuple[Counter, int]:
    codes: Counter = Counter()
    sent = 0
    async with grpc.aio.insecure_channel(url, options=CLIENT_OPTIONS) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)

        async def client():
            nonlocal sent
            for _ in range(PER_CLIENT):
                sent += 1
                try:
                    await stub.ModelInfer(request, timeout=60)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as err:
                    codes[err.code().name] += 1

        await asyncio.gather(*[client() for _ in range(CLIENTS)])
    return codes, sent


async def test_bytes_beyond_the_bound_are_refused_and_nothing_is_lost(trained_repository, tmp_path, reference):
    # Room for two 1024-image FP32 requests; the image queue is far larger, so only the byte bound sheds.
    server = start_server(
        trained_repository, tmp_path, "--max-batch-size", str(BATCH), "--max-queue-images", "65536",
        "--max-inflight-bytes", str(2 * REQUEST_BYTES + 4096),
    )  # fmt: skip
    try:
        request = infer_request(np.resize(reference.images, (BATCH, 784)), "mnist", datatype="FP32")
        codes, sent = await _burst(server.url, request)
        probs, _ = infer_ok(server, reference.images[:100])  # the bound is released: plain requests pass
        assert reference.check(0, 100, probs)
        text = server.metrics()
    finally:
        assert server.stop() == 0, server.log()
    assert sum(codes.values()) == sent == CLIENTS * PER_CLIENT  # every request answered
    assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"}, codes
    # Refused unread (model unknown: model="") or once read (model="mnist"): each counted once.
    assert metric_sum(text, "mnist_serving_shed_total", reason="inflight_bytes") == codes["RESOURCE_EXHAUSTED"]
    assert metric_sum(text, "mnist_serving_shed_total", model="", reason="inflight_bytes") > 0  # some never read
    assert metric_value(text, "mnist_serving_shed_total", reason="queue_full") == 0


def _memory_burst_script():
    import importlib.util

    from server_process import ROOT

    spec = importlib.util.spec_from_file_location("memory_burst", ROOT / "scripts" / "memory_burst.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_does_not_grow_with_the_number_of_large_callers(trained_repository, tmp_path):
    """scripts/memory_burst.py at a smaller scale, default flags: 8 then 64 callers of 1024-image FP32 requests,
    closed loop over 16 connections. gRPC buffers at most --stream-window-bytes of each call the server has not
    read, so 56 more callers add a few MiB, not their requests (with gRPC's BDP-tuned windows: ~5 MiB each).
    Refusals are RESOURCE_EXHAUSTED only, and the server answers afterwards."""
    from bench.loadgen import LoadGenerator

    script = _memory_burst_script()
    server = start_server(trained_repository, tmp_path, "--max-batch-size", str(BATCH))
    images = np.random.default_rng(0).integers(0, 256, (BATCH, 784), dtype=np.uint8)
    try:
        with LoadGenerator(server.url, images, np.zeros(BATCH, dtype=np.int64)) as gen:
            few = script.phase(gen, server.child, 8, 16, 3.0, stream=False)
            many = script.phase(gen, server.child, 64, 16, 3.0, stream=False)
            after = script.phase(gen, server.child, 1, 1, 1.0, stream=False)
    finally:
        code = server.stop()
    assert code == 0
    for p in (few, many, after):
        assert set(p["codes"]) <= {"OK", "RESOURCE_EXHAUSTED"}, p
    assert after["codes"].get("OK", 0) > 0 and few["codes"].get("RESOURCE_EXHAUSTED", 0) > 0, (few, after)
    growth = many["rss_peak_mib"] - few["rss_peak_mib"]
    report("memory_callers", {"few": few, "many": many, "growth_mib": growth})
    # 56 more callers: 56 x 128 KiB of window plus gRPC's per-call state (~0.1 MiB each, measured) = ~13 MiB.
    assert growth <= 40, (few, many)
