"""`make gpu-check`: on a machine without CUDA a clean report, exit 0 (non-zero with --require); on a machine
with CUDA the real check runs and must pass. Each machine asserts what is true on it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.common import REPO_ROOT
from bench.gpu_check import CUDA, cuda_devices

ort = pytest.importorskip("onnxruntime")
HAS_CUDA = CUDA in ort.get_available_providers() and bool(cuda_devices())
no_cuda_only = pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA: test_cuda_check_passes runs instead")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )


@no_cuda_only
def test_no_cuda_is_a_clean_pass():
    done = _run()
    assert done.returncode == 0, done.stderr
    assert "no CUDA here: onnxruntime providers = [" in done.stdout
    assert "CPUExecutionProvider" in done.stdout and "nothing to check" in done.stdout
    assert "Traceback" not in done.stderr


@no_cuda_only
def test_require_fails_without_cuda():
    done = _run("--require")
    assert done.returncode == 1
    assert "no CUDA here" in done.stdout and "--require" in done.stderr


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA here: the no-CUDA report is tested instead")
def test_cuda_check_passes(trained_repository):
    """In process only (the gRPC table is a benchmark): CUDA really active and the same answers as CPU."""
    done = _run("--require", "--no-grpc", "--duration", "0.2", "--model-repository", str(trained_repository))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[FAIL]" not in done.stdout and "gpu-check PASSED" in done.stdout
