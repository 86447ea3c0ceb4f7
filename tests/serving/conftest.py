"""Fixtures: the real server as a subprocess (`python -m serving`) on free loopback ports."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from metrics_helpers import CANARY, GOLDEN, V1, V2, scrape, stubs, wait_for_metric, wait_runs
from server_process import start_server

from serving.protos import grpc_service_pb2 as pb


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


def permuted_classes(model_path: Path) -> bytes:
    """The model with its output classes rotated by one (kernel columns and bias of the last layer):
    a valid model with finite outputs that loads and warms up fine, but answers c+1 for c."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if 10 in array.shape:
            rolled = np.roll(array, 1, axis=array.shape.index(10))
            init.CopyFrom(numpy_helper.from_array(rolled, init.name))
    return model.SerializeToString()


@pytest.fixture(scope="module")
def two_versions(trained_repository, tmp_path_factory) -> Path:
    """mnist/1: the trained model; mnist/2: the same model with its classes permuted (same metadata.json)."""
    root = tmp_path_factory.mktemp("canary") / "repo"
    shutil.copytree(trained_repository / "mnist" / "1", root / "mnist" / "1")
    (root / "mnist" / "2").mkdir()
    (root / "mnist" / "2" / "model.onnx").write_bytes(permuted_classes(root / "mnist" / "1" / "model.onnx"))
    shutil.copy(root / "mnist" / "1" / "metadata.json", root / "mnist" / "2" / "metadata.json")
    return root


@pytest.fixture(scope="module")
def canary_server(two_versions, tmp_path_factory):
    """A server on `two_versions` running the canary every 0.3 s.

    Before yielding it waits for two canary runs on each version and records `before_clients` (a /metrics
    snapshot) and `stats_before_clients` (ModelStatistics of mnist/1): what the canary alone did, whatever
    the tests using this server send afterwards and in whichever order they run."""
    # --no-verify-on-load: the load-time accuracy check would refuse version 2 (a corrupt file on disk);
    # the canary is what notices a model that goes bad while loaded or slipped past that check.
    server = start_server(
        two_versions, tmp_path_factory.mktemp("canary-server"),
        "--canary-interval-s", "0.3", "--canary-images", str(GOLDEN), "--no-verify-on-load",
    )  # fmt: skip
    try:
        wait_for_metric(server, CANARY, **V1)
        wait_for_metric(server, CANARY, **V2)
        for labels in (V1, V2):
            wait_runs(server, 2, **labels)
        channel, infer, _ = stubs(server.url)
        with channel:
            request = pb.ModelStatisticsRequest(name="mnist", version="1")
            server.stats_before_clients = infer.ModelStatistics(request, timeout=10).model_stats[0]
        server.before_clients = scrape(server)
        yield server
    finally:
        assert server.stop() == 0, server.log()
