"""Shared pytest fixtures: real MNIST and a model trained once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Quiet TensorFlow's C++ logging; must be set before anything imports TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = Path(__file__).resolve().parents[1]


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
