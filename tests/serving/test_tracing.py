"""Tracing: the real server exporting over OTLP to a real receiver (the collector's TraceService, run here), called
by tritonclient with W3C `traceparent`s; the configuration's checks and the log formatter in-process."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca
from metrics_helpers import scrape
from server_process import start_server

from bench import otlp_receiver
from serving.errors import StartupError
from serving.tracing import TracingConfig

REQUEST = "inference.GRPCInferenceService/ModelInfer"
STREAM = "inference.GRPCInferenceService/ModelStreamInfer"
RUN = "onnxruntime run"
EVENTS = ["REQUEST_READ", "QUEUE_START", "COMPUTE_START", "COMPUTE_END", "RESUMED", "RESPONSE_ENCODED"]


def traceparent(sampled: bool = True) -> tuple[str, str, str]:
    """A new caller span: (traceparent, trace id, span id)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}", trace_id, span_id


def infer_input(images: np.ndarray) -> tc.InferInput:
    x = images.reshape(len(images), 784).astype(np.uint8)
    inp = tc.InferInput("input", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x)
    return inp


def of_trace(spans: list[dict], trace_id: str) -> list[dict]:
    return [s for s in spans if s["trace_id"] == trace_id]


def tracing_env(port: int, **extra: str) -> dict:
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_SERVICE_NAME": "mnist-test",
        **extra,
    }


@pytest.fixture(scope="module")
def receiver():
    server, receiver, port = otlp_receiver.start()
    receiver.port = port
    yield receiver
    server.stop(0)


@pytest.fixture(scope="module")
def traced(trained_repository, tmp_path_factory, receiver):
    server = start_server(trained_repository, tmp_path_factory.mktemp("traced"), env=tracing_env(receiver.port))
    yield server
    server.stop()


# ---------------------------------------------------------------- over the wire


def test_a_traced_call_continues_the_callers_trace_with_a_linked_run_span(traced, receiver, mnist_data):
    tp, trace_id, caller = traceparent()
    client = tc.InferenceServerClient(traced.url)
    client.infer("mnist", [infer_input(mnist_data.x_test[:3])], headers={"traceparent": tp}, request_id="r-1")
    spans = receiver.wait_for(lambda s: len(of_trace(s, trace_id)) >= 2, 10)
    request = next(s for s in of_trace(spans, trace_id) if s["name"] == REQUEST)
    run = next(s for s in of_trace(spans, trace_id) if s["name"] == RUN)
    assert request["parent_span_id"] == caller and request["kind"] == "SERVER"
    assert request["service"] == "mnist-test"
    assert request["attributes"] == {
        "rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService", "rpc.method": "ModelInfer",
        "rpc.grpc.status_code": 0, "inference.model.name": "mnist", "inference.model.version": "1",
        "inference.request.id": "r-1", "inference.request.images": 3, "inference.request.datatype": "UINT8",
    }  # fmt: skip
    times = {e["name"]: e["time_ns"] for e in request["events"]}
    assert [e["name"] for e in request["events"]] == EVENTS
    assert request["start_ns"] <= times["REQUEST_READ"] <= times["QUEUE_START"] <= times["COMPUTE_START"]
    assert times["COMPUTE_START"] <= times["COMPUTE_END"] <= times["RESUMED"] <= times["RESPONSE_ENCODED"]
    assert times["RESPONSE_ENCODED"] <= request["end_ns"]
    # The run: a child of the request, linked to it (and it to the run), within its compute timestamps.
    assert run["parent_span_id"] == request["span_id"] and run["kind"] == "INTERNAL"
    assert {(lk["trace_id"], lk["span_id"]) for lk in run["links"]} == {(trace_id, request["span_id"])}
    assert [(lk["span_id"], lk["attributes"]) for lk in request["links"]] == [
        (run["span_id"], {"inference.link": "run"})
    ]
    assert run["end_ns"] == times["COMPUTE_END"]
    assert run["attributes"]["inference.run.images"] >= 3
    assert run["attributes"]["inference.run.provider"].endswith("ExecutionProvider")
    assert run["attributes"]["thread.name"]


