"""The canary: a golden set through the live serving path catches a model that loads fine but predicts badly."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from metrics_helpers import GOLDEN, in_process_accuracy, metadata, scrape, stubs, wait_for_metric
from server_process import start_server

from serving.client import infer_request, probabilities
from serving.golden import accuracy, load_golden_set
from serving.protos import grpc_service_pb2 as pb

CANARY = "mnist_serving_canary_accuracy"
RUNS = "mnist_serving_canary_runs_total"
V1, V2 = {"model": "mnist", "version": "1"}, {"model": "mnist", "version": "2"}


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
def repository(trained_repository, tmp_path_factory) -> Path:
    """mnist/1: the trained model; mnist/2: the same model with its classes permuted."""
    root = tmp_path_factory.mktemp("canary") / "repo"
    shutil.copytree(trained_repository / "mnist" / "1", root / "mnist" / "1")
    (root / "mnist" / "2").mkdir()
    (root / "mnist" / "2" / "model.onnx").write_bytes(permuted_classes(root / "mnist" / "1" / "model.onnx"))
    shutil.copy(root / "mnist" / "1" / "metadata.json", root / "mnist" / "2" / "metadata.json")
    return root


@pytest.fixture(scope="module")
def canary_server(repository, tmp_path_factory):
    # --no-verify-on-load: the load-time accuracy check would refuse version 2 (a corrupt file on disk);
    # the canary is what notices a model that goes bad while loaded or slipped past that check.
    server = start_server(
        repository, tmp_path_factory.mktemp("canary-server"),
        "--canary-interval-s", "0.3", "--canary-images", str(GOLDEN), "--no-verify-on-load",
    )  # fmt: skip
    try:
        wait_for_metric(server, CANARY, **V1)
        wait_for_metric(server, CANARY, **V2)
        yield server
    finally:
        assert server.stop() == 0, server.log()


def _wait_runs(server, runs: int, timeout: float = 30, **labels) -> None:
    deadline = time.monotonic() + timeout
    while scrape(server).get(RUNS, **labels, result="ok") < runs:
        assert time.monotonic() < deadline, f"fewer than {runs} canary runs:\n{server.log()[-3000:]}"
        time.sleep(0.1)


def test_canary_traffic_is_not_client_traffic(canary_server):
    """Runs before any client request to this server: the canary's batches show only in the batch metrics."""
    _wait_runs(canary_server, 2, **V1)
    snap = scrape(canary_server)
    for name in (
        "mnist_serving_requests_total", "mnist_serving_images_total", "mnist_serving_predictions_total",
        "mnist_serving_request_duration_seconds_count", "mnist_serving_confidence_count",
        "mnist_serving_feedback_total",
    ):  # fmt: skip
        assert snap.get(name) == 0, name
    for mv in (V1, V2):
        runs, images = snap.get(RUNS, **mv, result="ok"), snap.get("mnist_serving_batch_size_sum", **mv)
        assert images % GOLDEN == 0 and images >= GOLDEN * (runs - 1) > 0, (runs, images)
    channel, infer, _ = stubs(canary_server.url)
    with channel:
        stats = infer.ModelStatistics(pb.ModelStatisticsRequest(name="mnist", version="1"), timeout=10).model_stats[0]
    assert (stats.inference_stats.success.count, stats.inference_count) == (0, 0)
    assert stats.execution_count >= 1


def test_canary_on_the_good_model_equals_its_in_process_accuracy(canary_server, repository, mnist_data):
    canary = scrape(canary_server).get(CANARY, **V1)
    assert canary == in_process_accuracy(repository / "mnist" / "1" / "model.onnx", mnist_data)
    assert canary == pytest.approx(metadata(repository)["test_accuracy"], abs=0.03)  # 1,000 of the 10,000


def test_canary_catches_a_corrupted_model_while_the_server_keeps_serving(canary_server, repository, mnist_data):
    _wait_runs(canary_server, 3, **V2)
    snap = scrape(canary_server)
    assert snap.get(CANARY, **V2) < 0.5
    assert snap.get(CANARY, **V2) == in_process_accuracy(repository / "mnist" / "2" / "model.onnx", mnist_data)
    assert snap.get("mnist_serving_offline_accuracy", **V2) == metadata(repository)["test_accuracy"]
    log = canary_server.log()
    assert log.count("canary: mnist/2 scores") == 1, log  # once, not every run
    assert "canary: mnist/1 scores" not in log
    channel, infer, _ = stubs(canary_server.url)
    with channel:
        x = mnist_data.x_test[:8]
        for version in ("1", "2"):
            reply = infer.ModelInfer(infer_request(x, "mnist", version), timeout=10)
            assert probabilities(reply).shape == (8, 10)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert scrape(canary_server).get("mnist_serving_requests_total", **V2, code="OK") == 1


def test_without_mnist_data_the_canary_is_off_and_the_server_serves(trained_repository, mnist_data, tmp_path):
    server = start_server(
        trained_repository, tmp_path, "--canary-interval-s", "0.1", "--data-dir", str(tmp_path / "no-data")
    )
    try:
        deadline = time.monotonic() + 30
        while "canary disabled" not in server.log():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
        time.sleep(0.5)  # several intervals: the warning must not repeat
        channel, infer, _ = stubs(server.url)
        with channel:
            infer.ModelInfer(infer_request(mnist_data.x_test[:1], "mnist"), timeout=10)
        snap = scrape(server)
    finally:
        assert server.stop() == 0, server.log()
    assert server.log().count("canary disabled") == 1
    assert not snap.has(CANARY)
    assert snap.get("mnist_serving_requests_total", **V1, code="OK") == 1


def test_golden_set_helpers(tmp_path):
    assert load_golden_set(tmp_path, 10) is None  # no cache: never downloads
    probs = np.array([[0.1, 0.9], [0.2, np.nan], [0.8, 0.2]])
    assert accuracy(probs, np.array([1, 1, 1])) == 1 / 3  # a NaN row is wrong even where argmax would match
