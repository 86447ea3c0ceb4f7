"""Fixtures: the real server as a subprocess (`python -m serving`) on free loopback ports."""

from __future__ import annotations

import pytest
from server_process import start_server


@pytest.fixture(scope="session")
def server(trained_repository, tmp_path_factory):
    """One real server for the read-mostly integration tests."""
    srv = start_server(trained_repository, tmp_path_factory.mktemp("server"), "--max-batch-size", "1024")
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="session")
def triton(server):
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(server.url)
    yield client
    client.close()
