"""The real server over the wire, driven by an unmodified tritonclient and by our own stubs."""

from __future__ import annotations

import json
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.utils import InferenceServerException

from serving.protos import feedback_pb2_grpc
from serving.protos import grpc_service_pb2 as pb
from serving.protos import grpc_service_pb2_grpc as pb_grpc


def infer(client, x: np.ndarray, datatype: str, outputs=None, **kw):
    """tritonclient always sends raw_input_contents over gRPC."""
    tensor = tc.InferInput("input", list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    requested = [tc.InferRequestedOutput(o) for o in outputs] if outputs else None
    return client.infer("mnist", [tensor], outputs=requested, **kw)


def metadata(repository):
    return json.loads((repository / "mnist" / "1" / "metadata.json").read_text())


def test_live_ready_metadata_config(triton):
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready("mnist")
    assert triton.is_model_ready("mnist", "1")
    assert not triton.is_model_ready("mnist", "99")
    meta = triton.get_model_metadata("mnist")
    assert meta.name == "mnist" and list(meta.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("input", "FP32", [-1, 784])]
    assert [t.name for t in meta.outputs] == ["probabilities", "predicted_class"]
    config = triton.get_model_config("mnist").config
    assert config.max_batch_size == 1024
    assert list(config.input[0].dims) == [784] and list(config.output[0].dims) == [10]


def test_the_provider_really_in_use_is_reported(triton, server, active_provider):
    """The provider onnxruntime really runs here (CPU without CUDA; a silent CUDA->CPU fallback would show)
    in metadata, config, metrics and the log."""
    assert triton.get_model_metadata("mnist").platform == f"onnxruntime_onnx:{active_provider}"
    assert triton.get_server_metadata().version.endswith(f"({active_provider})")
    params = triton.get_model_config("mnist").config.parameters
    assert params["execution_provider"].string_value == active_provider
    assert f'mnist_serving_execution_provider_info{{model="mnist",provider="{active_provider}",version="1"}} 1.0' in (
        server.metrics()
    )
    assert f"loaded model mnist version 1 on {active_provider}" in server.log()


def test_node_placement_is_reported_in_config_and_metrics(triton, server, active_provider):
    """Where onnxruntime put every node, per input type, from its own assignment record (not get_providers())."""
    params = triton.get_model_config("mnist").config.parameters
    placement = json.loads(params["node_placement"].string_value)
    assert placement == {
        "FP32": {active_provider: ["Gemm", "Gemm", "Relu", "Softmax"]},
        "UINT8": {active_provider: ["Cast", "Div", "Gemm", "Gemm", "Relu", "Softmax"]},
    }
    text = server.metrics()
    for input_type, nodes in (("FP32", 4), ("UINT8", 6)):
        series = (
            f'mnist_serving_execution_nodes{{input="{input_type}",model="mnist",provider="{active_provider}",'
            f'version="1"}} {nodes:.1f}'
        )
        assert series in text


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
@pytest.mark.parametrize("datatype", ["FP32", "UINT8"])
@pytest.mark.parametrize("batch", [1, 256])
def test_infer_matches_in_process_onnxruntime(triton, stub, trained_repository, mnist_data, datatype, raw, batch):
    import onnxruntime as ort

    from training.data import to_model_input

    images = mnist_data.x_test[:batch]
    x = images.reshape(batch, 784) if datatype == "UINT8" else to_model_input(images)
    if raw:
        result = infer(triton, x, datatype, request_id=f"req-{datatype}-{batch}")
        probs, classes, request_id = (
            result.as_numpy("probabilities"),
            result.as_numpy("predicted_class"),
            result.get_response().id,
        )
    else:  # typed contents: fp32_contents / uint_contents, with our own stubs
        field = "uint_contents" if datatype == "UINT8" else "fp32_contents"
        tensor = pb.ModelInferRequest.InferInputTensor(
            name="input",
            datatype=datatype,
            shape=x.shape,
            contents=pb.InferTensorContents(**{field: x.ravel().tolist()}),
        )
        request = pb.ModelInferRequest(model_name="mnist", id=f"req-{datatype}-{batch}", inputs=[tensor])
        reply = stub.ModelInfer(request, timeout=30)
        probs = np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(batch, 10)
        classes, request_id = np.frombuffer(reply.raw_output_contents[1], "<i8"), reply.id
    session = ort.InferenceSession(str(trained_repository / "mnist/1/model.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": to_model_input(images)})[0]
    assert probs.shape == (batch, 10)
    np.testing.assert_array_equal(probs.argmax(1), expected.argmax(1))
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    np.testing.assert_array_equal(classes.ravel(), expected.argmax(1))
    assert request_id == f"req-{datatype}-{batch}"


def test_28x28_shape_and_single_output(triton, mnist_data):
    result = infer(triton, mnist_data.x_test[:3], "UINT8", outputs=["predicted_class"])
    assert result.as_numpy("probabilities") is None
    assert result.as_numpy("predicted_class").shape == (3, 1)


def test_whole_test_set_gives_the_recorded_accuracy(triton, mnist_data, trained_repository):
    correct = 0
    for lo in range(0, 10_000, 1000):
        result = infer(triton, mnist_data.x_test[lo : lo + 1000].reshape(-1, 784), "UINT8")
        correct += int((result.as_numpy("probabilities").argmax(1) == mnist_data.y_test[lo : lo + 1000]).sum())
    assert correct / 10_000 == pytest.approx(metadata(trained_repository)["test_accuracy"], abs=1e-9)


def _raw_request(**overrides) -> pb.ModelInferRequest:
    fields = dict(
        model_name="mnist",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="UINT8", shape=[1, 784])],
        raw_input_contents=[bytes(784)],
    )
    fields.update(overrides)
    return pb.ModelInferRequest(**fields)


