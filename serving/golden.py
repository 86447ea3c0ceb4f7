"""The golden set: the first MNIST test images with their labels, read from the local cache (never downloaded).

Used to refuse a version that does not reproduce its recorded accuracy at load time, and by the canary.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.contract import TestSetError, read_test_set, to_model_input

log = logging.getLogger(__name__)

# A golden-set score this far below a version's recorded test_accuracy means the model or its provider is broken.
TOLERANCE = 0.05


@dataclass(frozen=True)
class GoldenSet:
    """The first N MNIST test images (float32, model-ready, read-only) and their labels."""

    images: np.ndarray  # (N, 784) float32 in [0, 1]
    labels: np.ndarray  # (N,) int64


@functools.cache
def load_golden_set(data_dir: Path, size: int) -> GoldenSet | None:
    """The golden set from the local MNIST cache, or None (with a warning) if it cannot be read."""
    try:
        x_test, y_test = read_test_set(data_dir)
    except TestSetError as exc:
        log.warning("%s: no load-time accuracy check, no canary", exc)
        return None
    images, labels = to_model_input(x_test[:size]), y_test[:size]
    images.setflags(write=False)
    labels.setflags(write=False)
    return GoldenSet(images, labels)


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose argmax is the label; rows with NaN/Inf count as wrong."""
    correct = (probs.argmax(axis=1) == labels) & np.isfinite(probs).all(axis=1)
    return float(correct.mean())


def short_of_recorded(score: float, metadata: dict) -> float | None:
    """The version's recorded test_accuracy if `score` falls more than TOLERANCE below it; else None."""
    recorded = metadata.get("test_accuracy")
    if recorded is None or score >= float(recorded) - TOLERANCE:
        return None
    return float(recorded)
