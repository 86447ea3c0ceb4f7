"""Hostile input: property-based fuzzing of ModelInfer, over the wire and at the codec; never INTERNAL."""

from __future__ import annotations

import math
from collections import Counter

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from rel_harness import channel, metric_value, report
from server_process import start_server

from serving import codec
from serving.client import infer_request, probabilities
from serving.errors import InvalidInput
from serving.protos import grpc_service_pb2 as pb
from serving.protos import grpc_service_pb2_grpc as pb_grpc

MAX_BATCH = 64
WIRE_EXAMPLES = 3400  # per search; x3 searches over the wire (10,200 requests), + the codec-level run
CODEC_EXAMPLES = 2000
EXPECTED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"}
FUZZ = settings(
    database=None,
    deadline=None,
    phases=[Phase.generate, Phase.shrink],
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
CODES: Counter = Counter()  # status codes seen over the wire, all fuzz tests together (for the report)

text = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)  # protobuf strings must be UTF-8
big_int = st.integers(-(2**63), 2**63 - 1)
# Strings that look like numbers to str methods but not to int(): superscripts, other scripts' digits, ...
numberish = st.sampled_from(["", "1", "01", "-1", " 1", "1 ", "²", "١", "٣", "1e3", "0x1", "9" * 30, "1_0"])


def _float_values(draw, count: int) -> np.ndarray:
    """FP32 pixel values: mostly valid [0, 1], sometimes with NaN / +-Inf / out-of-range / subnormals."""
    seed = draw(st.integers(0, 2**32 - 1))
    values = np.random.default_rng(seed).random(count, dtype=np.float32).astype("<f4")
    if count and draw(st.booleans()):
        special = draw(st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True))
        values[draw(st.integers(0, count - 1))] = special
    return values


def _pixels(draw, count: int) -> np.ndarray:
    """UINT8 pixels from a drawn seed (drawing kilobytes byte by byte would make hypothesis the bottleneck)."""
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(0, 256, count, dtype=np.uint8)


@st.composite
def tensors_and_data(draw):
    """One input tensor (often nearly right) plus the raw bytes / typed contents that go with it."""
    n = draw(st.one_of(st.integers(1, 4), st.sampled_from([0, -1, MAX_BATCH, MAX_BATCH + 1, 2**31, 2**62])))
    shape = draw(
        st.one_of(
            st.just([n, 784]),
            st.just([n, 28, 28]),
            st.lists(big_int, max_size=5),
            st.lists(st.integers(-2, 800), max_size=4),
        )
    )
    datatype = draw(st.one_of(st.sampled_from(["FP32", "UINT8", "INT32", "FP16", "BYTES", "fp32", ""]), text))
    name = draw(st.one_of(st.just("input"), text))
    sane = all(0 <= d <= 800 for d in shape) and len(shape) <= 4
    count = math.prod(shape) if sane and math.prod(shape) <= MAX_BATCH * 784 else draw(st.integers(0, 3000))
    count = min(count, 8 * 784)  # bounded size: the exact sizes that matter are all small
    tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    raw: list[bytes] = []
    how = draw(st.sampled_from(["raw", "raw", "raw", "typed", "none", "both", "two_raw", "raw_off_by_one"]))
    floats = datatype == "FP32" or (datatype != "UINT8" and draw(st.booleans()))
    data = _float_values(draw, count) if floats else _pixels(draw, count)
    if how in ("raw", "both", "two_raw"):
        raw = [data.tobytes()] * (2 if how == "two_raw" else 1)
    elif how == "raw_off_by_one":
        raw = [data.tobytes() + b"\0" if draw(st.booleans()) else data.tobytes()[:-1]]
    if how in ("typed", "both"):
        if floats:
            tensor.contents.fp32_contents.extend(data.tolist())
        else:
            wide = data.astype(np.int64)
            if count and draw(st.booleans()):
                wide[draw(st.integers(0, count - 1))] = draw(st.integers(0, 2**32 - 1))
            tensor.contents.uint_contents.extend(wide.tolist())
    return tensor, raw


