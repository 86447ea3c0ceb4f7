"""Fixtures for the deploy/ checks: rendered kustomizations and the checker module (k8s_check.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# k8s_check.py is both `make k8s-check` and the tests' helper library; import it whatever the rootdir.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import k8s_check  # noqa: E402


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """`kubectl kustomize` of every kustomization meant for `kubectl apply -k`, by name (cpu, gpu, training)."""
    if k8s_check.kubectl() is None:
        pytest.skip("kubectl is not installed (it renders the kustomizations)")
    return {name: k8s_check.render(directory) for name, directory in k8s_check.KUSTOMIZATIONS.items()}


@pytest.fixture
def fake_driver(tmp_path):
    """Build a real shared library named libcuda.so.1 whose driver API reports a chosen CUDA version (12040 for
    12.4) and cuInit result; returns its directory, for LD_LIBRARY_PATH (found as the real one would be)."""
    if shutil.which("gcc") is None:
        pytest.skip("no gcc to build the fake driver library")

    def build(cuda_version: int, init_result: int = 0) -> str:
        lib_dir = tmp_path / f"driver-{cuda_version}-{init_result}"
        lib_dir.mkdir()
        source = lib_dir / "libcuda.c"
        source.write_text(
            f"int cuInit(unsigned int flags) {{ return {init_result}; }}\n"
            f"int cuDriverGetVersion(int *v) {{ *v = {cuda_version}; return 0; }}\n"
        )
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-o", str(lib_dir / "libcuda.so.1"), str(source)], check=True, timeout=60
        )
        return str(lib_dir)

    return build
