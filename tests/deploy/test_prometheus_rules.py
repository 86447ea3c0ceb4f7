"""Prometheus rules and config pass promtool, and name only metrics the server really exports."""

from __future__ import annotations

import re

import k8s_check
import pytest

# The metrics contract deploy/ is built on (name -> type, labels). k8s_check.known_metric_names() reads the
# names from serving/metrics.py itself; this table pins down what rules and dashboards rely on.
CONTRACT_METRICS = {
    "mnist_serving_request_duration_seconds": ("histogram", ("model", "version")),
    "mnist_serving_queue_duration_seconds": ("histogram", ("model", "version")),
    "mnist_serving_compute_duration_seconds": ("histogram", ("model", "version")),
    "mnist_serving_requests": ("counter", ("model", "version", "code")),
    "mnist_serving_images": ("counter", ("model", "version")),
    "mnist_serving_batch_size": ("histogram", ("model", "version")),
    "mnist_serving_requests_in_flight": ("gauge", ()),
    "mnist_serving_execution_provider_info": ("gauge", ("model", "version", "provider")),
    "mnist_serving_gpu_required": ("gauge", ()),
    "mnist_serving_model_load_seconds": ("gauge", ("model", "version")),
    "mnist_serving_offline_accuracy": ("gauge", ("model", "version")),
    "mnist_serving_online_accuracy": ("gauge", ("model", "version")),
    "mnist_serving_feedback": ("counter", ("model", "version", "outcome")),
    "mnist_serving_canary_accuracy": ("gauge", ("model", "version")),
    "mnist_serving_predictions": ("counter", ("model", "version", "class")),
    "mnist_serving_confidence": ("histogram", ("model", "version")),
    "mnist_serving_queue_images": ("gauge", ("model", "version")),
    "mnist_serving_shed": ("counter", ("model", "version", "reason")),
}


def promtool_or_skip() -> None:
    if k8s_check.promtool() is None:
        pytest.skip("promtool is not installed: `make prometheus-bin` (Debian package prometheus)")


def test_server_defines_the_contract_metrics():
    defined = k8s_check.serving_metrics()
    for name, (kind, labels) in CONTRACT_METRICS.items():
        assert name in defined, f"serving/metrics.py lost {name}"
        assert defined[name] == (kind, labels), name


def test_promtool_checks_and_unit_tests_pass():
    promtool_or_skip()
    k8s_check.check_promtool()


def test_promtool_rejects_a_broken_rule(tmp_path):
    promtool_or_skip()
    broken = tmp_path / "rules.yml"
    broken.write_text(k8s_check.RULES.read_text().replace("> 0.25", "> > 0.25"))
    with pytest.raises(k8s_check.CheckError, match="parse error"):
        k8s_check.run([k8s_check.promtool(), "check", "rules", str(broken)])


def test_rules_name_only_exported_metrics():
    exprs = [rule["expr"] for rule in k8s_check.rules()]
    assert not k8s_check.unknown_metrics(exprs)
    used = {name for expr in exprs for name in k8s_check.promql_metric_names(expr)}
    for name in ("request_duration_seconds_bucket", "requests_total", "feedback_total", "canary_accuracy",
                 "gpu_required", "execution_provider_info"):  # fmt: skip
        assert f"mnist_serving_{name}" in used
    # Online accuracy from the counters of all replicas, not one process's window gauge.
    assert "mnist_serving_online_accuracy" not in used


def test_unknown_metric_names_are_caught():
    assert k8s_check.unknown_metrics(["rate(mnist_serving_request_total[5m])"]) == {"mnist_serving_request_total"}
    assert k8s_check.unknown_metrics(["mnist_serving_online_accuracy{model='x'}"]) == set()


def test_known_metric_names_expand_types():
    names = k8s_check.known_metric_names()
    assert "mnist_serving_requests_total" in names and "mnist_serving_requests" not in names
    assert {f"mnist_serving_batch_size_{suffix}" for suffix in ("bucket", "sum", "count")} <= names
    assert "mnist_serving_gpu_required" in names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (job, le) (rate(a_bucket{code!="OK", x=~"by|on"}[5m]))', {"a_bucket"}),
        ("x and on (instance) y == 1", {"x", "y"}),
        ("histogram_quantile(0.99, sum without (pod) (rate(m[1m] offset 5m)))", {"m"}),
        ("a:b:c > 0.5 or vector(0) unless bool z", {"a:b:c", "z"}),
        ('max(up{job="mnist-serving"}) * 1e3 + Inf', {"up"}),
        ('sum(rate(m{job=~"$job"}[$__rate_interval])) / scalar(n)', {"m", "n"}),
    ],
)
def test_promql_metric_names(expr, names):
    assert k8s_check.promql_metric_names(expr) == names


def test_rules_are_well_formed():
    records = k8s_check.recording_rule_names()
    assert records and all(re.fullmatch(r"[a-z_]+:[a-z_0-9]+:[a-z_0-9]+", r) for r in records)
    alerts = [rule for rule in k8s_check.rules() if "alert" in rule]
    assert {a["alert"] for a in alerts} >= {
        "MnistServingHighLatencyP99", "MnistServingHighErrorRatio", "MnistServingOnlineAccuracyLow",
        "MnistServingCanaryAccuracyLow", "MnistServingCpuFallback",
    }  # fmt: skip
    for alert in alerts:
        assert alert["labels"]["severity"] in {"warning", "critical"}, alert["alert"]
        assert alert["annotations"]["summary"] and alert["annotations"]["description"], alert["alert"]
    latency = next(a for a in alerts if a["alert"] == "MnistServingHighLatencyP99")
    assert "request_duration_seconds:p99" in latency["expr"]


def test_every_alert_has_a_promtool_unit_test():
    import yaml

    tested = {
        case["alertname"]
        for test in yaml.safe_load(k8s_check.RULES_TEST.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert tested == {rule["alert"] for rule in k8s_check.rules() if "alert" in rule}


def test_local_prometheus_config_scrapes_the_default_metrics_port():
    import yaml

    from serving.config import Settings

    config = yaml.safe_load(k8s_check.PROMETHEUS_CONFIG.read_text())
    assert config["rule_files"] == ["rules.yml"]
    (job,) = config["scrape_configs"]
    # Same job name as the Kubernetes Service, which the rules filter on.
    assert job["job_name"] == "mnist-serving"
    assert job["static_configs"][0]["targets"] == [f"127.0.0.1:{Settings().metrics_port}"]
