"""Runtime settings that are not visible through the protocol."""

from __future__ import annotations

import os

import numpy as np

from serving.config import Settings
from serving.runtime import intra_op_threads


def test_intra_op_threads_split_the_cores_between_workers():
    cores = len(os.sched_getaffinity(0))
    assert intra_op_threads(Settings(workers=1)) == 0  # one worker: onnxruntime sizes its own pool
    assert intra_op_threads(Settings(workers=2)) == max(1, cores // 2)
    assert intra_op_threads(Settings(workers=4 * cores)) == 1  # never 0 (= all cores) per worker
    assert intra_op_threads(Settings(workers=2, intra_op_threads=3)) == 3  # an explicit value wins


def test_uint8_input_is_scaled_inside_the_model_exactly_like_training(trained_repository, mnist_data):
    from serving.runtime import OnnxModel
    from training.data import to_model_input

    model = OnnxModel(trained_repository / "mnist" / "1" / "model.onnx", Settings(device="cpu"))
    assert [i.type for i in model.uint8_session.get_inputs()] == ["tensor(uint8)"]
    pixels = np.ascontiguousarray(mnist_data.x_test.reshape(-1, 784))
    from_uint8, from_fp32 = model.run(pixels), model.run(to_model_input(pixels))
    assert from_uint8.dtype == np.float32 and from_uint8.shape == (10_000, 10)
    np.testing.assert_array_equal(from_uint8, from_fp32)  # bit for bit: both divide by 255 in float32
