"""Distributed tracing with OpenTelemetry: a span per inference request, continuing the caller's W3C trace, and a
span per onnxruntime run, linked to the request spans it served.

Off unless `OTEL_TRACES_EXPORTER` is `otlp` (or `console`), and then configured by the standard `OTEL_*` variables
alone, the SDK's defaults where one is unset (docs/observability.md). Off, nothing of OpenTelemetry is imported and
the request path pays one `is None` test per request.

Spans: `inference.GRPCInferenceService/ModelInfer` (and `/ModelStreamInfer`, one per message: a stream's messages
belong to different traces), kind SERVER, a child of the caller's `traceparent` (gRPC metadata, or a message's
`traceparent` request parameter), with the gRPC semantic conventions' attributes, the model's, and Triton's
timestamps as events (REQUEST_READ, QUEUE_START, COMPUTE_START, COMPUTE_END, RESUMED: the handler back on the event
loop with its answer, RESPONSE_ENCODED); and `onnxruntime run`,
a child of the first traced request of its run, linked to every traced request it served (and they to it).
Exported by the SDK's batch span processor on its own thread; spans it could not queue or export are counted in
`mnist_serving_trace_spans_dropped_total`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import grpc

from serving import __version__
from serving.errors import StartupError, status_of

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
# The W3C headers (and baggage) read from gRPC metadata; a stream's message may carry its own `traceparent`.
PROPAGATED = ("traceparent", "tracestate", "baggage")
TRACEPARENT_PARAMETER = "traceparent"
DEFAULT_SERVICE_NAME = "mnist-serving"
EXPORTERS = ("otlp", "console")
PROTOCOLS = ("grpc", "http/protobuf")
SAMPLERS = (
    "always_on", "always_off", "traceidratio",
    "parentbased_always_on", "parentbased_always_off", "parentbased_traceidratio",
)  # fmt: skip
# gRPC's semantic conventions: these codes mark a server span as an error (the others are the caller's doing).
_SERVER_ERRORS = {
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
}  # fmt: skip
# time.perf_counter() (what the request path measures) to the epoch nanoseconds spans carry.
_EPOCH_NS = time.time_ns() - time.perf_counter_ns()


def epoch_ns(perf_counter_s: float) -> int:
    return _EPOCH_NS + int(perf_counter_s * 1e9)


@dataclass(frozen=True)
class TracingConfig:
    """What the OTEL_* variables ask for (validated): None from `read` means tracing is off."""

    exporter: str
    protocol: str
    sampler: str
    ratio: float | None

    @classmethod
    def read(cls, environ: Mapping[str, str] = os.environ) -> TracingConfig | None:
        """The configuration, None when tracing is off; StartupError naming the variable for a bad value."""
        exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
        if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or exporter in ("", "none"):
            return None
        if exporter not in EXPORTERS:
            raise StartupError(f"OTEL_TRACES_EXPORTER={exporter!r}: this server exports to {' or '.join(EXPORTERS)}")
        protocol = (
            environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
        ).strip()
        if protocol not in PROTOCOLS:
            raise StartupError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: use {' or '.join(PROTOCOLS)}")
        sampler = environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
        if sampler not in SAMPLERS:
            raise StartupError(f"OTEL_TRACES_SAMPLER={sampler!r}: use one of {', '.join(SAMPLERS)}")
        ratio = None
        if sampler.endswith("traceidratio"):
            text = environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0")
            try:
                ratio = float(text)
            except ValueError:
                ratio = -1.0
            if not 0.0 <= ratio <= 1.0:
                raise StartupError(f"OTEL_TRACES_SAMPLER_ARG={text!r}: a sampling ratio between 0 and 1")
        for name in ("OTEL_BSP_SCHEDULE_DELAY", "OTEL_BSP_MAX_QUEUE_SIZE", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
                     "OTEL_BSP_EXPORT_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"):  # fmt: skip
            if name in environ and not _positive_int(environ[name]):
                raise StartupError(f"{name}={environ[name]!r}: a positive whole number")
        return cls(exporter, protocol, sampler, ratio)

    @property
    def parent_based(self) -> bool:
        return self.sampler.startswith("parentbased_")


def _positive_int(text: str) -> bool:
    try:
        return int(text) > 0
    except ValueError:
        return False


def from_environment(environ: Mapping[str, str] = os.environ) -> Tracing | None:
    """The process's tracing, or None when the variables leave it off."""
    config = TracingConfig.read(environ)
    if config is None:
        return None
    from serving.tracing_sdk import build_provider

    try:
        provider, processor = build_provider(config, DEFAULT_SERVICE_NAME, __version__)
    except ValueError as exc:  # the SDK's own checks, e.g. OTEL_BSP_MAX_EXPORT_BATCH_SIZE > OTEL_BSP_MAX_QUEUE_SIZE
        raise StartupError(f"tracing: {exc}") from exc
    return Tracing(config, provider, processor)


