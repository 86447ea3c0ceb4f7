"""Helpers for the metrics tests: parsed /metrics snapshots, exact deltas, stubs and golden-set accuracy."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc

from bench.metrics_text import Snapshot
from serving.protos import feedback_pb2_grpc
from serving.protos import grpc_service_pb2_grpc as pb_grpc

GOLDEN = 1000  # canary images in these tests
CANARY = "mnist_serving_canary_accuracy"
RUNS = "mnist_serving_canary_runs_total"
V1, V2 = {"model": "mnist", "version": "1"}, {"model": "mnist", "version": "2"}


def scrape(server) -> Snapshot:
    return Snapshot(server.metrics())


def delta(before: Snapshot, after: Snapshot, name: str, **labels: str) -> float:
    return after.get(name, **labels) - before.get(name, **labels)


def wait_for_metric(server, name: str, timeout: float = 30, **labels: str) -> Snapshot:
    """Scrape until a series appears (e.g. the first canary result); fail with the server log if not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snap = scrape(server)
        if snap.has(name, **labels):
            return snap
        if server.proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"{name}{labels} never appeared in /metrics:\n{server.log()[-3000:]}")


def wait_runs(server, runs: int, timeout: float = 30, **labels: str) -> None:
    """Scrape until the canary has run `runs` times successfully on the version in `labels`."""
    deadline = time.monotonic() + timeout
    while scrape(server).get(RUNS, **labels, result="ok") < runs:
        assert time.monotonic() < deadline, f"fewer than {runs} canary runs:\n{server.log()[-3000:]}"
        assert server.proc.poll() is None, server.log()
        time.sleep(0.1)


def metadata(repository: Path, version: int = 1) -> dict:
    return json.loads((repository / "mnist" / str(version) / "metadata.json").read_text())


def stubs(url: str, own_connection: bool = False):
    """(channel, inference stub, feedback stub) for a server URL; close the channel when done.

    `own_connection`: a new TCP connection instead of one shared with other channels to the same address
    (with --workers, each connection lands on one worker)."""
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    if own_connection:
        options.append(("grpc.use_local_subchannel_pool", 1))
    channel = grpc.insecure_channel(url, options=options)
    return channel, pb_grpc.GRPCInferenceServiceStub(channel), feedback_pb2_grpc.FeedbackServiceStub(channel)


def in_process_accuracy(model_path: Path, mnist_data, images: int = GOLDEN) -> float:
    """What onnxruntime in this process scores on the first `images` MNIST test images (the golden set)."""
    import onnxruntime as ort

    from serving.golden import accuracy
    from training.data import to_model_input

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    probs = session.run(None, {session.get_inputs()[0].name: to_model_input(mnist_data.x_test[:images])})[0]
    return accuracy(probs, mnist_data.y_test[:images])
