"""Triton's own perf_analyzer against the real server: unary, streaming and batched runs exit 0 and its server-side
counts (read from our ModelStatistics) agree with what it sent. `make test` installs it (`make perf-analyzer`)."""

from __future__ import annotations

import json

import pytest
from server_process import start_server

from bench import perf_analyzer as pa

WHY_NOT = pa.missing()
pytestmark = pytest.mark.skipif(
    WHY_NOT is not None, reason=f"perf_analyzer is not installed here ({WHY_NOT}); `make test` installs it"
)


@pytest.fixture(scope="module")
def server(trained_repository, tmp_path_factory):
    srv = start_server(trained_repository, tmp_path_factory.mktemp("perf_analyzer"), "--metrics-port", "0")
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def data(tmp_path_factory, mnist_data):
    return pa.write_input_data(tmp_path_factory.mktemp("pa-data") / "mnist.json", mnist_data.x_test, count=64)


def test_input_data_is_real_mnist_in_perf_analyzers_format(data, mnist_data):
    entries = json.loads(data.read_text())["data"]
    assert len(entries) == 64
    first = entries[0]["input"]
    assert first["shape"] == [784]
    assert first["content"] == pytest.approx(mnist_data.x_test[0].reshape(784) / 255.0, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    "step", [pa.PaStep(4), pa.PaStep(4, streaming=True), pa.PaStep(2, batch=16)], ids=lambda s: s.label()
)
def test_perf_analyzer_runs_and_server_counts_match(server, data, step):
    before = server.answered()
    # A huge stability allowance: this checks behaviour, not speed (a busy machine must not fail it).
    r = pa.run(server.url, step, data, window_ms=400, stability_pct=1000, max_trials=3, timeout=120)
    after = server.answered()
    assert r["rc"] == 0, r.get("error")  # perf_analyzer itself refuses inconsistent server statistics
    assert r["client_requests"] > 0
    # Client and server count the same windows, give or take the requests in flight at the two edges.
    assert abs(r["server_requests"] - r["client_requests"]) <= step.count_tolerance()
    assert r["server_inferences"] == step.batch * r["server_requests"]
    # Batches: never more runs than requests, but a run is counted when it is answered and its requests a moment
    # later, when their responses are ready; at the window's edges up to `concurrency` runs can be counted without
    # their requests (seen: 1470 runs for 1469 requests).
    assert r["server_executions"] <= r["server_requests"] + step.concurrency
    assert after - before >= r["client_requests"]  # every request it counted was answered by this server
