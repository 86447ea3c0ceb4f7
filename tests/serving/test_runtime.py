"""Runtime settings that are not visible through the protocol."""

from __future__ import annotations

import os

from serving.config import Settings
from serving.runtime import intra_op_threads


def test_intra_op_threads_split_the_cores_between_workers():
    cores = len(os.sched_getaffinity(0))
    assert intra_op_threads(Settings(workers=1)) == 0  # one worker: onnxruntime sizes its own pool
    assert intra_op_threads(Settings(workers=2)) == max(1, cores // 2)
    assert intra_op_threads(Settings(workers=4 * cores)) == 1  # never 0 (= all cores) per worker
    assert intra_op_threads(Settings(workers=2, intra_op_threads=3)) == 3  # an explicit value wins
