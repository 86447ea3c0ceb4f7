"""The inference messages on the wire: requests read without copying their tensors, responses written directly.

Requests (gRPC's request deserializer):
gRPC hands the deserializer the serialized request as one `bytes`. protobuf's parser copies each
`raw_input_contents` entry into the message, and reading the field from Python copies it once more: a
1024-image FP32 request (3.2 MB) was held three times over while in the server. `parse_infer_request` walks
the top-level fields instead: the raw_input_contents entries become memoryviews into the received bytes
(numpy reads them in place) and only the rest, a few hundred bytes, goes through protobuf.

Responses: `infer_response` writes a ModelInferResponse's bytes itself (the fields that depend only on the
model and the output shapes once per shape), instead of building a protobuf message for every answer and
serializing it; `serialize` is the handlers' response serializer.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from serving.protos import grpc_service_pb2 as pb

RAW_INPUT_CONTENTS = 7  # ModelInferRequest field number (the V2 protocol's grpc_service.proto)
_LENGTH_DELIMITED, _VARINT, _FIXED64, _FIXED32 = 2, 0, 1, 5
# Smaller requests go through protobuf whole: the copies cost nothing and one C parse is quickest.
SPLIT_MIN_BYTES = 64 << 10
# A real request has a few dozen top-level fields; a message of thousands of tiny ones goes to protobuf's C
# parser rather than through this Python loop.
MAX_FIELDS = 256


@dataclass(slots=True)
class InferRequest:
    """A ModelInferRequest as received: `message` without the raw tensors when they were split off, `raw` the
    raw_input_contents (bytes or zero-copy memoryviews), `nbytes` its serialized size. `error` says why the
    bytes are not a ModelInferRequest (the servicer refuses it with INVALID_ARGUMENT)."""

    message: pb.ModelInferRequest
    raw: Sequence[bytes | memoryview]
    nbytes: int
    error: str = ""

    @classmethod
    def of(cls, message: pb.ModelInferRequest) -> InferRequest:
        """Wrap a message built in process (the tests do)."""
        return cls(message, message.raw_input_contents, message.ByteSize())


def parse_infer_request(data: bytes) -> InferRequest:
    """Deserialize a ModelInferRequest, raw tensor bytes by reference; never raises."""
    try:
        if len(data) >= SPLIT_MIN_BYTES:
            split = _split_raw(data)
            if split is not None:
                rest, raw = split
                return InferRequest(pb.ModelInferRequest.FromString(rest), raw, len(data))
        message = pb.ModelInferRequest.FromString(data)
    except DecodeError as exc:
        return InferRequest(pb.ModelInferRequest(), (), len(data), f"request is not a ModelInferRequest: {exc}")
    return InferRequest(message, message.raw_input_contents, len(data))


def _split_raw(data: bytes) -> tuple[bytes, list[memoryview]] | None:
    """(every other field's bytes, raw_input_contents as views), or None for protobuf to parse (or refuse)."""
    view = memoryview(data)
    rest: list[memoryview] = []
    raw: list[memoryview] = []
    pos, end = 0, len(data)
    try:
        for _ in range(MAX_FIELDS):
            if pos == end:
                return b"".join(rest), raw
            start = pos
            key, pos = _varint(data, pos)
            wire_type = key & 7
            if wire_type == _LENGTH_DELIMITED:
                length, pos = _varint(data, pos)
                if key >> 3 == RAW_INPUT_CONTENTS:
                    if length > end - pos:
                        return None
                    raw.append(view[pos : pos + length])
                    pos += length
                    continue
                pos += length
            elif wire_type == _VARINT:
                _, pos = _varint(data, pos)
            elif wire_type == _FIXED64:
                pos += 8
            elif wire_type == _FIXED32:
                pos += 4
            else:
                return None  # a group or garbage
            if pos > end:
                return None
            rest.append(view[start:pos])
    except _Truncated:
        return None
    return None


class _Truncated(Exception):
    pass


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it."""
    result = shift = 0
    for at in range(pos, min(pos + 10, len(data))):
        byte = data[at]
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, at + 1
        shift += 7
    raise _Truncated


# ---------------------------------------------------------------- responses
# ModelInferResponse field numbers (grpc_service.proto), and those of the messages inside it.
_MODEL_NAME, _MODEL_VERSION, _ID, _PARAMETERS, _OUTPUTS, _RAW_OUTPUT_CONTENTS = 1, 2, 3, 4, 5, 6
_TENSOR_NAME, _TENSOR_DATATYPE, _TENSOR_SHAPE = 1, 2, 3
_MAP_KEY, _MAP_VALUE = 1, 2
_STRING_PARAM = 3
_STREAM_INFER_RESPONSE = 2  # ModelStreamInferResponse.infer_response


_ONE_BYTE = [bytes((v,)) for v in range(0x80)]  # varints below 128: most lengths and every tag here


def _varint_bytes(value: int) -> bytes:
    if value < 0x80:
        return _ONE_BYTE[value]
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes, message, packed repeated)."""
    return _ONE_BYTE[number << 3 | _LENGTH_DELIMITED] + _varint_bytes(len(payload)) + payload


@functools.lru_cache(maxsize=64)
def _parameter_key(key: str) -> bytes:
    return _field(_MAP_KEY, key.encode())


@functools.lru_cache(maxsize=4096)
def _response_head(model_name: str, version: str, outputs: tuple[tuple[str, str, tuple[int, ...]], ...]) -> bytes:
    """The part of a response that depends only on the model, version and output shapes: built once."""
    head = [_field(_MODEL_NAME, model_name.encode()), _field(_MODEL_VERSION, version.encode())]
    for name, datatype, shape in outputs:
        dims = b"".join(_varint_bytes(d) for d in shape)
        tensor = _field(_TENSOR_NAME, name.encode()) + _field(_TENSOR_DATATYPE, datatype.encode())
        head.append(_field(_OUTPUTS, tensor + _field(_TENSOR_SHAPE, dims)))
    return b"".join(head)


def infer_response(
    model_name: str,
    version: str,
    request_id: str,
    outputs: tuple[tuple[str, str, tuple[int, ...]], ...],
    raw: Sequence[bytes],
    parameters: dict[str, str] | None = None,
) -> bytes:
    """A serialized ModelInferResponse: `outputs` (name, datatype, shape) with their raw little-endian bytes,
    string `parameters`. What protobuf would produce, without building a message per response."""
    parts = [_response_head(model_name, version, outputs)]
    if request_id:
        parts.append(_field(_ID, request_id.encode()))
    if parameters:
        for key, value in parameters.items():
            entry = _parameter_key(key) + _field(_MAP_VALUE, _field(_STRING_PARAM, value.encode()))
            parts.append(_field(_PARAMETERS, entry))
    for r in raw:
        parts.append(_field(_RAW_OUTPUT_CONTENTS, r))
    return b"".join(parts)


def stream_response(infer_response: bytes) -> bytes:
    """A serialized ModelStreamInferResponse carrying a serialized ModelInferResponse."""
    return _field(_STREAM_INFER_RESPONSE, infer_response)


def serialize(response) -> bytes:
    """gRPC's response serializer: bytes built here pass as they are, protobuf messages are serialized."""
    return response if type(response) is bytes else response.SerializeToString()
