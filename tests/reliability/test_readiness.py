"""Readiness before the model is loaded: the port answers at once, but nothing claims to be ready until it is.

The load is held deterministically (no timing): the version's metadata.json is a named pipe, so the server's
loader blocks reading it until the test writes the real file's content into the pipe.
"""

from __future__ import annotations

import errno
import os
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rel_harness import channel, infer_ok
from server_process import start_server, wait_serving

from serving.client import infer_request
from serving.protos import grpc_service_pb2 as pb
from serving.protos import grpc_service_pb2_grpc as pb_grpc

GUARD_S = 60  # hang guard only
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _first_health_answer(server, health) -> int:
    deadline = time.monotonic() + GUARD_S
    while True:
        assert server.proc.poll() is None, server.log()
        try:
            return health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
        except grpc.RpcError:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)


def _feed(fifo, content: bytes, server) -> None:
    """Write `content` into the pipe once the server's loader has opened it for reading."""
    deadline = time.monotonic() + GUARD_S
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until a reader has it open
            break
        except OSError as exc:
            assert exc.errno == errno.ENXIO and time.monotonic() < deadline, (exc, server.log())
            assert server.proc.poll() is None, server.log()
            time.sleep(0.05)
    try:
        os.set_blocking(fd, True)
        os.write(fd, content)
    finally:
        os.close(fd)


def test_nothing_is_ready_until_the_model_is_loaded(repository, tmp_path, reference):
    metadata = repository / "mnist" / "1" / "metadata.json"
    content = metadata.read_bytes()
    metadata.unlink()
    os.mkfifo(metadata)
    server = start_server(repository, tmp_path, wait=False)
    fed = False
    try:
        with channel(server) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            infer = pb_grpc.GRPCInferenceServiceStub(ch)
            assert _first_health_answer(server, health) == NOT_SERVING
            status = {
                name: health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
                for name in ("", "inference.GRPCInferenceService", "liveness")
            }
            live = infer.ServerLive(pb.ServerLiveRequest(), timeout=5).live
            ready = infer.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
            model_ready = infer.ModelReady(pb.ModelReadyRequest(name="mnist"), timeout=5).ready
            with pytest.raises(grpc.RpcError) as err:
                infer.ModelInfer(infer_request(reference.images[:1], "mnist"), timeout=5)
            with pytest.raises(grpc.RpcError) as model_health:
                health.Check(health_pb2.HealthCheckRequest(service="mnist"), timeout=5)
        assert status == {"": NOT_SERVING, "inference.GRPCInferenceService": NOT_SERVING, "liveness": SERVING}
        assert (live, ready, model_ready) == (True, False, False)
        # Retryable (UNAVAILABLE), not NOT_FOUND: the model exists on disk and is on its way.
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert err.value.details() == "model 'mnist' is not loaded yet"
        assert model_health.value.code() == grpc.StatusCode.NOT_FOUND  # no per-model status before its load

        _feed(metadata, content, server)
        fed = True
        wait_serving(server, GUARD_S)
        probs, version = infer_ok(server, reference.images[:16])
        with channel(server) as ch:
            infer = pb_grpc.GRPCInferenceServiceStub(ch)
            assert infer.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
            assert infer.ModelReady(pb.ModelReadyRequest(name="mnist"), timeout=5).ready
    finally:
        # A loader still blocked on the pipe would hold the process through SIGTERM: kill it instead.
        code = server.stop() if fed else server.stop(signal.SIGKILL)
    assert version == "1" and reference.check(0, 16, probs)
    assert code == 0, server.log()