async def test_calls_batched_together_share_one_run_span_linked_to_each(traced, receiver, mnist_data):
    callers = [traceparent() for _ in range(48)]
    async with tca.InferenceServerClient(traced.url) as client:
        await asyncio.gather(*(
            client.infer("mnist", [infer_input(mnist_data.x_test[i : i + 1])], headers={"traceparent": tp})
            for i, (tp, _, _) in enumerate(callers)
        ))  # fmt: skip
    ids = {trace_id for _, trace_id, _ in callers}
    spans = receiver.wait_for(lambda s: sum(x["name"] == REQUEST and x["trace_id"] in ids for x in s) == 48, 10)
    requests = {x["span_id"]: x for x in spans if x["name"] == REQUEST and x["trace_id"] in ids}
    assert len(requests) == 48
    runs = {x["span_id"]: x for x in spans if x["name"] == RUN and x["trace_id"] in ids}
    for run in runs.values():
        linked = {lk["span_id"] for lk in run["links"]}
        assert linked <= set(requests) and run["parent_span_id"] in linked
        assert run["attributes"]["inference.run.traced_requests"] == len(linked)
        assert run["attributes"]["inference.run.requests"] >= len(linked)
        for span_id in linked:  # and each request points back at the run that served it
            assert [lk["span_id"] for lk in requests[span_id]["links"]] == [run["span_id"]]
    # Every request was served by exactly one run; 48 concurrent calls do not run one by one.
    assert sorted(sid for r in runs.values() for sid in (lk["span_id"] for lk in r["links"])) == sorted(requests)
    shared = [r for r in runs.values() if len(r["links"]) > 1]
    assert shared, "no run served two of 48 concurrent calls"
    assert any(len({lk["trace_id"] for lk in r["links"]}) > 1 for r in shared), "a shared run spans traces"


def test_unsampled_callers_produce_no_spans_and_errors_carry_their_status(traced, receiver, mnist_data):
    client = tc.InferenceServerClient(traced.url)
    quiet = [traceparent(sampled=False) for _ in range(5)]
    for tp, _, _ in quiet:
        client.infer("mnist", [infer_input(mnist_data.x_test[:1])], headers={"traceparent": tp})
    missing, missing_id, _ = traceparent()
    with pytest.raises(tc.InferenceServerException, match="NOT_FOUND"):
        client.infer("nope", [infer_input(mnist_data.x_test[:1])], headers={"traceparent": missing})
    bad, bad_id, _ = traceparent()
    wrong = tc.InferInput("input", [1, 3], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3), np.float32))
    with pytest.raises(tc.InferenceServerException, match="INVALID_ARGUMENT"):
        client.infer("mnist", [wrong], headers={"traceparent": bad})
    spans = receiver.wait_for(lambda s: of_trace(s, missing_id) and of_trace(s, bad_id), 10)
    (not_found,) = of_trace(spans, missing_id)
    assert not_found["attributes"]["rpc.grpc.status_code"] == 5  # NOT_FOUND: the caller's error, status unset
    assert not_found["status"]["code"] == 0
    (invalid,) = of_trace(spans, bad_id)
    assert invalid["attributes"]["rpc.grpc.status_code"] == 3
    assert invalid["attributes"]["inference.model.name"] == "mnist"
    assert invalid["attributes"]["inference.model.version"] == "1"
    assert not any(of_trace(spans, trace_id) for _, trace_id, _ in quiet)
    # Health, metadata and statistics calls are not traced.
    client.is_server_ready(headers={"traceparent": traceparent()[0]})
    client.get_model_metadata("mnist", headers={"traceparent": (meta := traceparent())[0]})
    assert not of_trace(receiver.wait_for(lambda s: False, 0.5), meta[1])