@st.composite
def parameters(draw):
    params = {}
    for key in draw(st.lists(st.one_of(st.sampled_from(["label", "labels"]), text), max_size=2)):
        choice = draw(st.sampled_from(["bool", "int", "uint", "double", "string", "labels"]))
        if choice == "bool":
            params[key] = pb.InferParameter(bool_param=draw(st.booleans()))
        elif choice == "int":
            params[key] = pb.InferParameter(int64_param=draw(st.one_of(st.integers(-1, 11), big_int)))
        elif choice == "uint":
            params[key] = pb.InferParameter(uint64_param=draw(st.integers(0, 2**64 - 1)))
        elif choice == "double":
            params[key] = pb.InferParameter(double_param=draw(st.floats()))
        elif choice == "labels":
            ints = draw(st.lists(st.one_of(st.integers(0, 9), big_int, st.integers(-(10**30), 10**30)), max_size=6))
            params[key] = pb.InferParameter(string_param=",".join(map(str, ints)))
        else:
            params[key] = pb.InferParameter(string_param=draw(st.one_of(text, numberish)))
    return params


@st.composite
def infer_requests(draw):
    """A ModelInferRequest that is wrong in one or several ways (or, now and then, right)."""
    inputs, raws = [], []
    for _ in range(draw(st.sampled_from([1, 1, 1, 1, 0, 2]))):
        tensor, raw = draw(tensors_and_data())
        inputs.append(tensor)
        raws += raw
    outputs = draw(st.lists(st.one_of(st.sampled_from(["probabilities", "predicted_class"]), text), max_size=3))
    return pb.ModelInferRequest(
        model_name=draw(st.one_of(st.just("mnist"), st.just("mnist"), text)),
        model_version=draw(st.one_of(st.just(""), st.just("1"), numberish, text)),
        id=draw(text),
        inputs=inputs,
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=o) for o in outputs],
        raw_input_contents=raws,
        parameters=draw(parameters()),
    )


@st.composite
def nearly_valid_requests(draw):
    """A valid request with exactly one field damaged: the error paths right next to the happy path."""
    n = draw(st.integers(1, 4))
    datatype = draw(st.sampled_from(["UINT8", "FP32"]))
    images = _pixels(draw, n * 784).reshape(n, 784)
    request = infer_request(images, "mnist", datatype=datatype)
    damage = draw(st.sampled_from(["none", "shape", "datatype", "bytes", "version", "output", "param", "value"]))
    if damage == "shape":
        request.inputs[0].shape[draw(st.integers(0, 1))] = draw(big_int)
    elif damage == "datatype":
        request.inputs[0].datatype = draw(text)
    elif damage == "bytes":
        request.raw_input_contents[0] = request.raw_input_contents[0][: draw(st.integers(0, n * 784 - 1))]
    elif damage == "version":
        request.model_version = draw(st.one_of(numberish, text))
    elif damage == "output":
        request.outputs.add(name=draw(st.one_of(text, st.just("probabilities"))))
    elif damage == "param":
        request.parameters["labels"].string_param = draw(st.one_of(text, numberish))
    elif damage == "value" and datatype == "FP32":
        pixels = np.frombuffer(request.raw_input_contents[0], "<f4").copy()
        pixels[draw(st.integers(0, pixels.size - 1))] = draw(st.floats(width=32))
        request.raw_input_contents[0] = pixels.tobytes()
    return request


@pytest.fixture(scope="module")
def fuzz_server(trained_repository, tmp_path_factory):
    # A small max batch keeps the oversized-message case cheap (the message limit follows it).
    server = start_server(trained_repository, tmp_path_factory.mktemp("fuzz"), "--max-batch-size", str(MAX_BATCH))
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def stub(fuzz_server):
    with channel(fuzz_server) as ch:
        yield pb_grpc.GRPCInferenceServiceStub(ch)


def _send(stub, request: pb.ModelInferRequest) -> None:
    try:
        reply = stub.ModelInfer(request, timeout=30)
    except grpc.RpcError as err:
        code = err.code().name
        CODES[code] += 1
        assert code in EXPECTED, (code, err.details(), request)
        return
    CODES["OK"] += 1
    if any(o.name == "probabilities" for o in reply.outputs):
        probs = probabilities(reply)
        assert probs.shape[1] == 10 and np.all(np.isfinite(probs))
        assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)


