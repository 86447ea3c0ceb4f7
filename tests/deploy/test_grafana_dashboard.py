"""The Grafana dashboard is well formed and charts the server's real metrics."""

from __future__ import annotations

import json

import k8s_check


def dashboard() -> dict:
    return json.loads(k8s_check.DASHBOARD.read_text())


def panels() -> list[dict]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def test_panels_are_unique_and_do_not_overlap():
    every = dashboard()["panels"]
    ids = [p["id"] for p in every]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in every:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(g["x"] + dx, g["y"] + dy) for dx in range(g["w"]) for dy in range(g["h"])}
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine


def test_every_panel_queries_prometheus_through_the_datasource_variable():
    variables = {v["name"] for v in dashboard()["templating"]["list"]}
    assert {"datasource", "job", "model"} <= variables
    for p in panels():
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]


def test_dashboard_uses_only_exported_metrics():
    assert not k8s_check.unknown_metrics(k8s_check.dashboard_exprs())


def test_dashboard_covers_latency_throughput_batching_errors_accuracy_provider():
    used = {name for expr in k8s_check.dashboard_exprs() for name in k8s_check.promql_metric_names(expr)}
    for part in ("request", "queue", "compute"):
        assert f"mnist_serving_{part}_duration_seconds_bucket" in used
    for name in ("requests_total", "images_total", "batch_size_bucket", "requests_in_flight",
                 "offline_accuracy", "canary_accuracy", "execution_provider_info"):  # fmt: skip
        assert f"mnist_serving_{name}" in used, name
    # Online accuracy of all replicas (feedback counters), not one process's window gauge.
    assert "mnist_serving:online_accuracy:ratio30m" in used
    assert "mnist_serving_online_accuracy" not in used
    exprs = "\n".join(k8s_check.dashboard_exprs())
    for q in ("0.5", "0.9", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(mnist_serving_request_duration_seconds_bucket" in exprs
    assert 'code!="OK"' in exprs
