"""/metrics of the real server: exact counter and histogram deltas, the gauges, multiprocess (--workers) mode."""

from __future__ import annotations

import math
import re
import shutil
import time

import grpc
import numpy as np
import pytest
from metrics_helpers import delta, metadata, scrape, stubs
from prometheus_client import Counter
from prometheus_client.metrics import MetricWrapperBase
from server_process import ROOT, start_server

from serving import metrics
from serving.client import infer_request, probabilities
from serving.protos import grpc_service_pb2 as pb

M = {"model": "mnist", "version": "1"}


def _bad_requests(x: np.ndarray) -> list[pb.ModelInferRequest]:
    """Three requests for mnist/1 that the server refuses with INVALID_ARGUMENT after resolving the model."""
    bad_shape = infer_request(x[:1], "mnist")
    bad_shape.inputs[0].shape[:] = [1, 783]
    out_of_range = infer_request(x[:2], "mnist", datatype="FP32")
    out_of_range.raw_input_contents[0] = np.full((2, 784), 2.0, "<f4").tobytes()
    bad_label = infer_request(x[:3], "mnist")
    bad_label.parameters["labels"].string_param = "1,2,11"
    return [bad_shape, out_of_range, bad_label]


def test_counters_and_histograms_move_by_exactly_what_was_sent(server, mnist_data):
    sizes = (1, 3, 8, 16, 5)
    x = mnist_data.x_test
    channel, infer, _ = stubs(server.url)
    with channel:
        stats = pb.ModelStatisticsRequest(name="mnist", version="1")
        stats_before = infer.ModelStatistics(stats).model_stats[0]
        before = scrape(server)
        probs, offset = [], 0
        for n in sizes:
            probs.append(probabilities(infer.ModelInfer(infer_request(x[offset : offset + n], "mnist"), timeout=10)))
            offset += n
        for request in _bad_requests(x):
            with pytest.raises(grpc.RpcError) as err:
                infer.ModelInfer(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        after = scrape(server)
        stats_after = infer.ModelStatistics(stats).model_stats[0]

    probs = np.concatenate(probs)
    images, requests = sum(sizes), len(sizes)
    d = lambda name, **labels: delta(before, after, name, **labels)  # noqa: E731
    assert d("mnist_serving_requests_total", **M, code="OK") == requests
    assert d("mnist_serving_requests_total", **M, code="INVALID_ARGUMENT") == 3
    assert d("mnist_serving_requests_total", **M) == requests + 3
    assert d("mnist_serving_images_total", **M) == images
    # Drift signals: every answered image once, in the class the client received.
    predicted = np.bincount(probs.argmax(axis=1), minlength=10)
    assert [d("mnist_serving_predictions_total", **M, **{"class": str(c)}) for c in range(10)] == predicted.tolist()
    top = probs.max(axis=1).astype(np.float64)
    assert d("mnist_serving_confidence_count", **M) == images
    assert d("mnist_serving_confidence_sum", **M) == pytest.approx(top.sum(), abs=1e-9)
    for le in ("0.5", "0.9", "0.99"):
        assert d("mnist_serving_confidence_bucket", **M, le=le) == int((top <= float(le)).sum()), le
    # Every attributed request is timed, refused ones included; only accepted ones reach queue and compute.
    assert d("mnist_serving_request_duration_seconds_count", **M) == requests + 3
    assert d("mnist_serving_request_duration_seconds_sum", **M) > 0
    assert d("mnist_serving_queue_duration_seconds_count", **M) == requests
    assert d("mnist_serving_compute_duration_seconds_count", **M) == requests  # sequential: never merged
    assert d("mnist_serving_batch_size_count", **M) == requests
    assert d("mnist_serving_batch_size_sum", **M) == images
    assert d("mnist_serving_batch_size_bucket", **M, le="8.0") == sum(n <= 8 for n in sizes)
    assert d("mnist_serving_shed_total", **M) == 0
    assert after.get("mnist_serving_requests_in_flight") == 0
    assert after.get("mnist_serving_queue_images", **M) == 0
    # ModelStatistics tells the same story as /metrics.
    s0, s1 = stats_before.inference_stats, stats_after.inference_stats
    assert s1.success.count - s0.success.count == requests
    assert s1.fail.count - s0.fail.count == 3
    assert stats_after.inference_count - stats_before.inference_count == images
    assert stats_after.execution_count - stats_before.execution_count == requests


def test_offline_accuracy_provider_and_load_gauges(server, trained_repository):
    snap = scrape(server)
    assert snap.get("mnist_serving_offline_accuracy", **M) == metadata(trained_repository)["test_accuracy"]
    channel, infer, _ = stubs(server.url)
    with channel:
        config = infer.ModelConfig(pb.ModelConfigRequest(name="mnist"), timeout=10).config
    provider = config.parameters["execution_provider"].string_value
    assert snap.series("mnist_serving_execution_provider_info", **M) == [({**M, "provider": provider}, 1.0)]
    assert snap.get("mnist_serving_model_load_seconds", **M) > 0
    assert snap.get("mnist_serving_gpu_required") == 0
    assert not snap.has("mnist_serving_model_load_failures_total")  # nothing failed to load


def _table_names(text: str) -> set[str]:
    return {m for line in text.splitlines() if line.startswith("|") for m in re.findall(r"`(mnist_serving_\w+)`", line)}


def test_docs_table_lists_every_metric():
    """docs/metrics.md documents exactly the metrics serving/metrics.py defines (exposition names)."""
    defined = {
        m._name + ("_total" if isinstance(m, Counter) else "")
        for m in vars(metrics).values()
        if isinstance(m, MetricWrapperBase)
    }
    documented = _table_names((ROOT / "docs" / "metrics.md").read_text())
    assert documented == defined, f"undocumented: {sorted(defined - documented)}; gone: {sorted(documented - defined)}"


def test_workers_share_one_metrics_endpoint(trained_repository, mnist_data, tmp_path):
    """--workers 2: counters from both processes add up on the one /metrics; gauges carry no pid label."""
    server = start_server(trained_repository, tmp_path, "--workers", "2")
    try:
        _wait_for_log(server, "serving.server: ready:", 2)
        before = scrape(server)
        requests = images = 0
        for i in range(20):  # each channel is its own TCP connection: the kernel spreads them over the workers
            channel, infer, _ = stubs(server.url, own_connection=True)
            with channel:
                for _ in range(i % 3 + 1):
                    n = i % 4 + 1
                    infer.ModelInfer(infer_request(mnist_data.x_test[:n], "mnist"), timeout=10)
                    requests, images = requests + 1, images + n
        per_worker = set()
        for _ in range(20):  # ModelStatistics is per process: a total below `requests` means both served
            channel, infer, _ = stubs(server.url, own_connection=True)
            with channel:
                reply = infer.ModelStatistics(pb.ModelStatisticsRequest(name="mnist"), timeout=10)
            per_worker.add(reply.model_stats[0].inference_stats.success.count)
        after = scrape(server)
    finally:
        assert server.stop() == 0, server.log()

    # A worker that served some but not all requests proves both served; two counts must add up.
    assert any(0 < count < requests for count in per_worker), per_worker
    assert len(per_worker) == 1 or sum(per_worker) == requests, per_worker
    assert delta(before, after, "mnist_serving_requests_total", **M, code="OK") == requests
    assert delta(before, after, "mnist_serving_images_total", **M) == images
    assert delta(before, after, "mnist_serving_request_duration_seconds_count", **M) == requests
    assert delta(before, after, "mnist_serving_batch_size_sum", **M) == images
    assert after.get("mnist_serving_requests_in_flight") == 0
    [(labels, value)] = after.series("mnist_serving_execution_provider_info", **M)
    assert set(labels) == {"model", "version", "provider"} and value == 1
    assert after.series("mnist_serving_offline_accuracy", **M) == [(M, metadata(trained_repository)["test_accuracy"])]
    assert not any("pid" in labels for _, labels, _ in after.samples)


def _wait_for_log(server, text: str, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while server.log().count(text) < count:
        assert time.monotonic() < deadline, f"{count}x {text!r} not in the log:\n{server.log()}"
        assert server.proc.poll() is None, server.log()
        time.sleep(0.1)


def test_workers_blank_the_gauges_of_an_unloaded_version(trained_repository, tmp_path):
    """Multiprocess files cannot drop a series: an unloaded version's gauges read NaN/0, not stale values."""
    v2 = {"model": "mnist", "version": "2"}
    repo = tmp_path / "repo"
    for version in ("1", "2"):
        shutil.copytree(trained_repository / "mnist" / "1", repo / "mnist" / version)
    server = start_server(repo, tmp_path, "--workers", "2", "--model-poll-interval-s", "0.2")
    try:
        _wait_for_log(server, "serving.server: ready:", 2)
        loaded = scrape(server)
        shutil.rmtree(repo / "mnist" / "2")
        deadline = time.monotonic() + 30
        while (unloaded := scrape(server)).get("mnist_serving_execution_provider_info", **v2) != 0:
            assert time.monotonic() < deadline, f"version 2 still reported:\n{unloaded.text}\n{server.log()}"
            time.sleep(0.1)
    finally:
        assert server.stop() == 0, server.log()
    assert loaded.get("mnist_serving_execution_provider_info", **v2) == 1
    assert loaded.get("mnist_serving_offline_accuracy", **v2) == metadata(trained_repository)["test_accuracy"]
    assert unloaded.get("mnist_serving_execution_provider_info", **v2) == 0
    for name in ("mnist_serving_offline_accuracy", "mnist_serving_model_load_seconds"):
        assert math.isnan(unloaded.get(name, **v2)), name
    assert unloaded.get("mnist_serving_offline_accuracy", **M) == metadata(trained_repository)["test_accuracy"]
    assert unloaded.get("mnist_serving_execution_provider_info", **M) == 1


def test_multiprocess_directory_is_created_on_import(tmp_path):
    """PROMETHEUS_MULTIPROC_DIR naming a directory that does not exist yet (a fresh emptyDir) is made, not a crash."""
    import subprocess
    import sys

    target = tmp_path / "fresh" / "prom"
    env = {"PATH": "/usr/bin:/bin", "PROMETHEUS_MULTIPROC_DIR": str(target)}
    proc = subprocess.run(
        [sys.executable, "-c", "import serving.metrics"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any(target.glob("gauge_*.db"))
