"""A minimal OTLP trace receiver (the collector's TraceService over gRPC), for tests, the benchmark and the trace
picture: no collector binary needed.

    python -m bench.otlp_receiver --port 4317 --out spans.jsonl

Every exported span becomes one JSON line (ids in hex, times in epoch nanoseconds, attributes as plain values).
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from concurrent import futures
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


def _value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def _attributes(kvs) -> dict:
    return {kv.key: _value(kv.value) for kv in kvs}


def span_dict(span, resource: dict) -> dict:
    """One OTLP span as plain data."""
    return {
        "trace_id": span.trace_id.hex(),
        "span_id": span.span_id.hex(),
        "parent_span_id": span.parent_span_id.hex(),
        "name": span.name,
        "kind": KINDS.get(span.kind, str(span.kind)),
        "start_ns": span.start_time_unix_nano,
        "end_ns": span.end_time_unix_nano,
        "attributes": _attributes(span.attributes),
        "events": [{"name": e.name, "time_ns": e.time_unix_nano, **_attributes(e.attributes)} for e in span.events],
        "links": [
            {"trace_id": link.trace_id.hex(), "span_id": link.span_id.hex(), "attributes": _attributes(link.attributes)}
            for link in span.links
        ],
        "status": {"code": span.status.code, "message": span.status.message},
        "service": resource.get("service.name", ""),
    }


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span it is sent (and appends it to `out`, when given); with `keep=False` only counts them."""

    def __init__(self, out: Path | None = None, keep: bool = True) -> None:
        self.spans: list[dict] = []
        self.keep = keep
        self.count = 0
        self.exports = 0
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)
        self.out = out.open("a") if out else None

    def Export(self, request, context):
        if not self.keep:
            with self.lock:
                self.count += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
                self.exports += 1
            return trace_service_pb2.ExportTraceServiceResponse()
        got = [
            span_dict(span, _attributes(rs.resource.attributes))
            for rs in request.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        ]
        with self.lock:
            self.spans.extend(got)
            self.count += len(got)
            self.exports += 1
            if self.out:
                self.out.write("".join(json.dumps(s) + "\n" for s in got))
                self.out.flush()
            self.arrived.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for(self, predicate, timeout: float) -> list[dict]:
        """The spans once `predicate(spans)` holds (or after `timeout` seconds, whatever arrived)."""
        with self.arrived:
            self.arrived.wait_for(lambda: predicate(self.spans), timeout)
            return list(self.spans)


def start(
    port: int = 0, out: Path | None = None, host: str = "127.0.0.1", keep: bool = True
) -> tuple[grpc.Server, Receiver, int]:
    """A receiver on `host:port` (0: a free port): (server, receiver, port)."""
    receiver = Receiver(out, keep)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port(f"{host}:{port}")
    server.start()
    return server, receiver, port


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.otlp_receiver", description=__doc__)
    p.add_argument("--port", type=int, default=4317)
    p.add_argument("--out", type=Path, default=None, help="append each span as a JSON line here")
    p.add_argument("--count-only", action="store_true", help="keep nothing, count the spans (for load tests)")
    a = p.parse_args(argv)
    server, receiver, port = start(a.port, a.out, keep=not a.count_only)
    print(f"OTLP trace receiver on 127.0.0.1:{port}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop(1)
    print(f"received {receiver.count} spans in {receiver.exports} exports", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