def _tensor(**kw):
    base = dict(name="input", datatype="UINT8", shape=[1, 784])
    base.update(kw)
    return [pb.ModelInferRequest.InferInputTensor(**base)]


NAN = np.full(784, np.nan, np.float32).tobytes()
ERROR_CASES = {
    "wrong shape": (
        _raw_request(inputs=_tensor(shape=[1, 783])),
        "INVALID_ARGUMENT",
        "input 'input' has shape [1, 783]: expected [N,784]",
    ),
    "wrong rank": (
        _raw_request(inputs=_tensor(shape=[784])),
        "INVALID_ARGUMENT",
        "input 'input' has shape [784]: expected",
    ),
    "wrong datatype": (
        _raw_request(inputs=_tensor(datatype="INT32")),
        "INVALID_ARGUMENT",
        "input 'input' has datatype 'INT32': expected FP32 or UINT8",
    ),
    "short bytes": (
        _raw_request(raw_input_contents=[bytes(783)]),
        "INVALID_ARGUMENT",
        "input 'input' UINT8 shape [1, 784] needs 784 bytes, got 783",
    ),
    "nan": (
        _raw_request(inputs=_tensor(datatype="FP32"), raw_input_contents=[NAN]),
        "INVALID_ARGUMENT",
        "FP32 pixels must be finite and in [0, 1] (pixel/255); got values in [nan, nan]",
    ),
    "inf": (
        _raw_request(inputs=_tensor(datatype="FP32"), raw_input_contents=[np.full(784, np.inf, "<f4").tobytes()]),
        "INVALID_ARGUMENT",
        "FP32 pixels must be finite and in [0, 1] (pixel/255); got values in [inf, inf]",
    ),
    "uint8 over 255": (
        _raw_request(inputs=_tensor(contents=pb.InferTensorContents(uint_contents=[256] * 784)), raw_input_contents=[]),
        "INVALID_ARGUMENT",
        "UINT8 pixel value 256 is out of range 0-255",
    ),
    "batch over max": (
        _raw_request(inputs=_tensor(shape=[1025, 784]), raw_input_contents=[bytes(1025 * 784)]),
        "INVALID_ARGUMENT",
        "batch of 1025 images is over the model's max_batch_size 1024",
    ),
    "zero batch": (
        _raw_request(inputs=_tensor(shape=[0, 784]), raw_input_contents=[b""]),
        "INVALID_ARGUMENT",
        "batch dimension is 0: expected at least 1 image",
    ),
    "missing input": (
        _raw_request(inputs=[], raw_input_contents=[]),
        "INVALID_ARGUMENT",
        "expected exactly 1 input tensor named 'input', got 0",
    ),
    "no data": (_raw_request(raw_input_contents=[]), "INVALID_ARGUMENT", "input 'input' has no data"),
    "unknown input": (
        _raw_request(inputs=_tensor(name="x")),
        "INVALID_ARGUMENT",
        "unknown input 'x': the model's only input is 'input'",
    ),
    "unknown output": (
        _raw_request(outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="logits")]),
        "INVALID_ARGUMENT",
        "unknown output 'logits': the model's outputs are probabilities, predicted_class",
    ),
    "label out of range": (
        _raw_request(parameters={"label": pb.InferParameter(int64_param=10)}),
        "INVALID_ARGUMENT",
        "labels must be in 0-9",
    ),
    "unknown model": (_raw_request(model_name="resnet"), "NOT_FOUND", "unknown model 'resnet' (models: mnist)"),
    "unknown version": (_raw_request(model_version="7"), "NOT_FOUND", "model 'mnist' has no version '7' (versions: 1)"),
}


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.mark.parametrize("case", list(ERROR_CASES), ids=list(ERROR_CASES))
def test_bad_requests_get_their_status_code(stub, case):
    request, code, fragment = ERROR_CASES[case]
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request, timeout=10)
    assert err.value.code().name == code
    assert err.value.details().startswith(fragment), err.value.details()


