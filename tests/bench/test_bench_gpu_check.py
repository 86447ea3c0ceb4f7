"""`make gpu-check` on a machine without CUDA: a clean report, exit 0 (non-zero with --require)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.common import REPO_ROOT
from bench.gpu_check import CUDA, cuda_devices

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.skipif(
    CUDA in ort.get_available_providers() and bool(cuda_devices()), reason="this machine has CUDA: the real check runs"
)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )


def test_no_cuda_is_a_clean_pass():
    done = _run()
    assert done.returncode == 0, done.stderr
    assert "no CUDA here: onnxruntime providers = [" in done.stdout
    assert "CPUExecutionProvider" in done.stdout and "nothing to check" in done.stdout
    assert "Traceback" not in done.stderr


def test_require_fails_without_cuda():
    done = _run("--require")
    assert done.returncode == 1
    assert "no CUDA here" in done.stdout and "--require" in done.stderr
