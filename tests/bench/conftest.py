"""Fixtures for the benchmark tests: the no-compute reference server and the MNIST test set."""

from __future__ import annotations

import pytest

from bench.common import launch, load_test_set


@pytest.fixture(scope="session")
def test_set():
    """MNIST test images uint8 (10000, 784) and labels."""
    return load_test_set()


@pytest.fixture(scope="session")
def nocompute(tmp_path_factory):
    """The no-compute server on a free loopback port."""
    child = launch("nocompute", ["-m", "bench.nocompute_server"], tmp_path_factory.mktemp("nocompute"))
    yield child
    child.stop()


@pytest.fixture(scope="session")
def slow_nocompute(tmp_path_factory):
    """The no-compute server answering each request only after 20 ms (asyncio.sleep)."""
    child = launch(
        "nocompute-slow", ["-m", "bench.nocompute_server", "--delay-ms", "20"], tmp_path_factory.mktemp("slow")
    )
    yield child
    child.stop()
