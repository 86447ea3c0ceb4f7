"""Fixtures for the reliability tests: private repository copies and reference answers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from rel_harness import Reference


@pytest.fixture
def repository(trained_repository, tmp_path) -> Path:
    """A private copy of the trained repository that a test may change (the session one must stay intact)."""
    return Path(shutil.copytree(trained_repository, tmp_path / "model_repository"))


@pytest.fixture(scope="session")
def reference(trained_repository, mnist_data) -> Reference:
    """In-process onnxruntime answers for the first 2048 test images."""
    return Reference(trained_repository / "mnist" / "1" / "model.onnx", mnist_data.x_test[:2048])
