"""ModelInferRequest off the wire without copying its tensor bytes (gRPC's request deserializer).

gRPC hands the deserializer the serialized request as one `bytes`. protobuf's parser copies each
`raw_input_contents` entry into the message, and reading the field from Python copies it once more: a
1024-image FP32 request (3.2 MB) was held three times over while in the server. `parse_infer_request` walks
the top-level fields instead: the raw_input_contents entries become memoryviews into the received bytes
(numpy reads them in place) and only the rest, a few hundred bytes, goes through protobuf.
"""

from __future__ import annotations

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
