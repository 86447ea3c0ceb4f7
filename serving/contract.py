"""The model contract training and serving share: tensor names, shapes, pixel scaling, the MNIST cache file.

Training exports models that meet it and the server checks every model against it at load; both import it from
here (it needs numpy only), so the serving package and images never need `training/`.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"  # the model's output; the server also answers `predicted_class`
IMAGE_SHAPE = (28, 28)
IMAGE_PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
NUM_CLASSES = 10
# The seed scales uint8 pixels by 1/255; the server's UINT8 input scales the same way inside the model.
PIXEL_SCALE = 255.0
# The local MNIST cache `make data` writes (training.data): uint8 images and labels in the original order.
CACHE_NAME = "mnist.npz"
TEST_IMAGES = 10_000


def to_model_input(x: np.ndarray) -> np.ndarray:
    """Flatten uint8 images (N,28,28) or (N,784) to float32 (N,784) scaled to [0,1] like the seed."""
    x = np.asarray(x)
    return x.reshape(x.shape[0], IMAGE_PIXELS).astype(np.float32) / np.float32(PIXEL_SCALE)


class TestSetError(ValueError):
    """The cached MNIST test set is missing or not what the contract says."""


def read_test_set(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The MNIST test images (10000, 28, 28) uint8 and labels (10000,) int64 from the local cache (never
    downloaded: `make data` writes it)."""
    path = Path(data_dir) / CACHE_NAME
    if not path.is_file():
        raise TestSetError(f"no MNIST cache at {path} (run `make data`)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            x, y = npz["x_test"], npz["y_test"]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise TestSetError(f"cannot read the MNIST test set from {path}: {exc}") from exc
    if x.dtype != np.uint8 or x.shape != (TEST_IMAGES, *IMAGE_SHAPE):
        raise TestSetError(f"{path}: x_test is {x.dtype} {x.shape}, expected uint8 {(TEST_IMAGES, *IMAGE_SHAPE)}")
    if y.shape != (TEST_IMAGES,) or y.min() < 0 or y.max() >= NUM_CLASSES:
        raise TestSetError(f"{path}: y_test must be {TEST_IMAGES} labels in 0..{NUM_CLASSES - 1}")
    return x, y.astype(np.int64)
