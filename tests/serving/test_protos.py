"""Our generated protos: wire compatibility with tritonclient's, round trips, and freshness."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tritongrpc
from google.protobuf import descriptor_pb2, json_format
from tritonclient.grpc import model_config_pb2 as triton_config
from tritonclient.grpc import service_pb2 as triton_service

from serving.protos import (
    feedback_pb2,
    feedback_pb2_grpc,
    grpc_service_pb2,
    grpc_service_pb2_grpc,
    model_config_pb2,
)

ROOT = Path(__file__).resolve().parents[2]
TRITON_POOL = triton_service.DESCRIPTOR.pool

# Fields of Triton's grpc_service.proto that we deliberately leave out; every other message
# there must be complete. model_config.proto is a subset by design.
SKIPPED_SERVICE_FIELDS = {"inference.ModelStatistics": {"memory_usage", "response_stats"}}


def _messages(file_descriptor):
    """Every message of a file, nested ones (map entries included) too."""
    stack = list(file_descriptor.message_types_by_name.values())
    while stack:
        message = stack.pop()
        yield message
        stack.extend(message.nested_types)


def _enums(file_descriptor):
    yield from file_descriptor.enum_types_by_name.values()
    for message in _messages(file_descriptor):
        yield from message.enum_types


def _field_protos(message):
    """Field number -> (FieldDescriptorProto without oneof_index, oneof name or None)."""
    proto = descriptor_pb2.DescriptorProto()
    message.CopyToProto(proto)
    fields = {}
    for field in proto.field:
        oneof = proto.oneof_decl[field.oneof_index].name if field.HasField("oneof_index") else None
        field.ClearField("oneof_index")
        fields[field.number] = (field, oneof)
    return fields


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(grpc_service_pb2, triton_service), (model_config_pb2, triton_config)],
    ids=["grpc_service", "model_config"],
)
def test_messages_match_triton(ours, theirs):
    assert ours.DESCRIPTOR.name == theirs.DESCRIPTOR.name
    assert ours.DESCRIPTOR.package == theirs.DESCRIPTOR.package == "inference"
    checked = 0
    for message in _messages(ours.DESCRIPTOR):
        their_message = TRITON_POOL.FindMessageTypeByName(message.full_name)
        our_fields, their_fields = _field_protos(message), _field_protos(their_message)
        for number, (field, oneof) in our_fields.items():
            assert number in their_fields, f"{message.full_name}.{field.name} = {number} not in Triton's"
            assert (field, oneof) == their_fields[number], f"{message.full_name}.{field.name} differs"
            checked += 1
        if ours is grpc_service_pb2:
            missing = {f.name for f, _ in their_fields.values()} - {f.name for f, _ in our_fields.values()}
            assert missing == SKIPPED_SERVICE_FIELDS.get(message.full_name, set()), message.full_name
    assert checked > 50


@pytest.mark.parametrize("ours", [grpc_service_pb2, model_config_pb2], ids=["grpc_service", "model_config"])
def test_enums_match_triton(ours):
    enums = list(_enums(ours.DESCRIPTOR))
    assert enums or ours is grpc_service_pb2
    for enum in enums:
        their_enum = TRITON_POOL.FindEnumTypeByName(enum.full_name)
        assert {v.name: v.number for v in enum.values} == {v.name: v.number for v in their_enum.values}


def test_data_type_enum_is_complete():
    assert model_config_pb2.DataType.items() == triton_config.DataType.items()


def test_service_methods_match_triton():
    ours = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = TRITON_POOL.FindServiceByName("inference.GRPCInferenceService")
    assert ours.full_name == theirs.full_name
    assert len(ours.methods) == 12
    for method in ours.methods:
        their_method = theirs.methods_by_name[method.name]
        for attribute in ("full_name", "client_streaming", "server_streaming"):
            assert getattr(method, attribute) == getattr(their_method, attribute), (method.name, attribute)
        assert method.input_type.full_name == their_method.input_type.full_name
        assert method.output_type.full_name == their_method.output_type.full_name
    stream = ours.methods_by_name["ModelStreamInfer"]
    assert stream.client_streaming and stream.server_streaming
    assert hasattr(grpc_service_pb2_grpc, "GRPCInferenceServiceServicer")
    assert hasattr(grpc_service_pb2_grpc, "add_GRPCInferenceServiceServicer_to_server")


def _triton_request():
    request = triton_service.ModelInferRequest(model_name="mnist", model_version="2", id="req-7")
    request.parameters["priority"].uint64_param = 3
    request.parameters["timeout"].int64_param = -1
    request.parameters["note"].string_param = "x"
    request.parameters["flag"].bool_param = True
    request.parameters["scale"].double_param = 0.5
    tensor = request.inputs.add(name="images", datatype="FP32", shape=[2, 784])
    tensor.parameters["binary_data_size"].int64_param = 2 * 784 * 4
    typed = request.inputs.add(name="ids", datatype="INT64", shape=[2])
    typed.contents.int64_contents.extend([-5, 1 << 40])
    output = request.outputs.add(name="probabilities")
    output.parameters["classification"].int64_param = 3
    pixels = np.linspace(0, 1, 2 * 784, dtype=np.float32)
    request.raw_input_contents.append(pixels.tobytes())
    return request, pixels


def test_triton_request_parses_into_ours_and_back():
    theirs, pixels = _triton_request()
    ours = grpc_service_pb2.ModelInferRequest.FromString(theirs.SerializeToString())
    assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(deterministic=True)
    # MessageToDict drops unknown fields, so this fails if any field did not map onto ours.
    assert json_format.MessageToDict(ours) == json_format.MessageToDict(theirs)
    assert (ours.model_name, ours.model_version, ours.id) == ("mnist", "2", "req-7")
    assert ours.parameters["priority"].WhichOneof("parameter_choice") == "uint64_param"
    assert ours.parameters["priority"].uint64_param == 3
    assert ours.parameters["timeout"].int64_param == -1
    assert ours.parameters["scale"].double_param == 0.5
    assert ours.parameters["flag"].bool_param is True
    assert [(t.name, t.datatype, list(t.shape)) for t in ours.inputs] == [
        ("images", "FP32", [2, 784]),
        ("ids", "INT64", [2]),
    ]
    assert list(ours.inputs[1].contents.int64_contents) == [-5, 1 << 40]
    assert ours.outputs[0].name == "probabilities"
    assert ours.outputs[0].parameters["classification"].int64_param == 3
    np.testing.assert_array_equal(np.frombuffer(ours.raw_input_contents[0], dtype=np.float32), pixels)

    back = triton_service.ModelInferRequest.FromString(ours.SerializeToString())
    assert back == theirs


def test_our_response_decodes_with_tritonclient():
    probabilities = np.arange(20, dtype=np.float32).reshape(2, 10) / 20
    ours = grpc_service_pb2.ModelInferResponse(model_name="mnist", model_version="2", id="req-7")
    ours.outputs.add(name="probabilities", datatype="FP32", shape=[2, 10])
    ours.raw_output_contents.append(probabilities.tobytes())
    ours.parameters["sequence_end"].bool_param = False
    stream = grpc_service_pb2.ModelStreamInferResponse(error_message="", infer_response=ours)

    theirs = triton_service.ModelStreamInferResponse.FromString(stream.SerializeToString())
    result = tritongrpc.InferResult(theirs.infer_response)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probabilities)
    assert result.get_response().id == "req-7"


def test_model_config_and_statistics_parse_in_tritonclient():
    config = model_config_pb2.ModelConfig(
        name="mnist",
        platform="onnxruntime_onnx",
        backend="onnxruntime",
        max_batch_size=256,
        input=[model_config_pb2.ModelInput(name="images", data_type=model_config_pb2.TYPE_FP32, dims=[784])],
        output=[model_config_pb2.ModelOutput(name="probs", data_type=model_config_pb2.TYPE_FP32, dims=[10])],
        dynamic_batching=model_config_pb2.ModelDynamicBatching(
            preferred_batch_size=[64, 128], max_queue_delay_microseconds=2000
        ),
        instance_group=[model_config_pb2.ModelInstanceGroup(kind=model_config_pb2.ModelInstanceGroup.KIND_GPU)],
    )
    config.parameters["execution_provider"].string_value = "CUDAExecutionProvider"
    response = grpc_service_pb2.ModelConfigResponse(config=config)
    theirs = triton_service.ModelConfigResponse.FromString(response.SerializeToString())
    assert theirs.config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert list(theirs.config.dynamic_batching.preferred_batch_size) == [64, 128]
    assert theirs.config.instance_group[0].kind == triton_config.ModelInstanceGroup.KIND_GPU
    assert theirs.config.input[0].data_type == triton_config.TYPE_FP32
    assert theirs.config.parameters["execution_provider"].string_value == "CUDAExecutionProvider"

    stats = grpc_service_pb2.ModelStatisticsResponse()
    entry = stats.model_stats.add(name="mnist", version="2", inference_count=10, execution_count=3)
    entry.inference_stats.success.count = 3
    entry.batch_stats.add(batch_size=4).compute_infer.ns = 1234
    parsed = triton_service.ModelStatisticsResponse.FromString(stats.SerializeToString())
    assert parsed.model_stats[0].batch_stats[0].compute_infer.ns == 1234
    assert parsed.model_stats[0].inference_stats.success.count == 3


def test_feedback_contract():
    service = feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"]
    assert service.methods_by_name["SendFeedback"].full_name == "mnist.feedback.v1.FeedbackService.SendFeedback"
    assert hasattr(feedback_pb2_grpc, "add_FeedbackServiceServicer_to_server")
    request = feedback_pb2.FeedbackRequest(
        model_name="mnist",
        model_version="2",
        labels=[feedback_pb2.Label(index=1, label=-1)],
        receipt="AQID",
    )
    parsed = feedback_pb2.FeedbackRequest.FromString(request.SerializeToString())
    assert parsed.labels[0].label == -1
    numbers = {
        message: {f.name: f.number for f in feedback_pb2.DESCRIPTOR.message_types_by_name[message].fields}
        for message in ("FeedbackRequest", "Label", "FeedbackResponse")
    }
    assert numbers == {
        "FeedbackRequest": {"model_name": 1, "model_version": 2, "labels": 4, "receipt": 5},
        "Label": {"index": 1, "label": 2},
        "FeedbackResponse": {"matched": 1, "correct": 2, "duplicate": 4},
    }


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools not installed")
def test_generated_code_is_up_to_date(tmp_path):
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)],
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    committed = ROOT / "serving" / "protos"
    generated = sorted(p.name for p in tmp_path.iterdir())
    assert generated == sorted(p.name for p in committed.glob("*_pb2*"))
    assert len(generated) == 8
    for name in generated:
        assert (tmp_path / name).read_bytes() == (committed / name).read_bytes(), f"{name} is stale"
