"""Runtime settings that are not visible through the protocol."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from serving.config import Settings
from serving.runtime import OnnxModel, intra_op_threads


def _on_cores(cores: int, fn):
    """fn() in a thread pinned to the first `cores` CPUs this process may use (sched_getaffinity is per thread)."""
    result = []

    def pinned():
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
        result.append(fn())

    thread = threading.Thread(target=pinned)
    thread.start()
    thread.join()
    return result[0]


@pytest.mark.parametrize(
    ("cores", "workers", "instances", "explicit", "threads"),
    [
        (1, 1, 1, 0, 1),  # one core: shared with the event loop, never 0 (= all cores)
        (2, 1, 1, 0, 1),  # one core for the event loop, one for onnxruntime
        (2, 2, 1, 0, 1),
        (2, 1, 2, 0, 1),
        (2, 2, 1, 3, 3),  # an explicit value wins
        (4, 1, 1, 0, 3),
        (4, 2, 1, 0, 1),
        (4, 1, 3, 0, 1),
        (8, 2, 1, 0, 3),
        (8, 1, 2, 0, 3),
    ],
)
def test_intra_op_threads_share_the_cores_left_by_the_event_loops(
    cores, workers, instances, explicit, threads, trained_repository
):
    """Each worker's event loop keeps a core; execution threads share the rest: the session really gets that many."""
    if len(os.sched_getaffinity(0)) < cores:
        pytest.skip(f"needs {cores} CPUs")
    settings = Settings(workers=workers, instance_count=instances, intra_op_threads=explicit, device="cpu")
    assert _on_cores(cores, lambda: intra_op_threads(settings)) == threads
    model = _on_cores(cores, lambda: OnnxModel(trained_repository / "mnist" / "1" / "model.onnx", settings))
    assert model.session.get_session_options().intra_op_num_threads == threads


def test_uint8_input_is_scaled_inside_the_model_exactly_like_training(trained_repository, mnist_data):
    from training.data import to_model_input

    model = OnnxModel(trained_repository / "mnist" / "1" / "model.onnx", Settings(device="cpu"))
    assert [i.type for i in model.uint8_session.get_inputs()] == ["tensor(uint8)"]
    pixels = np.ascontiguousarray(mnist_data.x_test.reshape(-1, 784))
    from_uint8, from_fp32 = model.run(pixels), model.run(to_model_input(pixels))
    assert from_uint8.dtype == np.float32 and from_uint8.shape == (10_000, 10)
    np.testing.assert_array_equal(from_uint8, from_fp32)  # bit for bit: both divide by 255 in float32
