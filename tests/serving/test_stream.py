"""ModelStreamInfer: Triton's bidirectional stream, over the wire (real server) and InferStream's bounds in-process."""

from __future__ import annotations

import asyncio
import queue
import signal
import threading

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from metrics_helpers import scrape
from server_process import start_server

from serving import wire
from serving.client import infer_request, probabilities
from serving.config import Settings
from serving.dataplane import DataPlane
from serving.protos import grpc_service_pb2 as pb
from serving.protos import grpc_service_pb2_grpc as pb_grpc
from serving.state import ServerState
from serving.stream import InferStream
from serving.wire import InferRequest

M = {"model": "mnist", "version": "1"}


def statistics(stub) -> pb.ModelStatistics:
    return stub.ModelStatistics(pb.ModelStatisticsRequest(name="mnist", version="1"), timeout=10).model_stats[0]


def test_every_request_answered_with_its_id_and_errors_keep_the_stream_open(server, mnist_data):
    images = mnist_data.x_test[:4]
    nan = infer_request(images[:1], "mnist", datatype="FP32", request_id="nan")
    nan.raw_input_contents[0] = np.full(784, np.nan, dtype="<f4").tobytes()
    requests = [
        infer_request(images[:1], "mnist", datatype="FP32", request_id="one"),
        nan,
        infer_request(images[:1], "resnet", request_id="no-such-model"),
        infer_request(images[1:4], "mnist", request_id="three"),
        infer_request(images[:2], "mnist", version="1", request_id="two"),
    ]
    with grpc.insecure_channel(server.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        before, metrics_before = statistics(stub), scrape(server)
        answers = {r.infer_response.id: r for r in stub.ModelStreamInfer(iter(requests), timeout=30)}
        unary = {r.id: probabilities(stub.ModelInfer(r, timeout=10)) for r in requests if r.id in ("one", "three")}
        after, metrics_after = statistics(stub), scrape(server)
    assert sorted(answers) == sorted(r.id for r in requests)  # every request once, its id echoed
    assert answers["nan"].error_message.startswith("INVALID_ARGUMENT: FP32 pixels must be finite")
    assert answers["no-such-model"].error_message.startswith("NOT_FOUND: unknown model 'resnet'")
    for rid in ("one", "three", "two"):  # answered after the bad ones: the stream stayed open
        assert answers[rid].error_message == ""
        assert answers[rid].infer_response.model_version == "1"
    for rid in ("one", "three"):
        np.testing.assert_array_equal(probabilities(answers[rid].infer_response), unary[rid])
    assert probabilities(answers["two"].infer_response).shape == (2, 10)

    # Streamed requests count like unary ones (2 more unary calls were made above), and Triton's four
    # per-request counts stay equal (perf_analyzer refuses statistics where they differ).
    s0, s1 = before.inference_stats, after.inference_stats
    assert s1.success.count - s0.success.count == 3 + 2
    assert s1.fail.count - s0.fail.count == 1  # the NaN request; an unknown model has no version to charge
    assert after.inference_count - before.inference_count == 1 + 3 + 2 + 1 + 3
    for name in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert getattr(s1, name).count == s1.success.count, name
    assert s1.compute_input.ns > s0.compute_input.ns and s1.compute_output.ns > s0.compute_output.ns
    assert sum(b.compute_infer.count for b in after.batch_stats) == after.execution_count
    for b in after.batch_stats:
        assert b.compute_input.count == b.compute_infer.count == b.compute_output.count, b.batch_size
    ok = metrics_after.get("mnist_serving_requests_total", **M, code="OK")
    assert ok - metrics_before.get("mnist_serving_requests_total", **M, code="OK") == 5
    bad = metrics_after.get("mnist_serving_requests_total", **M, code="INVALID_ARGUMENT")
    assert bad - metrics_before.get("mnist_serving_requests_total", **M, code="INVALID_ARGUMENT") == 1


def test_tritonclient_stream_answers_the_test_set(server, mnist_data):
    """tritonclient's own start_stream / async_stream_infer, unmodified: 300 requests in flight together."""
    n = 300
    answers: queue.Queue = queue.Queue()
    client = tc.InferenceServerClient(server.url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i in range(n):
            tensor = tc.InferInput("input", [1, 784], "UINT8")
            tensor.set_data_from_numpy(mnist_data.x_test[i].reshape(1, 784))
            client.async_stream_infer("mnist", [tensor], request_id=str(i))
        got = {}
        for _ in range(n):
            result, error = answers.get(timeout=30)
            assert error is None, error
            got[int(result.get_response().id)] = int(result.as_numpy("probabilities").argmax())
    finally:
        client.stop_stream()
        client.close()
    assert sorted(got) == list(range(n))
    predicted = np.array([got[i] for i in range(n)])
    assert (predicted == mnist_data.y_test[:n]).mean() > 0.9


def test_a_cancelled_stream_leaves_nothing_in_flight(server, mnist_data):
    request = infer_request(mnist_data.x_test[:1], "mnist")
    with grpc.insecure_channel(server.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        call = stub.ModelStreamInfer(iter([request] * 5000), timeout=30)
        next(call)  # the stream is running
        call.cancel()
        with pytest.raises(grpc.RpcError) as err:
            for _ in call:
                pass
        assert err.value.code() == grpc.StatusCode.CANCELLED
        assert stub.ModelInfer(request, timeout=10).model_version == "1"  # still serving
    for _ in range(50):  # the server notices the cancellation asynchronously
        if scrape(server).get("mnist_serving_requests_in_flight") == 0:
            break
        threading.Event().wait(0.1)
    assert scrape(server).get("mnist_serving_requests_in_flight") == 0


def test_sigterm_answers_what_was_accepted_then_ends_the_stream_unavailable(trained_repository, tmp_path, mnist_data):
    srv = start_server(trained_repository, tmp_path, "--metrics-port", "0", "--grace-period-s", "5")
    request = infer_request(mnist_data.x_test[:1], "mnist", request_id="before")
    more = threading.Event()

    def requests():
        yield request
        more.wait(30)  # an idle client: nothing more to send until the stream ends

    try:
        with grpc.insecure_channel(srv.url) as channel:
            call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests(), timeout=30)
            assert next(call).infer_response.id == "before"
            srv.proc.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as err:
                next(call)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in err.value.details()
            more.set()
        assert srv.stop(timeout=30) == 0, srv.log()
    finally:
        more.set()
        srv.stop(signal.SIGKILL)


# ---------------------------------------------------------------- InferStream in-process


class GatedServicer(DataPlane):
    """The data plane with `infer` replaced: it waits for `gate` and tracks how many run at once (the stream's own
    operations, reading and its window, are the real ones)."""

    def __init__(self, limit: int) -> None:
        super().__init__(None, Settings(stream_max_in_flight=limit, model_repository="unused"), ServerState(), None)
        self.gate = asyncio.Event()
        self.active = self.peak = 0

    async def infer(self, request, deadline, stream=False, span=None):
        assert stream  # a streamed request may wait for room in the queue
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await self.gate.wait()
            return pb.ModelInferResponse(id=request.message.id).SerializeToString()
        finally:
            self.active -= 1


async def _requests(n: int, then_wait: asyncio.Event | None = None):
    for i in range(n):
        yield InferRequest.of(pb.ModelInferRequest(id=str(i)))
    if then_wait is not None:
        await then_wait.wait()


async def test_a_fast_client_is_held_to_the_in_flight_bound():
    servicer = GatedServicer(limit=4)
    stream = InferStream(servicer, _requests(100), None)
    collected = asyncio.create_task(_collect(stream))
    await asyncio.sleep(0.05)
    assert servicer.active == 4  # the server stopped reading: the other 96 wait in the client / HTTP/2 window
    servicer.gate.set()
    ids = await asyncio.wait_for(collected, 10)
    assert sorted(ids, key=int) == [str(i) for i in range(100)]
    assert servicer.peak == 4


async def test_a_stream_waits_while_the_process_holds_its_byte_budget_and_is_never_refused():
    servicer = GatedServicer(limit=8)
    admission = servicer.admission
    admission.typical = 1 << 20
    admission.hold(admission.budget)  # other calls hold the whole budget
    stream = InferStream(servicer, _requests(3), None)
    collected = asyncio.create_task(_collect(stream))
    await asyncio.sleep(0.05)
    assert servicer.active == 0 and admission.reading == 0  # nothing read: waiting for room, not refused
    admission.release(admission.budget)
    await asyncio.sleep(0.05)
    assert servicer.active == 3 and admission.reading == 0 and admission.held == 0
    servicer.gate.set()
    assert sorted(await asyncio.wait_for(collected, 5)) == ["0", "1", "2"]


async def test_drain_answers_accepted_requests_and_ends_the_stream():
    servicer = GatedServicer(limit=8)
    idle = asyncio.Event()
    stream = InferStream(servicer, _requests(3, then_wait=idle), None)
    collected = asyncio.create_task(_collect(stream))
    await asyncio.sleep(0.05)
    assert servicer.active == 3
    servicer.state.refusing = True  # what the server's stop() does after the drain delay
    await asyncio.sleep(0.05)
    assert not collected.done()  # accepted requests are still being answered
    servicer.gate.set()
    assert sorted(await asyncio.wait_for(collected, 10)) == ["0", "1", "2"]
    assert stream.cut_by_drain
    idle.set()


async def _collect(stream: InferStream) -> list[str]:
    return [
        pb.ModelStreamInferResponse.FromString(wire.serialize(r)).infer_response.id async for r in stream.responses()
    ]


async def test_drain_after_the_client_closed_its_side_ends_the_stream_ok():
    servicer = GatedServicer(limit=8)
    stream = InferStream(servicer, _requests(3), None)  # sends 3, then half-closes
    collected = asyncio.create_task(_collect(stream))
    await asyncio.sleep(0.05)
    assert servicer.active == 3 and not stream.reading
    servicer.state.refusing = True
    servicer.gate.set()
    assert sorted(await asyncio.wait_for(collected, 10)) == ["0", "1", "2"]
    assert not stream.cut_by_drain  # nothing was refused: no UNAVAILABLE for this client
