"""The CUDA path's choices, checked on any machine: provider options, no silent fallback, refusals, placement,
pinned staging over every bucket, and the TF32 tolerance against an emulation of TF32 rounding."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import serving.iobinding as iobinding
from serving.config import Settings
from serving.errors import StartupError
from serving.iobinding import BoundSession
from serving.runtime import (
    CPU,
    CUDA,
    FP32_TOLERANCE,
    TF32_TOLERANCE,
    OnnxModel,
    check_placement,
    cuda_options,
    requested_providers,
)

HAS_CUDA = CUDA in ort.get_available_providers()
no_cuda_only = pytest.mark.skipif(HAS_CUDA, reason="this build has CUDA: make gpu-check covers the real refusals")


@pytest.fixture
def model_path(trained_repository):
    return trained_repository / "mnist" / "1" / "model.onnx"


@pytest.fixture
def claims_cuda(monkeypatch):
    """onnxruntime's provider list with CUDA in it, as a GPU build has (the build itself stays as it is)."""
    real = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, *(p for p in real if p != CUDA)])


def test_cuda_options_turn_tf32_off_unless_asked(claims_cuda):
    """onnxruntime's CUDA provider defaults use_tf32 to 1: the server always says which it wants."""
    assert cuda_options(Settings()) == {"device_id": "0", "use_tf32": "0"}
    assert cuda_options(Settings(tf32=True))["use_tf32"] == "1"
    assert requested_providers(Settings(cuda_device_id=1)) == [(CUDA, {"device_id": "1", "use_tf32": "0"}), CPU]
    graphs = requested_providers(Settings(cuda_graphs=True))
    assert graphs == [(CUDA, {"device_id": "0", "use_tf32": "0", "enable_cuda_graph": "1"}), CPU]
    assert requested_providers(Settings(device="cpu", tf32=True)) == [CPU]
    # --require-gpu: no CPU provider at all (and session.disable_cpu_ep_fallback for single nodes).
    assert requested_providers(Settings(require_gpu=True)) == [(CUDA, {"device_id": "0", "use_tf32": "0"})]


def test_sessions_have_onnxruntime_fallback_off(model_path):
    """onnxruntime's Python layer would rebuild a failing CUDA session on CPU (at load and at a run) and only print
    it: both sessions of a model are created with enable_fallback=0."""
    model = OnnxModel(model_path, Settings(device="cpu"))
    assert model.session._enable_fallback is False
    assert model.uint8_session._enable_fallback is False


@no_cuda_only
@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"device": "cuda"}, r"--device cuda: CUDA is not active: onnxruntime .* has no CUDAExecutionProvider"),
        ({"require_gpu": True}, r"--require-gpu: CUDA is not active: onnxruntime .* has no CUDAExecutionProvider"),
        ({"device": "cuda", "require_gpu": True}, r"--device cuda and --require-gpu: CUDA is not active"),
        ({"device": "cpu", "require_gpu": True}, r"--require-gpu: CUDA is not active: --device cpu"),
    ],
)
def test_cuda_required_without_cuda_refuses_to_load(model_path, settings, message):
    with pytest.raises(StartupError, match=message):
        OnnxModel(model_path, Settings(**settings))


def test_device_auto_without_cuda_serves_on_cpu_and_says_so(model_path):
    model = OnnxModel(model_path, Settings(device="auto"))
    assert model.provider == CPU if not HAS_CUDA else CUDA


@no_cuda_only
def test_a_cuda_provider_onnxruntime_cannot_create_is_caught_by_the_placement(model_path, claims_cuda):
    """A build that lists CUDA but cannot create it (onnxruntime then warns and uses CPU): --device cuda refuses
    from the placement record, --require-gpu from onnxruntime's own refusal, auto serves on CPU and says CPU."""
    with pytest.raises(StartupError, match=r"--device cuda: no node of .* runs on CUDA: FP32: CPUExecutionProvider"):
        OnnxModel(model_path, Settings(device="cuda"))
    with pytest.raises(StartupError, match=r"assigned to the default CPU EP, but fallback to CPU EP has been"):
        OnnxModel(model_path, Settings(require_gpu=True))
    model = OnnxModel(model_path, Settings(device="auto"))
    assert model.provider == CPU and set(model.placement["FP32"]) == {CPU}


def test_placement_check_refuses_any_node_off_cuda_under_require_gpu(tmp_path):
    on_cuda = {"FP32": {CUDA: ["Gemm", "Relu"]}, "UINT8": {CUDA: ["Cast", "Gemm"]}}
    check_placement(on_cuda, Settings(require_gpu=True), tmp_path)
    mixed = {"FP32": {CUDA: ["Gemm"], CPU: ["Scaler"]}, "UINT8": {CUDA: ["Cast", "Gemm"]}}
    check_placement(mixed, Settings(device="cuda"), tmp_path)  # --device cuda lets a kernel-less node run on CPU
    check_placement(mixed, Settings(device="auto"), tmp_path)
    with pytest.raises(StartupError, match=r"nodes that do not run on CUDA: FP32: CPUExecutionProvider Scaler$"):
        check_placement(mixed, Settings(require_gpu=True), tmp_path)
    with pytest.raises(StartupError, match="no node of"):
        check_placement({"FP32": {CPU: ["Gemm"]}}, Settings(device="cuda"), tmp_path)


