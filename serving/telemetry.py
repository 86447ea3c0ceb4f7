"""The one writer of telemetry: every Prometheus series (serving.metrics defines them) and the Triton statistics.

A model version's figures go through its `VersionTelemetry`: requests, runs, queue, drift signals (predicted
classes, confidence), labelled accuracy (counters and the sliding window), the canary, provider and placement,
and the cumulative statistics the ModelStatistics RPC returns (with their proto conversion here). The few
per-process figures (requests refused before they were read, requests in flight, feedback for receipts of no
loaded version, load failures, --require-gpu) are the module's functions. Nothing else writes a metric.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from serving import metrics
from serving.contract import NUM_CLASSES
from serving.protos import grpc_service_pb2 as pb

# ------------------------------------------------------------------ Triton statistics


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        """`count` more, lasting `seconds` in all."""
        self.count += count
        self.ns += int(seconds * 1e9)

    def proto(self) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=self.count, ns=self.ns)


@dataclass(slots=True)
class BatchStatistics:
    """One batch size's executions: joining the inputs, the onnxruntime run, splitting the output."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class Statistics:
    """Triton-style cumulative statistics (the ModelStatistics RPC) for one version in this process.

    Per successful request, as Triton counts them: `queue` (waiting for a run), `compute_input` (lookup and
    decoding the protobuf into an array), `compute_infer` (the onnxruntime run it was part of), `compute_output`
    (drift signals and encoding the response); `success` is the whole handler. The four counts are equal."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict[int, BatchStatistics] = field(default_factory=dict)

    def proto(self, name: str, version: str) -> pb.ModelStatistics:
        """The ModelStatistics message Triton's clients (perf_analyzer among them) read."""
        return pb.ModelStatistics(
            name=name,
            version=version,
            last_inference=self.last_inference_ms,
            inference_count=self.inference_count,
            execution_count=self.execution_count,
            inference_stats=pb.InferStatistics(
                success=self.success.proto(),
                fail=self.fail.proto(),
                queue=self.queue.proto(),
                compute_input=self.compute_input.proto(),
                compute_infer=self.compute_infer.proto(),
                compute_output=self.compute_output.proto(),
            ),
            batch_stats=[
                pb.InferBatchStatistics(
                    batch_size=size,
                    compute_input=b.compute_input.proto(),
                    compute_infer=b.compute_infer.proto(),
                    compute_output=b.compute_output.proto(),
                )
                for size, b in sorted(self.batches.items())
            ],
        )


class AccuracyWindow:
    """Fraction correct over the last `size` labelled answers."""

    def __init__(self, size: int) -> None:
        self._outcomes: deque[bool] = deque(maxlen=size)
        self._correct = 0

    def __len__(self) -> int:
        return len(self._outcomes)

    def record(self, correct: np.ndarray) -> None:
        outcomes = self._outcomes
        for ok in correct.tolist():
            if len(outcomes) == outcomes.maxlen:
                self._correct -= outcomes[0]
            outcomes.append(ok)
            self._correct += ok

    @property
    def accuracy(self) -> float:
        return self._correct / len(self._outcomes) if self._outcomes else math.nan


# ------------------------------------------------------------------ series helpers


def observe_many(histogram, values) -> None:
    """`histogram.observe(v)` for every v in `values`, at the cost of one (a batch's confidences, not a loop).

    prometheus_client has no bulk observe: this adds the values' bucket counts and sum to the child's own
    counters (what observe() does one value at a time)."""
    if len(values) < 8:  # numpy's set-up costs more than a few observe() calls
        for v in values:
            histogram.observe(float(v))
        return
    values = np.asarray(values, dtype=np.float64)  # what observe(float(v)) compares and adds
    bounds = histogram._upper_bounds
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    for i in np.flatnonzero(counts).tolist():
        histogram._buckets[i].inc(int(counts[i]))
    histogram._sum.inc(float(values.sum()))


def set_placement(model: str, version: str, provider: str, placement: dict[str, dict[str, list]]) -> None:
    """The provider running a version and how many of its nodes each provider runs, per input type."""
    metrics.PROVIDER.labels(model, version, provider).set(1)
    for input_type, providers in placement.items():
        for name, ops in providers.items():
            metrics.EXECUTION_NODES.labels(model, version, input_type, name).set(len(ops))


