"""Deadlines: a request whose deadline passes while it waits in the queue is dropped before compute."""

from __future__ import annotations

import grpc
from rel_harness import channel, infer_ok, metric_value, report
from server_process import start_server

from serving.client import infer_request, probabilities
from serving.protos import grpc_service_pb2 as pb
from serving.protos import grpc_service_pb2_grpc as pb_grpc

SHORT = 16  # requests with a deadline far shorter than the queue wait
IMAGES = 16  # per request: all of them together stay under max_batch_size, so the batch waits the full delay
WAIT_S = 3.0  # --max-queue-delay-us: how long the queued batch waits for more requests
DEADLINE_S = 1.0


def test_expired_requests_are_shed_before_compute(trained_repository, tmp_path, reference):
    # A batch waits WAIT_S for company: every request sits in the queue that long.
    server = start_server(
        trained_repository, tmp_path,
        "--max-queue-delay-us", str(int(WAIT_S * 1e6)), "--max-batch-size", "1024",
    )  # fmt: skip
    try:
        with channel(server) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            before = stub.ModelStatistics(pb.ModelStatisticsRequest(name="mnist"), timeout=10).model_stats[0]
            images = reference.images[:IMAGES]
            patient = stub.ModelInfer.future(infer_request(images, "mnist"), timeout=60)
            hurried = [stub.ModelInfer.future(infer_request(images, "mnist"), timeout=DEADLINE_S) for _ in range(SHORT)]
            codes = []
            for call in hurried:
                try:
                    call.result()
                    codes.append("OK")
                except grpc.RpcError as err:
                    codes.append(err.code().name)
            answer = patient.result()  # the request without a short deadline is answered, and correctly
            assert reference.check(0, IMAGES, probabilities(answer))
            after = stub.ModelStatistics(pb.ModelStatisticsRequest(name="mnist"), timeout=10).model_stats[0]
        text = server.metrics()
        shed = metric_value(text, "mnist_serving_shed_total", reason="deadline")
        computed = after.inference_count - before.inference_count
        result = {
            "short_deadline_requests": SHORT,
            "client_deadline_exceeded": codes.count("DEADLINE_EXCEEDED"),
            "shed_deadline_metric": shed,
            # The client ends the call at its deadline, so the server sees a cancellation.
            "requests_total_cancelled": metric_value(text, "mnist_serving_requests_total", code="CANCELLED"),
            "images_computed": computed,
            "batches_run": after.execution_count - before.execution_count,
        }
        report("deadlines", result)
        assert codes == ["DEADLINE_EXCEEDED"] * SHORT
        assert shed == SHORT, text
        assert result["requests_total_cancelled"] == SHORT
        assert computed == IMAGES  # only the patient request reached onnxruntime
        assert result["batches_run"] == 1
        # The server is fine afterwards.
        probs, _ = infer_ok(server, reference.images[:8])
        assert reference.check(0, 8, probs)
    finally:
        assert server.stop() == 0, server.log()
