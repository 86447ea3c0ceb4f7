"""V2 protocol messages <-> numpy: validation of inference requests and encoding of responses."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from serving import contract, wire
from serving.contract import IMAGE_PIXELS, NUM_CLASSES
from serving.errors import InvalidInput
from serving.protos import feedback_pb2
from serving.protos import grpc_service_pb2 as pb
from serving.protos import model_config_pb2 as mc

if TYPE_CHECKING:
    from serving.model_version import ModelVersion

INPUT_NAME = contract.INPUT_NAME
PROBABILITIES = contract.OUTPUT_NAME
PREDICTED_CLASS = "predicted_class"
# The interface every version serves, as Triton's ModelConfig states it (batch dimension implicit).
PLATFORM = "onnxruntime_onnx"
# (name, datatype, dims without the batch dimension): ModelConfig and ModelMetadata both state these.
_INPUTS = ((INPUT_NAME, "FP32", (IMAGE_PIXELS,)),)
_OUTPUTS = ((PROBABILITIES, "FP32", (NUM_CLASSES,)), (PREDICTED_CLASS, "INT64", (1,)))
MODEL_INPUTS = tuple(mc.ModelInput(name=n, data_type=mc.DataType.Value(f"TYPE_{t}"), dims=d) for n, t, d in _INPUTS)
MODEL_OUTPUTS = tuple(mc.ModelOutput(name=n, data_type=mc.DataType.Value(f"TYPE_{t}"), dims=d) for n, t, d in _OUTPUTS)
OUTPUT_NAMES = (PROBABILITIES, PREDICTED_CLASS)
RECEIPT = "receipt"  # response parameter: the signed receipt that FeedbackService/SendFeedback takes
ACCEPTED_SHAPES = f"[N,{IMAGE_PIXELS}] or [N,28,28]"
_DTYPES = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1")}
_ONE_BITS = int(np.array(1.0, dtype="<f4").view("<u4"))  # 0x3F800000


@dataclass(slots=True)
class DecodedRequest:
    """A validated inference request: model-ready images and what to send back."""

    images: np.ndarray  # (N, 784): float32 in [0, 1], or uint8 pixels 0-255 (the model scales them)
    outputs: tuple[str, ...]
    labels: np.ndarray | None  # ground truth attached by the client, int64 (N,)


def decode_infer_request(
    request: pb.ModelInferRequest, max_batch_size: int, raw: Sequence[bytes | memoryview] | None = None
) -> DecodedRequest:
    """Validate a ModelInferRequest and turn its one input into a float32 or uint8 (N, 784) array.

    `raw`: its raw_input_contents when they were taken off the wire apart from the message (serving.wire);
    the images are then a view of the received bytes, not a copy."""
    if len(request.inputs) != 1:
        raise InvalidInput(f"expected exactly 1 input tensor named '{INPUT_NAME}', got {len(request.inputs)}")
    tensor = request.inputs[0]
    if tensor.name != INPUT_NAME:
        raise InvalidInput(f"unknown input '{tensor.name}': the model's only input is '{INPUT_NAME}'")
    dtype = _DTYPES.get(tensor.datatype)
    if dtype is None:
        raise InvalidInput(f"input '{INPUT_NAME}' has datatype '{tensor.datatype}': expected FP32 or UINT8")
    n = _batch_size(list(tensor.shape), max_batch_size)
    count = n * IMAGE_PIXELS

    if raw is None:
        raw = request.raw_input_contents
    values = _raw_contents(tensor, raw, dtype, count) if raw else _typed_contents(tensor, dtype, count)
    if dtype.kind == "f":
        _check_pixels(values)
    # UINT8 pixels are scaled by /255 inside the model (runtime.with_uint8_input), exactly as in training.
    images = values
    return DecodedRequest(
        images=images.reshape(n, IMAGE_PIXELS),
        outputs=_requested_outputs(request),
        labels=_labels(request, n),
    )


def _raw_contents(tensor, raw: Sequence[bytes | memoryview], dtype: np.dtype, count: int) -> np.ndarray:
    """The input from raw_input_contents: a view of the bytes, which must be exactly `count` values."""
    if len(raw) != 1:
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for 1 input")
    if tensor.HasField("contents"):
        raise InvalidInput("input has both raw_input_contents and typed contents; send one")
    data = raw[0]  # once: each read of a protobuf bytes field is a copy
    expected = count * dtype.itemsize
    if len(data) != expected:
        raise InvalidInput(
            f"input '{INPUT_NAME}' {tensor.datatype} shape {list(tensor.shape)} needs {expected} bytes, got {len(data)}"
        )
    return np.frombuffer(data, dtype=dtype)


def _check_pixels(values: np.ndarray) -> None:
    """FP32 pixels must be finite and in [0, 1]."""
    # NOTE: one integer reduction instead of a float min and max: non-negative floats order like their bit
    # patterns, and every negative number, NaN and +Inf has a pattern above 1.0's. (-0.0 takes the slow path.)
    if not values.size or values.view(np.uint32).max() <= _ONE_BITS:
        return
    low, high = values.min(), values.max()
    if not (low >= 0.0 and high <= 1.0):  # also false for NaN; +-Inf fail the bounds
        raise InvalidInput(
            f"FP32 pixels must be finite and in [0, 1] (pixel/255); got values in [{low}, {high}]. "
            "Send raw 0-255 pixels as UINT8 instead."
        )


def _batch_size(shape: list[int], max_batch_size: int) -> int:
    if len(shape) == 2 and shape[1] == IMAGE_PIXELS or len(shape) == 3 and shape[1:] == [28, 28]:
        n = shape[0]
    else:
        raise InvalidInput(f"input '{INPUT_NAME}' has shape {shape}: expected {ACCEPTED_SHAPES}")
    if n < 1:
        raise InvalidInput(f"batch dimension is {n}: expected at least 1 image")
    if n > max_batch_size:
        raise InvalidInput(f"batch of {n} images is over the model's max_batch_size {max_batch_size}")
    return n


def _typed_contents(tensor, dtype: np.dtype, count: int) -> np.ndarray:
    if not tensor.HasField("contents"):
        raise InvalidInput(f"input '{INPUT_NAME}' has no data: send raw_input_contents or typed contents")
    if dtype.kind == "u":
        field, contents = "uint_contents", tensor.contents.uint_contents
    else:
        field, contents = "fp32_contents", tensor.contents.fp32_contents
    if len(contents) != count:
        raise InvalidInput(
            f"input '{INPUT_NAME}' shape {list(tensor.shape)} needs {count} values in {field}, got {len(contents)}"
        )
    if dtype.kind == "u":
        wide = np.fromiter(contents, dtype=np.uint32, count=count)
        if count and wide.max() > 255:
            raise InvalidInput(f"UINT8 pixel value {int(wide.max())} is out of range 0-255")
        return wide.astype(np.uint8)
    return np.fromiter(contents, dtype=np.float32, count=count)


def _requested_outputs(request: pb.ModelInferRequest) -> tuple[str, ...]:
    if not request.outputs:
        return OUTPUT_NAMES
    names = tuple(o.name for o in request.outputs)
    for name in names:
        if name not in OUTPUT_NAMES:
            raise InvalidInput(f"unknown output '{name}': the model's outputs are {', '.join(OUTPUT_NAMES)}")
    if len(set(names)) != len(names):
        raise InvalidInput(f"output requested twice: {list(names)}")
    return names


def _labels(request: pb.ModelInferRequest, n: int) -> np.ndarray | None:
    """Ground truth the client attached: parameter `label` (int, batch of 1) or `labels` ("3,1,4")."""
    params = request.parameters
    if "label" in params:
        p = params["label"]
        if p.WhichOneof("parameter_choice") != "int64_param" or n != 1:
            raise InvalidInput("parameter 'label' must be an int64 and is for a batch of 1; use 'labels'")
        labels = np.array([p.int64_param], dtype=np.int64)
    elif "labels" in params:
        text = params["labels"].string_param
        try:
            labels = np.array([int(v) for v in text.split(",")], dtype=np.int64)
        except (ValueError, OverflowError):  # OverflowError: an integer beyond int64
            raise InvalidInput(f"parameter 'labels' must be comma-separated integers, got '{text[:40]}'") from None
        if labels.size != n:
            raise InvalidInput(f"parameter 'labels' has {labels.size} labels for {n} images")
    else:
        return None
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise InvalidInput(f"labels must be in 0-{NUM_CLASSES - 1}")
    return labels


def encode_infer_response(
    request: pb.ModelInferRequest,
    version: str,
    probabilities: np.ndarray,
    outputs: tuple[str, ...],
    receipt: str = "",
    classes: np.ndarray | None = None,
) -> bytes:
    """The serialized ModelInferResponse: every requested output as raw little-endian bytes (what tritonclient
    reads).

    `receipt` (receipts.ReceiptKey.issue) goes into the response parameter `receipt`; `classes` is
    probabilities.argmax(axis=1) when the caller has it already."""
    n = probabilities.shape[0]
    tensors, raw = [], []
    for name in outputs:
        if name == PROBABILITIES:
            tensors.append((name, "FP32", (n, NUM_CLASSES)))
            raw.append(np.ascontiguousarray(probabilities, dtype="<f4").tobytes())
        else:
            tensors.append((name, "INT64", (n, 1)))
            predicted = probabilities.argmax(axis=1) if classes is None else classes
            raw.append(predicted.astype("<i8").tobytes())
    parameters = {RECEIPT: receipt} if receipt else None
    return wire.infer_response(request.model_name, version, request.id, tuple(tensors), raw, parameters)


@dataclass(slots=True)
class DecodedFeedback:
    """A validated FeedbackRequest."""

    receipt: str
    indexes: list[int]
    labels: list[int]
    model: str
    version: str


def decode_feedback_request(request: feedback_pb2.FeedbackRequest) -> DecodedFeedback:
    """Validate a FeedbackRequest: a receipt and at least one (index, label 0-9)."""
    if not request.receipt:
        raise InvalidInput(f"receipt is required: the '{RECEIPT}' parameter of the earlier ModelInfer response")
    if not request.labels:
        raise InvalidInput("no labels: send (index, label) for the images whose true class is known")
    indexes = [item.index for item in request.labels]
    labels = [item.label for item in request.labels]
    bad = [label for label in labels if not 0 <= label < NUM_CLASSES]
    if bad:
        raise InvalidInput(f"labels must be in 0-{NUM_CLASSES - 1}, got {bad[:5]}")
    return DecodedFeedback(request.receipt, indexes, labels, request.model_name, request.model_version)


_INPUT_META = tuple(pb.ModelMetadataResponse.TensorMetadata(name=n, datatype=t, shape=(-1, *d)) for n, t, d in _INPUTS)
_OUTPUT_META = tuple(
    pb.ModelMetadataResponse.TensorMetadata(name=n, datatype=t, shape=(-1, *d)) for n, t, d in _OUTPUTS
)


def model_metadata(mv: ModelVersion, versions: list[int]) -> pb.ModelMetadataResponse:
    """ModelMetadata for a version; the platform names the provider really running it."""
    return pb.ModelMetadataResponse(
        name=mv.name,
        versions=[str(v) for v in versions],
        platform=f"{PLATFORM}:{mv.provider}",
        inputs=_INPUT_META,
        outputs=_OUTPUT_META,
    )


def model_config(mv: ModelVersion) -> mc.ModelConfig:
    """Triton's ModelConfig for a version, with its own settings: batch dimension implicit (max_batch_size > 0)."""
    settings = mv.settings
    return mc.ModelConfig(
        name=mv.name,
        platform=PLATFORM,
        backend="onnxruntime",
        max_batch_size=settings.max_batch_size,
        input=MODEL_INPUTS,
        output=MODEL_OUTPUTS,
        dynamic_batching=mc.ModelDynamicBatching(max_queue_delay_microseconds=settings.max_queue_delay_us),
        instance_group=[
            mc.ModelInstanceGroup(
                count=settings.instance_count,
                kind=mc.ModelInstanceGroup.KIND_GPU if "CUDA" in mv.provider else mc.ModelInstanceGroup.KIND_CPU,
            )
        ],
        parameters={
            "execution_provider": mc.ModelParameter(string_value=mv.provider),
            # Where onnxruntime runs every node, per input type: {"FP32": {"CPUExecutionProvider": ["Gemm", ...]}}.
            "node_placement": mc.ModelParameter(string_value=json.dumps(mv.model.placement, sort_keys=True)),
        },
    )
