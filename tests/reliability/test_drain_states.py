"""What a draining server says while it drains, and what happens when the grace period runs out."""

from __future__ import annotations

import signal
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rel_harness import channel
from server_process import start_server

from serving.client import infer_request, probabilities
from serving.protos import grpc_service_pb2 as pb
from serving.protos import grpc_service_pb2_grpc as pb_grpc
from serving.server import LIVENESS

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_during_the_drain_delay_it_is_not_ready_but_answers(trained_repository, tmp_path, reference):
    server = start_server(trained_repository, tmp_path, "--drain-delay-s", "3")
    try:
        with channel(server) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            health = health_pb2_grpc.HealthStub(ch)
            assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
            server.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 2
            while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status != NOT_SERVING:
                assert time.monotonic() < deadline, "health never turned NOT_SERVING"
                time.sleep(0.02)
            assert not stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
            assert not stub.ModelReady(pb.ModelReadyRequest(name="mnist"), timeout=5).ready
            for service in ("inference.GRPCInferenceService", "mnist"):
                assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == NOT_SERVING
            assert health.Check(health_pb2.HealthCheckRequest(service=LIVENESS), timeout=5).status == SERVING
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
            # ... and inference still works: clients that have not noticed yet get answers, not errors.
            reply = stub.ModelInfer(infer_request(reference.images[:8], "mnist"), timeout=5)
            assert reference.check(0, 8, probabilities(reply))
        assert server.proc.wait(15) == 0
    finally:
        server.stop(signal.SIGKILL)


def test_calls_still_running_when_the_grace_runs_out_are_ended_and_the_server_exits(
    trained_repository, tmp_path, reference
):
    # Batches held 5 s in the queue: a call is certain to be in flight when the 0.5 s grace ends.
    server = start_server(
        trained_repository,
        tmp_path,
        *("--grace-period-s", "0.5", "--max-queue-delay-us", "5000000"),
    )
    outcome: dict = {}

    def call() -> None:
        with channel(server) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            try:
                stub.ModelInfer(infer_request(reference.images[:2], "mnist"), timeout=30)
                outcome["code"] = grpc.StatusCode.OK
            except grpc.RpcError as err:
                outcome["code"] = err.code()

    caller = threading.Thread(target=call)
    try:
        caller.start()
        time.sleep(1.0)  # the call is queued in the batcher
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(15)
        exited = time.monotonic() - signalled
        caller.join(15)
    finally:
        server.stop(signal.SIGKILL)
    assert not caller.is_alive(), "the client hung after the server left"
    assert outcome["code"] in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), outcome
    assert code == 0, server.log()[-2000:]
    assert exited < 4, exited  # the grace (0.5 s) plus the refusal window, not the 5 s batch delay
