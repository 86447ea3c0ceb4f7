"""The ONNX parity gate: a model whose outputs differ from Keras is refused and nothing is written."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from training.data import to_model_input
from training.export import ParityError, categorical_crossentropy, check_parity, export_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def good_onnx(trained_mlp) -> bytes:
    return (trained_mlp.version_dir / "model.onnx").read_bytes()


@pytest.fixture(scope="module")
def test_inputs(mnist_data) -> np.ndarray:
    return to_model_input(mnist_data.x_test)


@pytest.fixture(scope="module")
def keras_probs(trained_mlp, test_inputs) -> np.ndarray:
    return trained_mlp.model.predict(test_inputs, batch_size=1024, verbose=0)


def _perturbed(onnx_bytes: bytes, scale: float) -> bytes:
    """The same graph with every weight nudged by noise of the given scale."""
    proto = onnx.load_from_string(onnx_bytes)
    rng = np.random.default_rng(0)
    for init in proto.graph.initializer:
        w = numpy_helper.to_array(init)
        init.CopyFrom(numpy_helper.from_array((w + rng.normal(0, scale, w.shape)).astype(w.dtype), init.name))
    return proto.SerializeToString()


def test_exported_model_passes(good_onnx, keras_probs, test_inputs):
    report = check_parity(good_onnx, keras_probs, test_inputs)
    assert report.argmax_mismatches == 0 and report.max_abs_diff <= 1e-5
    assert report.onnx_probs.shape == (10_000, 10)


@pytest.mark.parametrize("scale", [1e-1, 1e-4])
def test_perturbed_model_is_refused(good_onnx, keras_probs, test_inputs, scale):
    with pytest.raises(ParityError, match=r"max \|dprob\|"):
        check_parity(_perturbed(good_onnx, scale), keras_probs, test_inputs)


def test_argmax_mismatch_is_reported(good_onnx, keras_probs, test_inputs):
    # Same probabilities with the class order reversed: every prediction changes.
    with pytest.raises(ParityError, match="10000 argmax mismatches"):
        check_parity(good_onnx, keras_probs[:, ::-1], test_inputs)


def test_unrunnable_model_is_refused(keras_probs, test_inputs):
    with pytest.raises(ParityError, match="onnxruntime could not run"):
        check_parity(b"not an onnx model", keras_probs, test_inputs)


def test_export_writes_nothing_when_parity_fails(trained_mlp, mnist_data, good_onnx, tmp_path):
    repo = tmp_path / "repo"
    with pytest.raises(ParityError):
        export_model(trained_mlp.model, mnist_data, repo, onnx_model=_perturbed(good_onnx, 1e-2))
    assert not repo.exists()
    (repo / "mnist").mkdir(parents=True)
    with pytest.raises(ParityError):
        export_model(trained_mlp.model, mnist_data, repo, onnx_model=_perturbed(good_onnx, 1e-2))
    assert list((repo / "mnist").iterdir()) == []


def test_crossentropy_matches_definition():
    probs = np.array([[0.7, 0.2, 0.1] + [0.0] * 7, [0.0] * 9 + [1.0]], dtype=np.float32)
    expected = -(np.log(0.7) + np.log(1 - 1e-7)) / 2
    assert categorical_crossentropy(probs, np.array([0, 9])) == pytest.approx(expected, rel=1e-6)
