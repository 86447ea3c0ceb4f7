"""Prometheus metrics: the series' definitions and the /metrics HTTP endpoint (serving.telemetry writes them)."""

from __future__ import annotations

import logging
import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
)

log = logging.getLogger(__name__)

if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    # The metrics below write their values into this directory as soon as they are defined: a fresh emptyDir
    # (Kubernetes) or tmpfs does not have it yet.
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

PREFIX = "mnist_serving"
# From ~20 us (a batch-1 run of the MLP) to seconds (a deep queue or a cold GPU).
LATENCY_BUCKETS = (
    20e-6, 50e-6, 100e-6, 200e-6, 300e-6, 500e-6, 750e-6,
    1e-3, 1.5e-3, 2e-3, 3e-3, 5e-3, 7.5e-3, 10e-3, 15e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5, 5.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
CONFIDENCE_BUCKETS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)
MV = ("model", "version")

REQUEST_DURATION = Histogram(
    f"{PREFIX}_request_duration_seconds", "ModelInfer time inside the server, decode to encode.", MV,
    buckets=LATENCY_BUCKETS,
)  # fmt: skip
QUEUE_DURATION = Histogram(
    f"{PREFIX}_queue_duration_seconds",
    "Time a request waited in the batch queue.",
    MV,
    buckets=LATENCY_BUCKETS,
)
COMPUTE_DURATION = Histogram(
    f"{PREFIX}_compute_duration_seconds",
    "onnxruntime run time per executed batch.",
    MV,
    buckets=LATENCY_BUCKETS,
)
REQUESTS = Counter(f"{PREFIX}_requests", "ModelInfer requests by final gRPC status code.", (*MV, "code"))
IMAGES = Counter(f"{PREFIX}_images", "Images inferred successfully.", MV)
BATCH_SIZE = Histogram(f"{PREFIX}_batch_size", "Images per executed onnxruntime run.", MV, buckets=BATCH_BUCKETS)
IN_FLIGHT = Gauge(f"{PREFIX}_requests_in_flight", "ModelInfer requests being handled.", multiprocess_mode="livesum")
QUEUE_IMAGES = Gauge(f"{PREFIX}_queue_images", "Images waiting in the batch queue.", MV, multiprocess_mode="livesum")
SHED = Counter(f"{PREFIX}_shed", "Requests refused or dropped before compute (queue_full, deadline).", (*MV, "reason"))
PROVIDER = Gauge(
    f"{PREFIX}_execution_provider_info", "1 for the execution provider really running each model version.",
    (*MV, "provider"), multiprocess_mode="livemax",
)  # fmt: skip
EXECUTION_NODES = Gauge(
    f"{PREFIX}_execution_nodes", "Graph nodes onnxruntime assigned to each execution provider, per input type.",
    (*MV, "input", "provider"), multiprocess_mode="livemax",
)  # fmt: skip
GPU_REQUIRED = Gauge(f"{PREFIX}_gpu_required", "1 when the server was told to require CUDA.", multiprocess_mode="max")
MODEL_LOAD = Gauge(
    f"{PREFIX}_model_load_seconds", "Time to load and warm up a model version.", MV, multiprocess_mode="max"
)
MODEL_LOAD_FAILURES = Counter(f"{PREFIX}_model_load_failures", "Model versions that failed to load.", ("model",))
OFFLINE_ACCURACY = Gauge(
    f"{PREFIX}_offline_accuracy", "Test accuracy recorded in metadata.json (measured on the ONNX model).", MV,
    multiprocess_mode="max",
)  # fmt: skip
ONLINE_ACCURACY = Gauge(
    f"{PREFIX}_online_accuracy", "Accuracy over the last accuracy_window labelled answers.", MV,
    multiprocess_mode="mostrecent",
)  # fmt: skip
FEEDBACK = Counter(
    f"{PREFIX}_feedback", "Labelled answers by outcome (correct, incorrect, unknown id).", (*MV, "outcome")
)
# livemin: with several workers the worst one shows (each worker runs its own canary on its own provider).
CANARY_ACCURACY = Gauge(
    f"{PREFIX}_canary_accuracy", "Accuracy of the live model on the golden set at the last canary run.", MV,
    multiprocess_mode="livemin",
)  # fmt: skip
CANARY_RUNS = Counter(f"{PREFIX}_canary_runs", "Canary evaluations by result (ok, error).", (*MV, "result"))
TRACE_SPANS = Counter(
    f"{PREFIX}_trace_spans", "Spans handed to the trace exporter, by outcome (exported, failed).", ("outcome",)
)
TRACE_SPANS_DROPPED = Counter(
    f"{PREFIX}_trace_spans_dropped",
    "Spans lost before export: queue_full (the exporter fell behind), export_failed (the receiver refused or was "
    "unreachable), already_shutdown.",
    ("reason",),
)
PREDICTIONS = Counter(f"{PREFIX}_predictions", "Predicted classes (drift signal, needs no labels).", (*MV, "class"))
CONFIDENCE = Histogram(f"{PREFIX}_confidence", "Top-class probability of each answer.", MV, buckets=CONFIDENCE_BUCKETS)


def start_metrics_server(port: int, host: str) -> None:
    """Serve /metrics (and nothing else) on `port`; multiprocess-aware (PROMETHEUS_MULTIPROC_DIR)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        start_http_server(port, addr=host, registry=registry)
    else:
        start_http_server(port, addr=host)
    log.info("metrics on http://%s:%d/metrics", host, port)