class Tracing:
    """Starts and ends the request and run spans; the only code that touches the OpenTelemetry API."""

    def __init__(self, config: TracingConfig, provider, processor) -> None:
        from opentelemetry import context, propagate, trace

        self.config = config
        self.provider = provider
        self.processor = processor
        self.tracer = provider.get_tracer("serving", __version__)
        self._context, self._propagate, self._trace = context, propagate, trace
        self._server = trace.SpanKind.SERVER
        self._links = trace.Link
        log.info(
            "tracing on: %s exporter (%s), sampler %s%s", config.exporter, config.protocol, config.sampler,
            "" if config.ratio is None else f" {config.ratio}",
        )  # fmt: skip

    # ---------------------------------------------------------------- request spans

    def request(self, method: str, metadata, traceparent: str = "") -> RequestSpan:
        """The span of one request (a context manager: the span is current, and log lines carry its trace id,
        until it ends). `metadata`: the call's gRPC metadata; `traceparent`: a stream message's own."""
        carrier = {k: v for k, v in metadata or () if k in PROPAGATED}
        if traceparent:
            carrier["traceparent"] = traceparent
            carrier.pop("tracestate", None)  # the stream's tracestate belongs to the stream's trace
        if self.config.parent_based and _unsampled(carrier.get("traceparent", "")):
            return NOT_TRACED  # the caller decided: no span, no cost
        parent = self._propagate.extract(carrier)
        span = self.tracer.start_span(
            f"{SERVICE}/{method}",
            parent,
            kind=self._server,
            attributes={"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method},
        )
        if not span.is_recording():
            return NOT_TRACED
        return RequestSpan(self, span, self._context.attach(self._trace.set_span_in_context(span, parent)))

    def request_done(self, span, request, version: str, images: int, datatype: str, times: dict[str, float]) -> None:
        """What the data plane learnt of a request it answered: model, version, id, images and the timestamps."""
        span.set_attributes({
            "inference.model.name": request.model_name, "inference.model.version": version,
            "inference.request.id": request.id, "inference.request.images": images,
            "inference.request.datatype": datatype,
        })  # fmt: skip
        for name, at in times.items():
            span.add_event(name, timestamp=epoch_ns(at))

    def failed(self, span, code: grpc.StatusCode, message: str, version=None) -> None:
        """A request that failed with `code` (`version`: the ModelVersion it was for, once known)."""
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if version is not None:
            span.set_attributes({"inference.model.name": version.name, "inference.model.version": version.version})
        if code in _SERVER_ERRORS:
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, f"{code.name}: {message}"))

    # ---------------------------------------------------------------- run spans

    def run_span(self, run, spans: list, model: str, version: str, provider: str):
        """The span of one onnxruntime run (`run`: the batcher's RunInfo) that served the traced request `spans`:
        a child of the first one, linked to all of them, and each of them linked back to it."""
        parent = self._trace.set_span_in_context(spans[0])
        run_span = self.tracer.start_span(
            "onnxruntime run",
            parent,
            links=[self._links(s.get_span_context()) for s in spans],
            start_time=epoch_ns(run.started),
            attributes={
                "inference.model.name": model, "inference.model.version": version,
                "inference.run.images": run.images, "inference.run.requests": run.requests,
                "inference.run.traced_requests": len(spans), "inference.run.provider": provider,
                "thread.name": run.thread,
            },
        )  # fmt: skip
        run_span.add_event("COMPUTE_INPUT_END", timestamp=epoch_ns(run.joined))
        run_span.end(end_time=epoch_ns(run.ended))
        link = run_span.get_span_context()
        for s in spans:
            s.add_link(link, {"inference.link": "run"})
        return run_span

    # ---------------------------------------------------------------- process

    async def close(self, timeout_s: float) -> bool:
        """Export what is queued and stop the exporter (the drain's last step), for at most `timeout_s`: False if
        that did not finish in time (what is left is dropped).

        NOTE: on a daemon thread, not the loop's executor: an exporter whose receiver is away blocks (retrying up
        to OTEL_EXPORTER_OTLP_TIMEOUT), and the interpreter waits for executor threads at exit (as it would for the
        SDK's own at-exit shutdown, which build_provider turns off)."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def close() -> None:
            try:
                self.provider.force_flush(int(timeout_s * 1000))
                self.provider.shutdown()
            finally:
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(True))

        threading.Thread(target=close, name="trace-flush", daemon=True).start()
        try:
            return await asyncio.wait_for(done, timeout_s)
        except TimeoutError:
            return False

    def shutdown(self) -> None:
        self.provider.shutdown()


class RequestSpan:
    """A request span, current while the request is handled; ends with its status code."""

    __slots__ = ("tracing", "span", "token", "context")

    def __init__(self, tracing: Tracing | None, span, token) -> None:
        self.tracing, self.span, self.token = tracing, span, token
        self.context = None  # the call's grpc context, for the status of an aborted call

    def __enter__(self) -> RequestSpan:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if self.span is None:
            return
        try:
            if exc is None:
                self.span.set_attribute("rpc.grpc.status_code", 0)
            elif "rpc.grpc.status_code" not in self.span.attributes:  # the data plane did not say already
                code, message = self._status(exc)
                self.tracing.failed(self.span, code, message)
        finally:
            self.tracing._context.detach(self.token)
            self.span.end()

    def _status(self, exc: BaseException) -> tuple[grpc.StatusCode, str]:
        if isinstance(exc, grpc.aio.AbortError) and self.context is not None:
            return self.context.code() or grpc.StatusCode.UNKNOWN, self.context.details() or ""
        return status_of(exc)


NOT_TRACED = RequestSpan(None, None, None)


def _unsampled(traceparent: str) -> bool:
    """A well-formed W3C traceparent whose sampled flag is off."""
    return len(traceparent) == 55 and traceparent[2] == "-" and not int(traceparent[53:55], 16) & 1


class ClientTrace:
    """The client's side of a trace (`python -m serving.client --trace`, or the OTEL_* variables): one span for
    the command, whose W3C `traceparent` every call sends, so the server's spans join the caller's trace. With an
    exporter configured the command's span is exported too (service `mnist-serving-client`); without one, only
    the ids exist, and the trace id is printed to find the server's spans by."""

    def __init__(self, name: str, environ: Mapping[str, str] = os.environ) -> None:
        config = TracingConfig.read(environ)
        self.provider = self.span = None
        if config is None:  # ids only: a sampled caller span that is never exported
            import secrets

            self.trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
            self.traceparent = f"00-{self.trace_id}-{span_id}-01"
            return
        from opentelemetry import propagate, trace

        from serving.tracing_sdk import build_provider

        self.provider, _ = build_provider(config, "mnist-serving-client", __version__)
        self.span = self.provider.get_tracer("serving.client").start_span(name, kind=trace.SpanKind.CLIENT)
        carrier: dict[str, str] = {}
        propagate.inject(carrier, trace.set_span_in_context(self.span))
        self.traceparent = carrier.get("traceparent", "")
        self.trace_id = f"{self.span.get_span_context().trace_id:032x}"

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("traceparent", self.traceparent),) if self.traceparent else ()

    def end(self) -> None:
        """End the command's span and export it (and whatever else is queued)."""
        if self.provider is not None:
            self.span.end()
            self.provider.shutdown()


class TraceIdFormatter(logging.Formatter):
    """Appends `trace_id=... span_id=...` to a line written while a traced request is handled."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        from opentelemetry import trace

        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            line += f" trace_id={ctx.trace_id:032x} span_id={ctx.span_id:016x}"
        return line


def log_trace_ids() -> None:
    """Give every handler of the root logger the trace-id formatter (its format kept)."""
    for handler in logging.getLogger().handlers:
        fmt = handler.formatter._fmt if handler.formatter else None
        handler.setFormatter(TraceIdFormatter(fmt))
