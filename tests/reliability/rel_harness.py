"""Shared helpers for the reliability tests: a reference onnxruntime, channels, metrics, results to report."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from server_process import ServerProcess

from bench.metrics_text import Snapshot
from serving.client import infer_request, probabilities
from serving.protos import grpc_service_pb2_grpc as pb_grpc

# Clients may send more than any server limit, so the server (not the client) decides what is too big.
CLIENT_OPTIONS = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]


class Reference:
    """In-process onnxruntime on the same model file: the answers the server must give."""

    def __init__(self, model_path: Path, images: np.ndarray) -> None:
        import onnxruntime as ort

        from training.data import to_model_input

        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        self.images = images.reshape(-1, 784)
        self.probs = session.run(None, {name: to_model_input(self.images)})[0]

    def check(self, lo: int, n: int, probs: np.ndarray) -> bool:
        """True if `probs` are the model's answer for images[lo:lo+n] (batching changes only float rounding)."""
        want = self.probs[lo : lo + n]
        return probs.shape == want.shape and bool(np.allclose(probs, want, atol=1e-5))


def wait_until(condition, what: str, server: ServerProcess | None = None, timeout: float = 60) -> None:
    """Poll `condition()` until it is true; fail naming `what` (with the server's log tail) after `timeout`
    seconds, or at once if `server` has exited."""
    deadline = time.monotonic() + timeout
    while not condition():
        _check_waiting(what, server, deadline)
        time.sleep(0.05)


async def until(condition, what: str, server: ServerProcess | None = None, timeout: float = 60) -> None:
    """wait_until for async tests: the event loop (a running load) goes on between polls; `condition()` may
    return an awaitable."""
    deadline = time.monotonic() + timeout
    while not await _resolved(condition()):
        _check_waiting(what, server, deadline)
        await asyncio.sleep(0.05)


async def _resolved(value):
    return await value if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future) else value


def _check_waiting(what: str, server: ServerProcess | None, deadline: float) -> None:
    log = f":\n{server.log()[-3000:]}" if server is not None else ""
    assert time.monotonic() < deadline, f"timed out waiting for {what}{log}"
    assert server is None or server.proc.poll() is None, f"server exited while waiting for {what}{log}"


def channel(server: ServerProcess) -> grpc.Channel:
    return grpc.insecure_channel(server.url, options=CLIENT_OPTIONS)


def infer_ok(server: ServerProcess, images: np.ndarray, version: str = "", timeout: float = 30):
    """One plain request; returns (probabilities, model_version)."""
    with channel(server) as ch:
        reply = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(
            infer_request(images, "mnist", version), timeout=timeout
        )
    return probabilities(reply), reply.model_version


@dataclass
class Outcome:
    """One request of a load test: when it was sent and answered, its status code, the version that answered it
    and whether the answer was right."""

    sent: float
    done: float
    code: str
    version: str = ""
    correct: bool = False


async def checked_stream(
    stub,
    reference,
    seed: int,
    step: int,
    outcomes: list[Outcome],
    stop: asyncio.Event,
    version: str = "",
    max_images: int = 32,
) -> None:
    """One client's load until `stop`: requests of 1..max_images test images one after another (this client's
    share: seed, seed + step, ...), each answer checked against `reference` and kept as an Outcome."""
    i = seed
    while not stop.is_set():
        n = 1 + i % max_images
        lo = (i * 37) % (2048 - n)
        i += step
        sent = time.monotonic()
        try:
            reply = await stub.ModelInfer(infer_request(reference.images[lo : lo + n], "mnist", version), timeout=30)
        except grpc.aio.AioRpcError as err:
            outcomes.append(Outcome(sent, time.monotonic(), err.code().name))
            await asyncio.sleep(0.01)
            continue
        ok = reference.check(lo, n, probabilities(reply))
        outcomes.append(Outcome(sent, time.monotonic(), "OK", reply.model_version, ok))


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0.0 when the series is absent)."""
    return Snapshot(text).first(name, **labels)


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of every sample of `name` whose labels include `labels` (e.g. over models and versions)."""
    return Snapshot(text).get(name, **labels)


def report(name: str, result: dict) -> None:
    """Record measured numbers: appended as JSON lines to $RELIABILITY_REPORT (for docs/reliability.md)."""
    path = os.environ.get("RELIABILITY_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({name: result}) + "\n")


def histogram_quantile(text: str, name: str, q: float, **labels: str) -> float:
    """Upper bound (`le`) of the bucket holding quantile `q` of a Prometheus histogram (summed over series)."""
    return Snapshot(text).quantile(name, q, **labels)


def add_version(model_dir: Path, version: int, source: Path, onnx: bytes | None = None) -> Path:
    """Publish a version the safe way: build it in a hidden `.tmp-*` folder, then rename it into place."""
    tmp = model_dir / f".tmp-{version}"
    shutil.copytree(source, tmp)
    if onnx is not None:
        (tmp / "model.onnx").write_bytes(onnx)
    return tmp.rename(model_dir / str(version))


def shifted_model(path: Path) -> bytes:
    """A well-formed model with the right shapes that answers (true class + 1) % 10: a parity failure."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if init.dims and init.dims[-1] == 10:  # the output layer's weight [512, 10] and bias [10]
            shifted = np.roll(numpy_helper.to_array(init), 1, axis=-1)
            init.CopyFrom(numpy_helper.from_array(shifted, init.name))
    return model.SerializeToString()
