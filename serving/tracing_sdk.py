"""The OpenTelemetry SDK as serving.tracing uses it: resource, sampler, exporter and a batch processor that
counts what it loses. Imported only when tracing is on."""

from __future__ import annotations

import logging

from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, TraceIdRatioBased

from serving import telemetry

log = logging.getLogger(__name__)


def build_provider(config, service_name: str, version: str) -> tuple[TracerProvider, BatchSpanProcessor]:
    """A TracerProvider (not the global one: nothing else in the process traces) and its batch processor. The
    resource, the batch processor's limits and the exporter's endpoint, headers and timeout come from the OTEL_*
    variables, read by the SDK itself."""
    resource = Resource.create({SERVICE_VERSION: version})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    # Not shut down at exit by the SDK (which may wait 30 s for a receiver that is away): serving.tracing closes it.
    provider = TracerProvider(resource=resource, sampler=_sampler(config), shutdown_on_exit=False)
    processor = CountingBatchSpanProcessor(CountingExporter(_exporter(config)))
    provider.add_span_processor(processor)
    return provider, processor


def _sampler(config):
    root = {
        "always_on": ALWAYS_ON,
        "always_off": ALWAYS_OFF,
        "traceidratio": TraceIdRatioBased(config.ratio if config.ratio is not None else 1.0),
    }[config.sampler.removeprefix("parentbased_")]
    return ParentBased(root) if config.parent_based else root


def _exporter(config) -> SpanExporter:
    if config.exporter == "console":
        return ConsoleSpanExporter()
    if config.protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter()


class CountingExporter(SpanExporter):
    """The exporter, counting the spans it sent and those it could not (receiver down, refused, timed out)."""

    def __init__(self, exporter: SpanExporter) -> None:
        self.exporter = exporter

    def export(self, spans) -> SpanExportResult:
        try:
            result = self.exporter.export(spans)
        except Exception:
            log.exception("trace export failed")
            result = SpanExportResult.FAILURE
        telemetry.trace_spans("exported" if result == SpanExportResult.SUCCESS else "failed", len(spans))
        return result

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)


class CountingBatchSpanProcessor(BatchSpanProcessor):
    """The SDK's batch processor (bounded queue, its own export thread), counting the spans it drops.

    NOTE: the SDK drops the oldest span when its queue is full and counts that only in its own metrics (which need
    an OpenTelemetry MeterProvider): this looks at the queue before handing a span over (opentelemetry-sdk 1.45's
    `BatchProcessor._queue`; tests/serving/test_tracing.py fails if that changes)."""

    def on_end(self, span: ReadableSpan) -> None:
        if span.context.trace_flags.sampled:
            batch = self._batch_processor
            if batch._shutdown:
                telemetry.trace_spans_dropped("already_shutdown")
            elif len(batch._queue) >= batch._max_queue_size:
                telemetry.trace_spans_dropped("queue_full")
        super().on_end(span)
