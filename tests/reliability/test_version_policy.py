"""--version-policy: which versions of a model are loaded, at start and as versions come and go."""

from __future__ import annotations

import time

import grpc
import pytest
from rel_harness import add_version, channel, wait_until
from server_process import start_server

from serving.config import parse_version_policy
from serving.protos import grpc_service_pb2 as pb
from serving.protos import grpc_service_pb2_grpc as pb_grpc


@pytest.mark.parametrize(
    "text, parsed",
    [("latest:2", ("latest", (2,))), ("all", ("all", ())), ("specific:1,3", ("specific", (1, 3)))],
)
def test_policies_parse(text, parsed):
    assert parse_version_policy(text) == parsed


@pytest.mark.parametrize("text", ["latest", "latest:0", "latest:1,2", "all:3", "specific:", "specific:a", "newest:1"])
def test_bad_policies_are_refused_with_the_forms_that_work(text):
    with pytest.raises(ValueError, match="'latest:N' \\(N >= 1\\), 'all' or 'specific"):
        parse_version_policy(text)


def ready_versions(server) -> list[str]:
    with channel(server) as ch:
        index = pb_grpc.GRPCInferenceServiceStub(ch).RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=5)
    return sorted(m.version for m in index.models)


def test_latest_keeps_the_newest_versions_that_load(repository, tmp_path):
    model_dir = repository / "mnist"
    for v in (2, 3):
        add_version(model_dir, v, model_dir / "1")
    server = start_server(repository, tmp_path, "--version-policy", "latest:2", "--model-poll-interval-s", "0.2")
    try:
        assert ready_versions(server) == ["2", "3"]
        # Version 1 is not served: ModelReady says so, ModelMetadata is NOT_FOUND naming the versions served.
        with channel(server) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            assert not stub.ModelReady(pb.ModelReadyRequest(name="mnist", version="1"), timeout=5).ready
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelMetadata(pb.ModelMetadataRequest(name="mnist", version="1"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "versions: 2, 3" in err.value.details()
        # A new version pushes the oldest out; a broken newest one does not count, so 4 and 3 stay.
        add_version(model_dir, 4, model_dir / "1")
        wait_until(lambda: ready_versions(server) == ["3", "4"], "version 4 in, 2 out")
        add_version(model_dir, 5, model_dir / "1", onnx=b"this is not an onnx model")
        time.sleep(1.0)
        assert ready_versions(server) == ["3", "4"]
    finally:
        assert server.stop() == 0
    log = server.log()
    assert "unloading model mnist version 2 (version policy: latest)" in log, log[-2000:]
    assert "model mnist version 5 rejected" in log


def test_specific_loads_only_the_named_versions(repository, tmp_path):
    model_dir = repository / "mnist"
    add_version(model_dir, 2, model_dir / "1")
    server = start_server(repository, tmp_path, "--version-policy", "specific:1")
    try:
        assert ready_versions(server) == ["1"]
    finally:
        assert server.stop() == 0