def test_placement_on_cpu_lists_every_node(model_path):
    model = OnnxModel(model_path, Settings(device="cpu"))
    assert model.placement == {
        "FP32": {CPU: ["Gemm", "Gemm", "Relu", "Softmax"]},
        "UINT8": {CPU: ["Cast", "Div", "Gemm", "Gemm", "Relu", "Softmax"]},
    }


def test_pinned_means_every_bucket_is_page_locked(model_path, monkeypatch):
    """One bucket whose cudaHostRegister fails leaves the session not pinned, whichever bucket it is."""
    session = OnnxModel(model_path, Settings(device="cpu")).session
    name_in, name_out = session.get_inputs()[0].name, session.get_outputs()[0].name
    real = iobinding.host_buffer
    for failing in (None, 4, 8):

        def register_fails_for(shape, dtype, pinned, f=failing):
            return real(shape, dtype, False)[0], shape[0] != f

        monkeypatch.setattr(iobinding, "host_buffer", register_fails_for)
        bound = BoundSession(session, name_in, name_out, np.float32, buckets=(1, 2, 4, 8), device="cpu", pinned=True)
        assert bound.pinned is (failing is None)
        assert bound.pinned_buckets == tuple(b for b in (1, 2, 4, 8) if b != failing)


def test_device_check_runs_a_tiny_session_on_the_provider():
    """What `make venv` runs after installing: a session created and run, not a list of provider names."""
    done = subprocess.run(
        [sys.executable, "-m", "serving.runtime", "--device-check", "cpu"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "runs a session on cpu: tiny: CPUExecutionProvider Gemm" in done.stdout
    if not HAS_CUDA:
        done = subprocess.run(
            [sys.executable, "-m", "serving.runtime", "--device-check", "cuda"], capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert done.returncode == 1
        assert "device check failed: --device cuda and --require-gpu: CUDA is not active" in done.stderr


# ------------------------------------------------------------------ TF32


def _tf32(x: np.ndarray) -> np.ndarray:
    """float32 rounded to TF32 (10 mantissa bits, round to nearest even), as tensor cores read MatMul inputs."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    bits = (bits + np.uint32(0xFFF) + ((bits >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)
    return bits.view(np.float32)


def _emulate(model: onnx.ModelProto, x: np.ndarray, tf32: bool) -> np.ndarray:
    """The exported graph (MatMul, Add, Relu, Softmax) in numpy float32, MatMul inputs rounded to TF32 if asked
    (products of TF32 values are exact in float32; tensor cores accumulate in float32)."""
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    values[model.graph.input[0].name] = x
    for node in model.graph.node:
        a = [values[name] for name in node.input]
        if node.op_type == "MatMul":
            y = (_tf32(a[0]) @ _tf32(a[1])) if tf32 else a[0] @ a[1]
        elif node.op_type == "Add":
            y = a[0] + a[1]
        elif node.op_type == "Relu":
            y = np.maximum(a[0], 0)
        elif node.op_type == "Softmax":
            e = np.exp(a[0] - a[0].max(axis=-1, keepdims=True))
            y = e / e.sum(axis=-1, keepdims=True)
        else:
            raise AssertionError(f"the emulation has no {node.op_type}")
        values[node.output[0]] = y.astype(np.float32)
    return values[model.graph.output[0].name]


def test_tf32_needs_its_own_tolerance_and_fp32_meets_the_default(model_path, mnist_data):
    """Over the 10,000 test images: FP32 in another summation order stays within FP32_TOLERANCE of onnxruntime's
    CPU answers; TF32 rounding breaks that bound (why use_tf32 is off by default) but stays within TF32_TOLERANCE
    with the same predicted classes."""
    from training.data import to_model_input

    x = to_model_input(mnist_data.x_test)
    reference = OnnxModel(model_path, Settings(device="cpu")).run(x)
    model = onnx.load(model_path)
    fp32, tf32 = _emulate(model, x, tf32=False), _emulate(model, x, tf32=True)
    assert np.abs(fp32 - reference).max() <= FP32_TOLERANCE
    tf32_diff = np.abs(tf32 - reference).max()
    assert FP32_TOLERANCE < tf32_diff <= TF32_TOLERANCE
    assert np.mean(tf32.argmax(1) != reference.argmax(1)) <= 1e-3