def forget_version(model: str, version: str, provider: str, placement: dict[str, dict[str, list]]) -> None:
    """Drop the per-version series of an unloaded model version (its gauges, its provider and placement)."""
    gauges = (metrics.OFFLINE_ACCURACY, metrics.MODEL_LOAD, metrics.QUEUE_IMAGES, metrics.ONLINE_ACCURACY,
              metrics.CANARY_ACCURACY)  # fmt: skip
    nodes = [(input_type, name) for input_type, providers in placement.items() for name in providers]
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # remove() cannot delete a series from the shared files (it only warns): blank the values instead,
        # so an unloaded version stops reporting its last accuracy and its provider.
        for metric in gauges:
            metric.labels(model, version).set(0 if metric is metrics.QUEUE_IMAGES else math.nan)
        metrics.PROVIDER.labels(model, version, provider).set(0)
        for input_type, name in nodes:
            metrics.EXECUTION_NODES.labels(model, version, input_type, name).set(0)
        return
    for metric in gauges:
        try:
            metric.remove(model, version)
        except KeyError:
            pass
    metrics.PROVIDER.remove(model, version, provider)
    for input_type, name in nodes:
        metrics.EXECUTION_NODES.remove(model, version, input_type, name)


# ------------------------------------------------------------------ one model version


class VersionTelemetry:
    """All figures of one loaded model version; the batcher's observer (on_batch, on_answers, on_shed,
    on_queue_depth)."""

    def __init__(self, name: str, version: str, accuracy_window: int) -> None:
        self.name, self.version = name, version
        self.stats = Statistics()
        self.window = AccuracyWindow(accuracy_window)
        labels = (name, version)
        self._request_duration = metrics.REQUEST_DURATION.labels(*labels)
        self._queue_duration = metrics.QUEUE_DURATION.labels(*labels)
        self._compute_duration = metrics.COMPUTE_DURATION.labels(*labels)
        self._batch_size = metrics.BATCH_SIZE.labels(*labels)
        self._images = metrics.IMAGES.labels(*labels)
        self._queue_images = metrics.QUEUE_IMAGES.labels(*labels)
        self._confidence = metrics.CONFIDENCE.labels(*labels)
        self._online = metrics.ONLINE_ACCURACY.labels(*labels)
        self._ok = metrics.REQUESTS.labels(*labels, "OK")
        self._predicted = [metrics.PREDICTIONS.labels(*labels, str(c)) for c in range(NUM_CLASSES)]
        self._correct = metrics.FEEDBACK.labels(*labels, "correct")
        self._incorrect = metrics.FEEDBACK.labels(*labels, "incorrect")
        self._provider = ""
        self._placement: dict[str, dict[str, list]] = {}

    def loaded(self, provider: str, placement: dict, load_seconds: float, metadata: dict) -> None:
        """The version serves: where it runs, how long it took to load, the accuracy its export recorded."""
        self._provider, self._placement = provider, placement
        self._online.set(self.window.accuracy)  # NaN before any labelled answer: 0 would read as 0% accurate
        set_placement(self.name, self.version, provider, placement)
        metrics.MODEL_LOAD.labels(self.name, self.version).set(load_seconds)
        if "test_accuracy" in metadata:
            metrics.OFFLINE_ACCURACY.labels(self.name, self.version).set(float(metadata["test_accuracy"]))

    def forget(self) -> None:
        """The version is unloaded: its gauges, provider and placement series go."""
        forget_version(self.name, self.version, self._provider, self._placement)

    # The batcher's observer: called on the event loop once per run.
    def on_batch(self, images: int, requests: int, seconds: float, input_s: float, output_s: float) -> None:
        """One run's statistics."""
        self._compute_duration.observe(seconds)
        self._batch_size.observe(images)
        self.stats.execution_count += 1
        batch = self.stats.batches.get(images)
        if batch is None:
            batch = self.stats.batches[images] = BatchStatistics()
        batch.compute_input.add(input_s)
        batch.compute_infer.add(seconds)
        batch.compute_output.add(output_s)

    def on_answers(self, probs: np.ndarray, classes: np.ndarray, waits: list[float], seconds: float) -> None:
        """The client answers of one run, all at once: images, queue times and drift signals (the rest of each
        request's figures when it is answered: record_success)."""
        images = classes.size
        self._images.inc(images)
        observe_many(self._queue_duration, waits)
        if images == 1:
            c = int(classes[0])
            self._predicted[c].inc()
            self._confidence.observe(float(probs[0, c]))
        else:
            for c, count in enumerate(np.bincount(classes, minlength=NUM_CLASSES).tolist()):
                if count:
                    self._predicted[c].inc(count)
            observe_many(self._confidence, probs.max(axis=1))

    def on_shed(self, reason: str, count: int = 1) -> None:
        metrics.SHED.labels(self.name, self.version, reason).inc(count)

    def on_queue_depth(self, images: int) -> None:
        self._queue_images.set(images)

    # Per request, from the data plane.
    def record_success(
        self, seconds: float, images: int, *, queue_s: float, input_s: float, infer_s: float, output_s: float
    ) -> None:
        """One answered request: its latency, and the Triton statistics of its phases (queue, input = decoding,
        infer = its run, output = receipt and encoding), updated together: perf_analyzer refuses statistics whose
        counts differ, and reads them while requests are in flight."""
        self._request_duration.observe(seconds)
        self._ok.inc()
        s = self.stats
        s.success.add(seconds)
        s.queue.add(queue_s)
        s.compute_input.add(input_s)
        s.compute_infer.add(infer_s)
        s.compute_output.add(output_s)
        s.inference_count += images
        s.last_inference_ms = int(time.time() * 1000)

    def record_failure(self, code: str, seconds: float) -> None:
        self._request_duration.observe(seconds)
        metrics.REQUESTS.labels(self.name, self.version, code).inc()
        self.stats.fail.add(seconds)

    def score(self, correct: np.ndarray) -> None:
        """Count labelled answers (True: the prediction was right) and update the window."""
        right = int(correct.sum())
        self._correct.inc(right)
        self._incorrect.inc(correct.size - right)
        self.window.record(correct)
        self._online.set(self.window.accuracy)

    def canary(self, score: float | None) -> None:
        """A canary run's golden-set accuracy, or None when the run failed."""
        if score is None:
            metrics.CANARY_RUNS.labels(self.name, self.version, "error").inc()
            return
        metrics.CANARY_ACCURACY.labels(self.name, self.version).set(score)
        metrics.CANARY_RUNS.labels(self.name, self.version, "ok").inc()


