"""Request validation and response encoding, without a server."""

from __future__ import annotations

import numpy as np
import pytest

from serving import codec
from serving.errors import InvalidInput
from serving.protos import grpc_service_pb2 as pb


def request(n=2, datatype="UINT8", raw=None, **params) -> pb.ModelInferRequest:
    itemsize = 1 if datatype == "UINT8" else 4
    return pb.ModelInferRequest(
        model_name="mnist",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype=datatype, shape=[n, 784])],
        raw_input_contents=[bytes(n * 784 * itemsize) if raw is None else raw],
        parameters={k: v for k, v in params.items()},
    )


def test_uint8_pixels_stay_uint8_for_the_model_to_scale():
    pixels = np.arange(784 * 2, dtype=np.uint32).astype(np.uint8).reshape(2, 784)
    decoded = codec.decode_infer_request(request(raw=pixels.tobytes()), 8)
    assert decoded.images.dtype == np.uint8 and decoded.images.shape == (2, 784)
    np.testing.assert_array_equal(decoded.images, pixels)  # 784 bytes per image on to the model, not 3,136
    assert decoded.outputs == codec.OUTPUT_NAMES and decoded.labels is None


def test_fp32_boundaries_accepted():
    x = np.array([0.0, 1.0] * 392, dtype="<f4")
    assert codec.decode_infer_request(request(1, "FP32", x.tobytes()), 8).images.max() == 1.0


@pytest.mark.parametrize("edge", [-0.0, 1e-45, np.nextafter(np.float32(1), np.float32(0))])
def test_fp32_edge_values_inside_the_range_accepted(edge):
    """The range check compares bit patterns first: -0.0, subnormals and the largest float below 1 are pixels."""
    x = np.zeros(784, "<f4")
    x[3] = edge
    assert codec.decode_infer_request(request(1, "FP32", x.tobytes()), 8).images[0, 3] == np.float32(edge)


@pytest.mark.parametrize("bad", [-1e-3, 1.0001, np.nan, -np.nan, np.inf, -np.inf, -1e-45, np.float32(1.0000001)])
def test_fp32_out_of_range_rejected(bad):
    x = np.zeros(784, "<f4")
    x[100] = bad
    with pytest.raises(InvalidInput, match=r"finite and in \[0, 1\]"):
        codec.decode_infer_request(request(1, "FP32", x.tobytes()), 8)


def test_labels_parameter():
    decoded = codec.decode_infer_request(request(3, labels=pb.InferParameter(string_param="3,1,4")), 8)
    np.testing.assert_array_equal(decoded.labels, [3, 1, 4])
    one = codec.decode_infer_request(request(1, label=pb.InferParameter(int64_param=7)), 8)
    np.testing.assert_array_equal(one.labels, [7])
    for params, message in [
        ({"labels": pb.InferParameter(string_param="3,1")}, "2 labels for 3 images"),
        ({"labels": pb.InferParameter(string_param="3,x,1")}, "comma-separated integers"),
        ({"labels": pb.InferParameter(string_param="3,1,-1")}, "labels must be in 0-9"),
        ({"label": pb.InferParameter(int64_param=1)}, "batch of 1"),
        ({"label": pb.InferParameter(string_param="1")}, "must be an int64"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            codec.decode_infer_request(request(3, **params), 8)


def test_raw_and_typed_together_rejected():
    req = request(1)
    req.inputs[0].contents.uint_contents.extend([0] * 784)
    with pytest.raises(InvalidInput, match="send one"):
        codec.decode_infer_request(req, 8)


def test_duplicate_output_rejected():
    req = request(1)
    req.outputs.extend([pb.ModelInferRequest.InferRequestedOutputTensor(name=codec.PROBABILITIES)] * 2)
    with pytest.raises(InvalidInput, match="requested twice"):
        codec.decode_infer_request(req, 8)


def test_response_encoding_follows_requested_order():
    probs = np.eye(10, dtype=np.float32)[[3, 9]]
    req = request(2, raw=bytes(2 * 784))
    req.id = "abc"
    encoded = codec.encode_infer_response(req, "4", probs, (codec.PREDICTED_CLASS, codec.PROBABILITIES), "r3c")
    response = pb.ModelInferResponse.FromString(encoded)
    assert response.parameters[codec.RECEIPT].string_param == "r3c"
    assert [list(o.shape) for o in response.outputs] == [[2, 1], [2, 10]]
    assert [o.datatype for o in response.outputs] == ["INT64", "FP32"]
    assert (response.id, response.model_name, response.model_version) == ("abc", "mnist", "4")
    assert [o.name for o in response.outputs] == [codec.PREDICTED_CLASS, codec.PROBABILITIES]
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], "<i8"), [3, 9])
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[1], "<f4").reshape(2, 10), probs)
