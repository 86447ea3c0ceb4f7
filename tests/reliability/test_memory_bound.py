"""The per-process bytes-in-flight bound: large requests beyond it get RESOURCE_EXHAUSTED, none is lost."""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import numpy as np
from rel_harness import CLIENT_OPTIONS, infer_ok, metric_sum, metric_value
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