# ------------------------------------------------------------------ the process


def refused_unread() -> None:
    """A ModelInfer refused for memory before it was read: its model is unknown, so no model or version."""
    metrics.SHED.labels("", "", "inflight_bytes").inc()
    metrics.REQUESTS.labels("", "", "RESOURCE_EXHAUSTED").inc()


# Requests being handled (bound methods: called twice per request).
request_started = metrics.IN_FLIGHT.inc
request_ended = metrics.IN_FLIGHT.dec


def feedback(model: str, version: str, outcome: str, labels: int) -> None:
    """Labels counted outside a loaded version's telemetry: receipts that did not verify, duplicates, and late
    labels for a version unloaded since it answered."""
    metrics.FEEDBACK.labels(model, version, outcome).inc(labels)


def load_failed(model: str) -> None:
    metrics.MODEL_LOAD_FAILURES.labels(model).inc()


def gpu_required(required: bool) -> None:
    metrics.GPU_REQUIRED.set(1 if required else 0)


def trace_spans(outcome: str, count: int) -> None:
    """Spans the exporter sent (`exported`) or lost (`failed`, also counted as dropped)."""
    metrics.TRACE_SPANS.labels(outcome).inc(count)
    if outcome == "failed":
        metrics.TRACE_SPANS_DROPPED.labels("export_failed").inc(count)


def trace_spans_dropped(reason: str, count: int = 1) -> None:
    metrics.TRACE_SPANS_DROPPED.labels(reason).inc(count)
