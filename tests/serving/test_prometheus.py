"""A real Prometheus scraping the real server (scripts/metrics_demo.py): its answers match what the client knows."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
from metrics_helpers import GOLDEN, in_process_accuracy, metadata
from server_process import ROOT

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="no prometheus binary (make prometheus-bin: Debian package prometheus)"
)


def client_quantile(latencies: list[float], q: float) -> float:
    """The ceil(q*n)-th smallest latency: the observation whose bucket histogram_quantile interpolates in."""
    return sorted(latencies)[max(1, math.ceil(q * len(latencies))) - 1]


def bucket_upper(buckets: dict[str, float], value: float) -> float:
    return min(float(le) for le in buckets if value <= float(le))


@pytest.fixture(scope="module")
def demo(trained_repository, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("prometheus") / "demo.json"
    command = [
        sys.executable, str(ROOT / "scripts" / "metrics_demo.py"), "--model-repository", str(trained_repository),
        "--data-dir", str(ROOT / "data"), "--seconds", "2", "--canary-images", str(GOLDEN), "--json", str(out),
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}"
    result = json.loads(out.read_text())
    result["stdout"] = run.stdout
    return result


def test_prometheus_accuracy_equals_what_the_client_knows(demo, trained_repository, mnist_data):
    client, prom = demo["client"], demo["prometheus"]
    assert client["labelled"] == client["images"] > 0  # every image was labelled, half of them by Feedback RPC
    assert client["labelled_by_parameter"] > 0 and client["labelled_by_feedback"] > 0
    known = client["correct"] / client["labelled"]
    assert prom["online_accuracy_counters"] == known, demo["stdout"]
    assert prom["online_accuracy_gauge"] == known, demo["stdout"]  # the window (1e6) holds every answer
    assert prom["offline_accuracy"] == metadata(trained_repository)["test_accuracy"]
    model = trained_repository / "mnist" / "1" / "model.onnx"
    assert prom["canary_accuracy"] == in_process_accuracy(model, mnist_data)
    assert prom["requests_ok"] == client["requests"]
    assert prom["requests_failed"] == 0 and prom["feedback_not_scored"] == 0  # no refused or duplicate label
    assert prom["images_per_s"] > 0


def test_prometheus_latency_is_consistent_with_the_client_timings(demo):
    """Each request's server time lies inside its client time, so per bucket the server has at least as many
    requests at or below the bound, and each quantile is at most the top of the client's bucket."""
    latencies, prom = demo["client"]["latencies_s"], demo["prometheus"]
    buckets = prom["duration_buckets"]
    assert buckets["+Inf"] == len(latencies)
    for le, count in buckets.items():
        assert count >= sum(t <= float(le) for t in latencies), le
    for q, key in ((0.5, "p50_s"), (0.99, "p99_s")):
        client = client_quantile(latencies, q)
        assert 0 < prom[key] <= bucket_upper(buckets, client), (key, prom[key], client, demo["stdout"])
