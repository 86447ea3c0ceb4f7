"""ModelInferRequest off the wire: raw tensors by reference, everything else exactly as protobuf parses it."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from google.protobuf.internal.encoder import _VarintBytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving import wire
from serving.protos import grpc_service_pb2 as pb


def request(raw: list[bytes], **kw) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="mnist",
        model_version="3",
        id="req-1",
        parameters={"labels": pb.InferParameter(string_param="1,2")},
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[2, 784])],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="probabilities")],
        raw_input_contents=raw,
        **kw,
    )


def without_raw(message: pb.ModelInferRequest) -> pb.ModelInferRequest:
    copy = pb.ModelInferRequest()
    copy.CopyFrom(message)
    del copy.raw_input_contents[:]
    return copy


def test_a_large_request_keeps_its_raw_bytes_in_the_received_buffer():
    big = np.arange(wire.SPLIT_MIN_BYTES, dtype=np.uint8).tobytes()
    original = request([big, b"second"])
    data = original.SerializeToString()
    parsed = wire.parse_infer_request(data)
    assert not parsed.error and parsed.nbytes == len(data)
    assert parsed.message == without_raw(original)
    assert [bytes(r) for r in parsed.raw] == [big, b"second"]
    assert all(isinstance(r, memoryview) and r.obj is data for r in parsed.raw)  # no copy
    images = np.frombuffer(parsed.raw[0], np.uint8)
    assert np.shares_memory(images, np.frombuffer(data, np.uint8))


def test_a_small_request_is_parsed_by_protobuf_whole():
    original = request([bytes(784)])
    data = original.SerializeToString()
    parsed = wire.parse_infer_request(data)
    assert parsed.message == original and list(parsed.raw) == [bytes(784)] and parsed.nbytes == len(data)


def test_fields_in_any_order_and_unknown_fields_survive_the_split():
    big = bytes(range(256)) * 300
    field = lambda number, payload: _VarintBytes(number << 3 | 2) + _VarintBytes(len(payload)) + payload  # noqa: E731
    data = (
        field(7, big)
        + field(1, b"mnist")
        + _VarintBytes(99 << 3) + _VarintBytes(150)  # unknown varint field 99
        + field(7, b"")
        + field(3, b"id-9")
        + _VarintBytes(98 << 3 | 5) + b"\x01\x02\x03\x04"  # unknown fixed32
        + _VarintBytes(97 << 3 | 1) + bytes(8)  # unknown fixed64
    )  # fmt: skip
    parsed = wire.parse_infer_request(data)
    assert parsed.message.model_name == "mnist" and parsed.message.id == "id-9"
    assert [bytes(r) for r in parsed.raw] == [big, b""]
    whole = pb.ModelInferRequest.FromString(data)
    assert parsed.message.SerializeToString() == without_raw(whole).SerializeToString()  # unknown fields kept


def test_thousands_of_tiny_fields_go_to_protobufs_parser():
    """A hostile message of tiny fields is not walked in Python field by field."""
    tiny = (_VarintBytes(99 << 3) + b"\x01") * (wire.SPLIT_MIN_BYTES // 2)
    data = request([bytes(wire.SPLIT_MIN_BYTES)]).SerializeToString() + tiny
    parsed = wire.parse_infer_request(data)
    assert not parsed.error and bytes(parsed.raw[0]) == bytes(wire.SPLIT_MIN_BYTES)
    assert not isinstance(parsed.raw, list)  # protobuf's own container: the fallback ran


@pytest.mark.parametrize(
    "data",
    [
        request([bytes(wire.SPLIT_MIN_BYTES)]).SerializeToString()[:-1],  # truncated raw entry
        request([bytes(wire.SPLIT_MIN_BYTES)]).SerializeToString()[:5],  # truncated small field
        b"\xff" * wire.SPLIT_MIN_BYTES,  # a varint that never ends
        _VarintBytes(7 << 3 | 3) + bytes(wire.SPLIT_MIN_BYTES),  # a group start
        b"\x3a" + _VarintBytes(1 << 40) + bytes(wire.SPLIT_MIN_BYTES),  # raw entry longer than the message
        b"\x0a\x05mn",  # small and truncated
    ],
    ids=["truncated-raw", "truncated-field", "endless-varint", "group", "overlong", "small"],
)
def test_bytes_that_are_not_a_request_give_an_error_not_an_exception(data):
    parsed = wire.parse_infer_request(data)
    assert parsed.error.startswith("request is not a ModelInferRequest") and not parsed.raw


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw=st.lists(st.binary(max_size=2048), max_size=3),
    pad=st.integers(0, wire.SPLIT_MIN_BYTES),
    model=st.text(max_size=20),
    shape=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4),
    cut=st.integers(0, 64),
)
def test_split_agrees_with_protobuf(raw, pad, model, shape, cut):
    """Whatever protobuf makes of the bytes (whole or cut short), the split gives the same, or an error where
    protobuf refuses them."""
    message = request([*raw, bytes(pad)])
    message.parameters["m"].string_param = model
    message.inputs[0].shape[:] = shape
    data = message.SerializeToString()
    data = data[: len(data) - cut]
    try:
        whole = pb.ModelInferRequest.FromString(data)
    except Exception:
        whole = None
    parsed = wire.parse_infer_request(data)
    if whole is None:
        assert parsed.error
    else:
        assert not parsed.error
        assert without_raw(parsed.message) == without_raw(whole)
        assert [bytes(r) for r in parsed.raw] == list(whole.raw_input_contents)


def test_the_server_refuses_bytes_that_are_not_a_request(server):
    with grpc.insecure_channel(server.url) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out
        for data in (b"\xff" * 100, b"\xff" * (wire.SPLIT_MIN_BYTES + 1)):
            with pytest.raises(grpc.RpcError) as err:
                call(data, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a ModelInferRequest" in err.value.details()


# ---------------------------------------------------------------- responses written by hand

_text = st.text(max_size=40)
_outputs = st.lists(
    st.tuples(_text, st.sampled_from(["FP32", "INT64"]), st.lists(st.integers(0, 1 << 40), max_size=3)),
    max_size=3,
)


@settings(max_examples=300, deadline=None)
@given(
    model=_text, version=_text, request_id=_text, outputs=_outputs,
    params=st.dictionaries(_text, _text, max_size=3), data=st.data(),
)  # fmt: skip
def test_a_hand_written_response_is_the_message_protobuf_would_send(model, version, request_id, outputs, params, data):
    """Parsed back, the bytes of wire.infer_response are the ModelInferResponse built with protobuf, field by field."""
    raw = [data.draw(st.binary(max_size=64)) for _ in outputs]
    tensors = tuple((name, dtype, tuple(shape)) for name, dtype, shape in outputs)
    encoded = wire.infer_response(model, version, request_id, tensors, raw, params)
    expected = pb.ModelInferResponse(
        model_name=model, model_version=version, id=request_id, raw_output_contents=raw,
        outputs=[pb.ModelInferResponse.InferOutputTensor(name=n, datatype=d, shape=s) for n, d, s in outputs],
    )  # fmt: skip
    for key, value in params.items():
        expected.parameters[key].string_param = value
    assert pb.ModelInferResponse.FromString(encoded) == expected
    stream = pb.ModelStreamInferResponse.FromString(wire.stream_response(encoded))
    assert stream.infer_response == expected and not stream.error_message


def test_serialize_passes_bytes_and_serializes_messages():
    message = pb.ModelStreamInferResponse(error_message="INVALID_ARGUMENT: no")
    assert wire.serialize(b"\x0a\x01x") == b"\x0a\x01x"
    assert wire.serialize(message) == message.SerializeToString()