def test_server_survives_bad_requests_and_tritonclient_sees_the_code(triton, mnist_data):
    with pytest.raises(InferenceServerException) as err:
        infer(triton, np.full((1, 784), 300.0, np.float32), "FP32")
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert infer(triton, mnist_data.x_test[:1].reshape(1, 784), "UINT8").as_numpy("probabilities").shape == (1, 10)


def test_unimplemented_rpcs(triton):
    with pytest.raises(InferenceServerException) as err:
        triton.get_system_shared_memory_status()
    assert err.value.status() == "StatusCode.UNIMPLEMENTED"


def test_statistics_are_true(triton, mnist_data):
    before = triton.get_inference_statistics("mnist").model_stats[0]
    sent_ms = int(time.time() * 1000)
    for n in (1, 5, 7):
        infer(triton, mnist_data.x_test[:n].reshape(n, 784), "UINT8")
    answered_ms = int(time.time() * 1000)
    after = triton.get_inference_statistics("mnist").model_stats[0]
    assert after.inference_count - before.inference_count == 13
    assert after.inference_stats.success.count - before.inference_stats.success.count == 3
    assert after.inference_stats.success.ns > before.inference_stats.success.ns
    assert after.execution_count - before.execution_count == 3  # sequential requests are not merged
    assert sent_ms <= after.last_inference <= answered_ms + 1  # this run's last request, in ms since the epoch


def test_health_per_service_and_reflection(server):
    with grpc.insecure_channel(server.url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "liveness", "mnist", "inference.GRPCInferenceService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(service="resnet"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"inference.GRPCInferenceService", "mnist.feedback.v1.FeedbackService", "grpc.health.v1.Health"} <= names


def test_feedback_rpc(server, mnist_data, stub):
    from serving.client import feedback_request, infer_request, probabilities, receipt_of

    images, labels = mnist_data.x_test[:20], mnist_data.y_test[:20]
    response = stub.ModelInfer(infer_request(images, "mnist"))
    predicted = probabilities(response).argmax(1)
    with grpc.insecure_channel(server.url) as channel:
        feedback = feedback_pb2_grpc.FeedbackServiceStub(channel)
        reply = feedback.SendFeedback(feedback_request(receipt_of(response), labels), timeout=5)
        assert (reply.matched, reply.correct, reply.duplicate) == (20, int((predicted == labels).sum()), 0)
        for bad in (feedback_request(receipt_of(response), [10]), feedback_request("not-a-receipt", [3])):
            with pytest.raises(grpc.RpcError) as err:
                feedback.SendFeedback(bad, timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