def test_a_stream_is_traced_per_message(traced, receiver, mnist_data):
    stream_tp, stream_trace, stream_caller = traceparent()
    own = [traceparent() for _ in range(2)]
    done: list = []
    client = tc.InferenceServerClient(traced.url)
    client.start_stream(callback=lambda result, error: done.append(error), headers={"traceparent": stream_tp})
    for i, (tp, _, _) in enumerate(own):
        client.async_stream_infer(
            "mnist", [infer_input(mnist_data.x_test[i : i + 1])], request_id=f"m{i}", parameters={"traceparent": tp}
        )
    client.async_stream_infer("mnist", [infer_input(mnist_data.x_test[5:6])], request_id="stream")
    client.stop_stream()
    assert done == [None, None, None]
    wanted = [trace_id for _, trace_id, _ in own] + [stream_trace]
    spans = receiver.wait_for(lambda s: all(any(x["name"] == STREAM for x in of_trace(s, t)) for t in wanted), 10)
    for (_, trace_id, caller), request_id in zip(own, ("m0", "m1"), strict=True):
        (span,) = [x for x in of_trace(spans, trace_id) if x["name"] == STREAM]
        assert span["parent_span_id"] == caller and span["attributes"]["inference.request.id"] == request_id
        assert span["attributes"]["rpc.method"] == "ModelStreamInfer"
    (span,) = [x for x in of_trace(spans, stream_trace) if x["name"] == STREAM]
    assert span["parent_span_id"] == stream_caller and span["attributes"]["inference.request.id"] == "stream"


def test_the_client_joins_the_trace(traced, receiver, tmp_path):
    import subprocess
    import sys

    from bench.common import REPO_ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(tracing_env(receiver.port))
    env.pop("OTEL_SERVICE_NAME")
    done = subprocess.run(
        [sys.executable, "-m", "serving.client", "--url", traced.url, "evaluate", "--limit", "512",
         "--data-dir", str(REPO_ROOT / "data")],
        env=env, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    trace_id = done.stderr.strip().rsplit("trace id: ", 1)[1]
    spans = receiver.wait_for(lambda s: sum(x["name"] == REQUEST for x in of_trace(s, trace_id)) == 2, 10)
    (client,) = [x for x in of_trace(spans, trace_id) if x["kind"] == "CLIENT"]
    assert client["service"] == "mnist-serving-client" and client["name"] == "serving.client evaluate"
    requests = [x for x in of_trace(spans, trace_id) if x["name"] == REQUEST]
    assert {x["parent_span_id"] for x in requests} == {client["span_id"]}
    assert {x["attributes"]["inference.request.id"] for x in requests} == {"0", "256"}


def test_exported_spans_are_counted(traced, receiver, mnist_data):
    tp, trace_id, _ = traceparent()
    tc.InferenceServerClient(traced.url).infer(
        "mnist", [infer_input(mnist_data.x_test[:1])], headers={"traceparent": tp}
    )
    receiver.wait_for(lambda s: of_trace(s, trace_id), 10)
    snap = scrape(traced)
    assert snap.get("mnist_serving_trace_spans_total", outcome="exported") >= 2
    assert snap.get("mnist_serving_trace_spans_dropped_total", reason="queue_full") == 0


def test_drain_exports_the_last_calls_spans_before_exit(trained_repository, tmp_path, receiver, mnist_data):
    # Nothing is exported by the timer (a minute): only the drain's flush can deliver these spans.
    env = tracing_env(receiver.port, OTEL_BSP_SCHEDULE_DELAY="60000")
    server = start_server(trained_repository, tmp_path, env=env)
    client = tc.InferenceServerClient(server.url)
    callers = [traceparent() for _ in range(5)]
    for tp, _, _ in callers:
        client.infer("mnist", [infer_input(mnist_data.x_test[:1])], headers={"traceparent": tp})
    assert server.stop(signal.SIGTERM) == 0
    spans = receiver.wait_for(lambda s: False, 0)  # the process has exited: what arrived, arrived
    for _, trace_id, _ in callers:
        assert {x["name"] for x in of_trace(spans, trace_id)} == {REQUEST, RUN}, server.log()[-2000:]


def test_a_receiver_that_is_away_costs_no_answers_and_its_spans_are_counted(trained_repository, tmp_path, mnist_data):
    from bench.common import free_port

    env = tracing_env(
        free_port(), OTEL_BSP_MAX_QUEUE_SIZE="16", OTEL_BSP_MAX_EXPORT_BATCH_SIZE="8", OTEL_EXPORTER_OTLP_TIMEOUT="1"
    )  # nothing listens on that port
    server = start_server(trained_repository, tmp_path, env=env)
    try:
        client = tc.InferenceServerClient(server.url)
        for _ in range(200):
            tp = traceparent()[0]
            result = client.infer("mnist", [infer_input(mnist_data.x_test[:1])], headers={"traceparent": tp})
            assert result.as_numpy("probabilities").shape == (1, 10)
        snap = scrape(server)
        assert snap.get("mnist_serving_trace_spans_dropped_total", reason="queue_full") > 0
    finally:
        server.stop()
    assert "start-up failed" not in server.log()


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "start-up failed: OTEL_TRACES_SAMPLER='sometimes'"),
        # The SDK's own check (a batch larger than the queue), as the same one line, not a traceback.
        ({"OTEL_BSP_MAX_QUEUE_SIZE": "16"}, "start-up failed: tracing: max_export_batch_size must be less"),
    ],
)
def test_a_bad_tracing_variable_stops_the_start_naming_it(trained_repository, tmp_path, env, line):
    server = start_server(trained_repository, tmp_path, env={"OTEL_TRACES_EXPORTER": "otlp", **env}, wait=False)
    assert server.proc.wait(30) == 1
    assert line in server.log()
    assert "Traceback" not in server.log()


