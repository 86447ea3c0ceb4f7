"""Fixtures for the deploy/ checks: rendered kustomizations and the checker module (k8s_check.py)."""

from __future__ import annotations

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