def _assert_never_internal(server) -> None:
    """Nothing the fuzzing sent made the server answer INTERNAL/UNKNOWN or log a crash."""
    text = server.metrics()
    internal = sum(metric_value(text, "mnist_serving_requests_total", code=c) for c in ("INTERNAL", "UNKNOWN"))
    assert internal == 0, text
    log = server.log()
    assert "Traceback" not in log and "unexpected failure" not in log, log[-3000:]


def _fuzz(stub, server, run) -> None:
    """Run one hypothesis search over the wire; check it really sent WIRE_EXAMPLES requests, and the server."""
    before = sum(CODES.values())
    run(stub)
    sent = sum(CODES.values()) - before
    assert sent >= WIRE_EXAMPLES, sent  # each search counts alone: -k selections and any order keep the bound
    _assert_never_internal(server)


@settings(FUZZ, max_examples=WIRE_EXAMPLES)
@given(request=infer_requests())
def _random_requests(stub, request):
    _send(stub, request)


@settings(FUZZ, max_examples=WIRE_EXAMPLES)
@given(request=nearly_valid_requests())
def _nearly_valid_requests(stub, request):
    _send(stub, request)


@settings(FUZZ, max_examples=WIRE_EXAMPLES)
@given(
    shape=st.lists(big_int, min_size=1, max_size=4),
    datatype=st.sampled_from(["FP32", "UINT8"]),
    size=st.integers(0, 4096),
)
def _shapes_and_sizes(stub, shape, datatype, size):
    request = pb.ModelInferRequest(
        model_name="mnist",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype=datatype, shape=shape)],
        raw_input_contents=[b"\x01" * size],
    )
    _send(stub, request)


def test_wire_fuzz_random_requests(stub, fuzz_server):
    _fuzz(stub, fuzz_server, _random_requests)


def test_wire_fuzz_nearly_valid_requests(stub, fuzz_server):
    _fuzz(stub, fuzz_server, _nearly_valid_requests)


def test_wire_fuzz_shapes_and_sizes(stub, fuzz_server):
    """Huge / negative / zero dims against byte counts that rarely match."""
    _fuzz(stub, fuzz_server, _shapes_and_sizes)


@pytest.mark.parametrize("excess", [1, 1 << 20, 16 << 20])
def test_wire_oversized_messages_are_refused_by_grpc(stub, excess):
    """Over the server's message limit (sized for max_batch_size FP32 images + 1 MiB): RESOURCE_EXHAUSTED."""
    limit = MAX_BATCH * 784 * 4 + (1 << 20)
    request = pb.ModelInferRequest(
        model_name="mnist",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="UINT8", shape=[1, 784])],
        raw_input_contents=[bytes(limit + excess)],
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    CODES["RESOURCE_EXHAUSTED"] += 1


@settings(FUZZ, max_examples=CODEC_EXAMPLES)
@given(request=st.one_of(infer_requests(), nearly_valid_requests()))
def test_codec_fuzz_rejects_with_invalid_input_only(request):
    """decode_infer_request either returns model-ready images or raises InvalidInput: nothing else."""
    try:
        decoded = codec.decode_infer_request(request, MAX_BATCH)
    except InvalidInput:
        return
    n = decoded.images.shape[0]
    assert decoded.images.shape == (n, 784) and 1 <= n <= MAX_BATCH
    if decoded.images.dtype == np.float32:
        assert float(decoded.images.min()) >= 0.0 and float(decoded.images.max()) <= 1.0
    else:
        assert decoded.images.dtype == np.uint8  # pixels 0-255: the model scales them
    if decoded.labels is not None:
        assert decoded.labels.shape == (n,) and 0 <= decoded.labels.min() and decoded.labels.max() <= 9


def test_server_answers_correctly_beside_the_fuzzing(fuzz_server, stub, reference):
    """Correct answers, never INTERNAL/UNKNOWN, nothing logged as a crash: after whichever fuzzing ran before."""
    reply = stub.ModelInfer(infer_request(reference.images[:32], "mnist"), timeout=30)
    assert reference.check(0, 32, probabilities(reply))
    _assert_never_internal(fuzz_server)  # each fuzzed request's code was checked where it was sent (_send)
    report("fuzz", {"requests": sum(CODES.values()), "codes": dict(CODES)})
