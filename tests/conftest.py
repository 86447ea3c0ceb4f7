"""Shared pytest fixtures: real MNIST and a model trained once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Quiet TensorFlow's C++ logging; must be set before anything imports TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# A developer's shell must not change what the tests see: SERVING_* would reconfigure every server the tests start
# (and Settings() in-process), PROMETHEUS_MULTIPROC_DIR would switch metrics to multiprocess mode. Removed here, at
# import, before any test module imports prometheus_client; a test that wants them passes them explicitly.
for _name in [n for n in os.environ if n.startswith(("SERVING_", "OTEL_")) or n == "PROMETHEUS_MULTIPROC_DIR"]:
    del os.environ[_name]

REPO_ROOT = Path(__file__).resolve().parents[1]
# `make check` (the inner loop, < 60 s): no test that starts a server process. Tests marked slow are deselected
# there; any other test that reaches the one launcher is skipped at that point.
NO_SERVER_PROCESSES = os.environ.get("TESTS_NO_SERVER_PROCESSES") == "1"


if NO_SERVER_PROCESSES:  # for fixtures of every scope: patched before any test module is collected
    from bench.common import ChildServer

    def _refuse(self):
        pytest.skip("starts a server process: run by make test, not make check")

    ChildServer.start = _refuse


# ---------------------------------------------------------------- training fixtures


@pytest.fixture(scope="session")
def mnist_data():
    """The real MNIST Dataset from data/mnist.npz (downloaded and cached on first use)."""
    from training.data import load_mnist

    return load_mnist(REPO_ROOT / "data")


@pytest.fixture(scope="session")
def trained_mlp(mnist_data, tmp_path_factory):
    """training.train.TrainResult of the seed MLP trained 1 epoch, seed 0, with TensorBoard logs, exported
    once to a fresh model repository (result.version_dir is <repo>/mnist/1)."""
    from training.train import TrainConfig, train

    base = tmp_path_factory.mktemp("trained")
    config = TrainConfig(
        epochs=1,
        seed=0,
        log_dir=base / "logs",
        run_name="session",
        model_repository=base / "model_repository",
        verbose=0,
    )
    return train(config, dataset=mnist_data)


@pytest.fixture(scope="session")
def trained_repository(trained_mlp) -> Path:
    """A model repository holding mnist/1 (model.onnx + metadata.json) from the 1-epoch MLP; do not modify."""
    return trained_mlp.version_dir.parent.parent


@pytest.fixture(scope="session")
def active_provider(trained_repository) -> str:
    """The execution provider onnxruntime really runs the model on here: CUDA on a machine where CUDA works,
    else CPU. Tests assert this instead of hard-coding CPU, so `make test` passes on a GPU machine too."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):  # as the server does: CUDA libraries shipped in pip wheels
        try:
            ort.preload_dlls()
        except Exception:  # noqa: BLE001 - a CPU-only machine
            pass
    wanted = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    session = ort.InferenceSession(str(trained_repository / "mnist" / "1" / "model.onnx"), providers=wanted)
    return session.get_providers()[0]
