"""A host whose `nvidia-smi -L` lists a GPU but whose CUDA cannot run (a container started without the NVIDIA
runtime: no libcuda.so.1; a driver older than CUDA 13): DEVICE=auto serves on CPU saying why, DEVICE=cuda and
--device cuda fail naming the cause and the remedies, and `make gpu-check` exits 0 having measured nothing.

On this CPU machine: a fake `nvidia-smi` on PATH, and for the driver either nothing (no libcuda.so.1 here) or a real
shared library named libcuda.so.1, built here with gcc, that reports a chosen CUDA version through the driver API's
own entry points (cuInit, cuDriverGetVersion), found through LD_LIBRARY_PATH as the real one would be.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
H200 = "GPU 0: NVIDIA H200 (UUID: GPU-5e1f0c1a-0000-0000-0000-000000000000)"
GUARD_S = 120


def _real_libcuda() -> bool:
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


pytestmark = pytest.mark.skipif(_real_libcuda(), reason="this host has a libcuda.so.1: the fake one would not be used")


@pytest.fixture
def fake_gpu_host(tmp_path) -> dict[str, str]:
    """The environment of a host whose nvidia-smi lists an H200 (and with no libcuda.so.1, as here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho '{H200}'\n")
    smi.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def requirements(env: dict[str, str], device: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "deploy/docker/requirements.py", "--device", device, "--print-device"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=GUARD_S,
    )  # fmt: skip


def test_auto_with_no_driver_library_installs_the_cpu_build_and_says_why(fake_gpu_host):
    done = requirements(fake_gpu_host, "auto")
    assert done.returncode == 0 and done.stdout == "cpu\n", done
    assert "nvidia-smi lists 1 GPU(s): " + H200 in done.stderr
    assert "libcuda.so.1, the NVIDIA driver's CUDA library, cannot be loaded" in done.stderr
    assert "DEVICE=cpu" in done.stderr and "--gpus all" in done.stderr  # the remedies


def test_auto_with_a_driver_too_old_for_cuda_13_installs_the_cpu_build(fake_gpu_host, fake_driver):
    env = {**fake_gpu_host, "LD_LIBRARY_PATH": fake_driver(12040)}
    done = requirements(env, "auto")
    assert done.returncode == 0 and done.stdout == "cpu\n", done
    assert "the NVIDIA driver supports CUDA 12.4, and onnxruntime-gpu needs CUDA 13.0 (driver 580" in done.stderr


def test_auto_with_a_driver_that_cannot_initialise_installs_the_cpu_build(fake_gpu_host, fake_driver):
    env = {**fake_gpu_host, "LD_LIBRARY_PATH": fake_driver(13000, init_result=100)}
    done = requirements(env, "auto")
    assert done.returncode == 0 and done.stdout == "cpu\n", done
    assert "cuInit returned 100: no CUDA-capable device is detected" in done.stderr


def test_auto_with_a_working_cuda_13_driver_installs_the_gpu_build(fake_gpu_host, fake_driver):
    env = {**fake_gpu_host, "LD_LIBRARY_PATH": fake_driver(13000)}
    done = requirements(env, "auto")
    assert done.returncode == 0 and done.stdout == "cuda\n", done


def test_device_cuda_fails_before_installing_with_the_cause_and_remedies(fake_gpu_host):
    done = requirements(fake_gpu_host, "cuda")
    assert done.returncode == 1 and done.stdout == "", done
    assert "DEVICE=cuda: CUDA cannot run here: libcuda.so.1" in done.stderr and "DEVICE=cpu" in done.stderr


def test_the_server_with_device_cuda_fails_with_the_cause_and_remedies(fake_gpu_host, tmp_path, trained_repository):
    done = subprocess.run(
        [sys.executable, "-m", "serving", "--device", "cuda", "--model-repository", str(trained_repository),
         "--grpc-port", "0", "--metrics-port", "0"],
        cwd=REPO, env=fake_gpu_host, capture_output=True, text=True, timeout=GUARD_S,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    assert "start-up failed: --device cuda: CUDA is not active" in done.stderr
    assert "libcuda.so.1, the NVIDIA driver's CUDA library, cannot be loaded" in done.stderr
    assert "Remedies: serve on the CPU" in done.stderr


def test_gpu_check_exits_0_saying_it_measured_nothing_and_why(fake_gpu_host):
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check"], cwd=REPO, env=fake_gpu_host, capture_output=True, text=True,
        timeout=GUARD_S,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "nothing measured" in done.stdout and "libcuda.so.1" in done.stdout, done.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_venv_with_device_auto_goes_on_and_warns(fake_gpu_host):
    """`make run`'s set-up step on such a host: the venv of this test run, DEVICE=auto (the default)."""
    done = subprocess.run(
        ["make", "--no-print-directory", f"VENV={sys.prefix}", "venv"],
        cwd=REPO, env=fake_gpu_host, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "libcuda.so.1, the NVIDIA driver's CUDA library, cannot be loaded" in done.stderr
    assert (Path(sys.prefix) / ".device").read_text() == "cpu\n"