# ---------------------------------------------------------------- in process


@pytest.mark.parametrize(
    "env",
    [{}, {"OTEL_TRACES_EXPORTER": "none"}, {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"},
     {"OTEL_TRACES_SAMPLER": "nonsense"}],  # off: the other variables are not read
)  # fmt: skip
def test_tracing_is_off_unless_an_exporter_is_named(env):
    assert TracingConfig.read(env) is None


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"OTEL_TRACES_EXPORTER": "jaeger"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"}, "OTEL_TRACES_SAMPLER_ARG"),
        (
            {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "x"},
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        ({"OTEL_BSP_MAX_QUEUE_SIZE": "-1"}, "OTEL_BSP_MAX_QUEUE_SIZE"),
    ],
)
def test_a_bad_value_is_refused_naming_the_variable(env, named):
    with pytest.raises(StartupError, match=named):
        TracingConfig.read({"OTEL_TRACES_EXPORTER": "otlp", **env})


def test_the_configuration_read_from_the_standard_variables():
    config = TracingConfig.read({
        "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01",
    })  # fmt: skip
    assert (config.exporter, config.protocol, config.sampler, config.ratio) == (
        "otlp",
        "http/protobuf",
        "parentbased_traceidratio",
        0.01,
    )
    assert config.parent_based
    assert TracingConfig.read({"OTEL_TRACES_EXPORTER": "console"}).sampler == "parentbased_always_on"


def test_log_lines_written_inside_a_request_span_carry_its_trace_id(monkeypatch):
    from serving import tracing

    monkeypatch.setattr(os, "environ", {"OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_SCHEDULE_DELAY": "60000"})
    traces = tracing.from_environment(os.environ)
    tp, trace_id, _ = traceparent()
    formatter = tracing.TraceIdFormatter("%(message)s")
    record = logging.LogRecord("t", logging.WARNING, __file__, 1, "inside", None, None)
    with traces.request("ModelInfer", (("traceparent", tp),)) as span:
        inside = formatter.format(record)
        span_id = f"{span.span.get_span_context().span_id:016x}"
    assert inside == f"inside trace_id={trace_id} span_id={span_id}"
    assert formatter.format(record) == "inside"  # outside: no ids
    traces.shutdown()


def test_the_drop_counter_still_sees_the_sdks_queue():
    """CountingBatchSpanProcessor reads the SDK's private queue: this fails if opentelemetry-sdk changes it."""
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    from serving.tracing_sdk import CountingBatchSpanProcessor, CountingExporter

    processor = CountingBatchSpanProcessor(
        CountingExporter(ConsoleSpanExporter()), max_queue_size=4, max_export_batch_size=2
    )
    assert processor._batch_processor._max_queue_size == 4
    assert len(processor._batch_processor._queue) == 0 and processor._batch_processor._shutdown is False
    processor.shutdown()
