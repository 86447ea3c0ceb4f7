"""Model hot-swap under load: new versions take over, bad ones are refused, removed ones drain and go."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rel_harness import (
    CLIENT_OPTIONS,
    Outcome,
    add_version,
    channel,
    checked_stream,
    infer_ok,
    metric_value,
    report,
    shifted_model,
    until,
    wait_until,
)
from server_process import ROOT, start_server

from serving.client import infer_request, probabilities
from serving.config import Settings
from serving.protos import grpc_service_pb2 as pb
from serving.protos import grpc_service_pb2_grpc as pb_grpc
from serving.server import InferenceServer

STREAMS = 6
PINNED = 2  # streams asking for version 2 explicitly while it is removed
GUARD_S = 60  # hang guard for each wait; the poller reacts within a fraction of a second


def _after(outcomes: list[Outcome], moment: float) -> list[Outcome]:
    return [o for o in outcomes if o.sent > moment]


async def test_versions_come_and_go_under_load(repository, tmp_path, reference):
    model_dir = repository / "mnist"
    server = start_server(repository, tmp_path, "--model-poll-interval-s", "0.2")
    plain: list[Outcome] = []
    pinned: list[Outcome] = []
    stop = asyncio.Event()
    failures = lambda: metric_value(server.metrics(), "mnist_serving_model_load_failures_total", model="mnist")  # noqa: E731
    try:
        async with grpc.aio.insecure_channel(server.url, options=CLIENT_OPTIONS) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            tasks = [
                asyncio.create_task(checked_stream(stub, reference, i, STREAMS, plain, stop)) for i in range(STREAMS)
            ]

            async def served(version: str, since: float, count: int = 20):
                return sum(o.version == version for o in _after(plain, since)) >= count

            start = time.monotonic()
            await until(lambda: served("1", start), "version 1 under load", server)

            # 1. A new version, written atomically, takes over.
            add_version(model_dir, 2, model_dir / "1")
            await until(lambda: served("2", 0, 1), "version 2 to serve", server)
            v2_seen = max(o.done for o in plain if o.version == "2")
            await until(lambda: served("2", v2_seen), "more of version 2", server)
            tasks += [
                asyncio.create_task(checked_stream(stub, reference, i, STREAMS, pinned, stop, "2"))
                for i in range(PINNED)
            ]

            # 2. A corrupt version and 3. one that fails the accuracy check are refused; 2 keeps serving.
            add_version(model_dir, 3, model_dir / "1", onnx=b"this is not an onnx model")
            await until(lambda: asyncio.to_thread(lambda: failures() >= 1), "version 3 refused", server)
            add_version(model_dir, 4, model_dir / "1", onnx=shifted_model(model_dir / "1" / "model.onnx"))
            await until(lambda: asyncio.to_thread(lambda: failures() >= 2), "version 4 refused", server)
            refused_at = time.monotonic()
            await until(lambda: served("2", refused_at), "version 2 after the refusals", server)
            index = await stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)

            # 4. Removing version 2 unloads it once its queued work is done; unversioned requests fall back to 1.
            (model_dir / "2").rename(model_dir / ".trash-2")
            shutil.rmtree(model_dir / ".trash-2")
            removed_at = time.monotonic()
            await until(lambda: any(o.code == "NOT_FOUND" for o in pinned), "version 2 to be unloaded", server)
            unloaded_seen = min(o.done for o in pinned if o.code == "NOT_FOUND")
            await until(lambda: served("1", unloaded_seen), "version 1 again", server)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), GUARD_S)
        load_failures = await asyncio.to_thread(failures)
    finally:
        stop.set()
        code = server.stop()
    log = server.log()

    failed = [o for o in plain if not (o.code == "OK" and o.correct)]
    states = {(m.version, m.state): m.reason for m in index.models}
    first_not_found = next(i for i, o in enumerate(pinned) if o.code == "NOT_FOUND")
    result = {
        "unversioned_requests": len(plain),
        "failed": len(failed),
        "answered_by": {v: sum(o.version == v for o in plain) for v in ("1", "2")},
        "pinned_to_2_answered": sum(o.code == "OK" for o in pinned),
        "pinned_to_2_not_found_after_removal": sum(o.code == "NOT_FOUND" for o in pinned),
        "refused_versions": sorted(v for v, s in states if s == "UNAVAILABLE"),
        "load_failures_metric": load_failures,
    }
    report("hot_swap", result)

    assert code == 0, log
    assert failed == [], failed[:5]  # zero failed requests through every change
    # Requests sent after version 2 was seen serving went to 2 (until it was removed) ...
    assert {o.version for o in _after(plain, v2_seen) if o.done < removed_at} == {"2"}
    # ... and requests sent after it was gone went back to 1.
    assert {o.version for o in _after(plain, unloaded_seen)} == {"1"}
    # Version 2's own requests: answered (correctly) until the unload, then NOT_FOUND, nothing else.
    assert all(o.code == "OK" and o.correct for o in pinned[:first_not_found]), pinned[:first_not_found]
    assert {o.code for o in _after(pinned, unloaded_seen)} == {"NOT_FOUND"}
    assert {o.code for o in pinned} <= {"OK", "NOT_FOUND"}
    # The refused versions: a log line each, the metric, and UNAVAILABLE with the reason in the index.
    assert "model mnist version 3 rejected: cannot load" in log
    assert "model mnist version 4 rejected: accuracy" in log and "below the recorded test_accuracy" in log
    assert ("1", "READY") in states and ("2", "READY") in states
    assert "cannot load" in states[("3", "UNAVAILABLE")]
    assert "below the recorded test_accuracy" in states[("4", "UNAVAILABLE")]
    assert "unloading model mnist version 2" in log
    assert load_failures == 2


# ---------------------------------------------------------------- models and versions come and go (one process)

SERIES = (  # the per-version series a loaded version reports and an unloaded one must stop reporting
    "mnist_serving_execution_provider_info",
    "mnist_serving_offline_accuracy",
    "mnist_serving_model_load_seconds",
    "mnist_serving_online_accuracy",
    "mnist_serving_queue_images",
)


def _health(server, name: str) -> str:
    with grpc.insecure_channel(server.url) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        except grpc.RpcError as err:
            return err.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _reported(text: str, model: str, version: str) -> list[str]:
    return [name for name in SERIES if f'model="{model}"' in text and _has(text, name, model, version)]


def _has(text: str, name: str, model: str, version: str) -> bool:
    return any(
        line.startswith(name + "{") and f'model="{model}"' in line and f'version="{version}"' in line
        for line in text.splitlines()
    )


def test_a_new_model_and_a_new_version_appear_then_go_with_their_series(repository, tmp_path, reference):
    server = start_server(repository, tmp_path, "--model-poll-interval-s", "0.2")
    try:
        # A whole new model, published atomically (built under a hidden name, renamed into place).
        staging = repository / ".tmp-digits"
        shutil.copytree(repository / "mnist" / "1", staging / "1")
        staging.rename(repository / "digits")
        add_version(repository / "mnist", 2, repository / "mnist" / "1")
        wait_until(lambda: _health(server, "digits") == "SERVING", "model digits", server)
        wait_until(lambda: infer_ok(server, reference.images[:1])[1] == "2", "mnist/2", server)
        with channel(server) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            reply = stub.ModelInfer(infer_request(reference.images[:8], "digits"), timeout=30)
            index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
        loaded = server.metrics()

        # A version removed while its model stays: its series go (single process: removed, not blanked).
        shutil.rmtree(repository / "mnist" / "2")
        wait_until(lambda: not _has(server.metrics(), SERIES[0], "mnist", "2"), "mnist/2 series to go", server)
        version_gone = server.metrics()

        # A whole model removed: not ready, NOT_FOUND, its series gone; the other model serves on.
        (repository / "digits").rename(repository / ".trash-digits")
        shutil.rmtree(repository / ".trash-digits")
        wait_until(lambda: _health(server, "digits") == "NOT_SERVING", "model digits to go", server)
        with channel(server) as ch, pytest.raises(grpc.RpcError) as gone:
            pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(infer_request(reference.images[:1], "digits"), timeout=10)
        model_gone = server.metrics()
        probs, version = infer_ok(server, reference.images[:16])
    finally:
        code = server.stop()
    assert code == 0, server.log()
    assert reply.model_name == "digits" and reply.model_version == "1"
    assert reference.check(0, 8, probabilities(reply))
    assert {(m.name, m.version, m.state) for m in index.models} == {
        ("mnist", "1", "READY"), ("mnist", "2", "READY"), ("digits", "1", "READY"),
    }  # fmt: skip
    for model, v in (("mnist", "1"), ("mnist", "2"), ("digits", "1")):
        assert _reported(loaded, model, v) == list(SERIES), (model, v)
    assert _reported(version_gone, "mnist", "2") == []
    assert _reported(version_gone, "mnist", "1") == list(SERIES)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert gone.value.details() == "unknown model 'digits' (models: mnist)"
    assert _reported(model_gone, "digits", "1") == []
    assert _reported(model_gone, "mnist", "1") == list(SERIES)
    assert version == "1" and reference.check(0, 16, probs)
    assert "unloading model digits version 1" in server.log()


async def test_a_failing_rescan_is_logged_and_polling_goes_on(repository, reference, caplog):
    """Whatever makes a rescan raise (nothing found on disk does any more: a missing root is skipped, odd
    folder names are ignored), the poller logs it, keeps what is loaded serving, and polls on. In process,
    with the fault injected into the real repository's rescan."""
    server = InferenceServer(Settings(model_repository=repository, model_poll_interval_s=0.05, data_dir=ROOT / "data"))
    await server.repository.load_all()
    real_rescan, faults = server.repository.rescan, [OSError("Input/output error"), RuntimeError("boom")]

    async def rescan():
        if faults:
            raise faults.pop(0)
        await real_rescan()

    server.repository.rescan = rescan
    poller = asyncio.create_task(server._poll_repository())
    try:
        with caplog.at_level(logging.ERROR, logger="serving.server"):
            await until(lambda: not faults, "two failed rescans")
            [mv] = server.repository.versions()
            probs = (await mv.batcher.infer(reference.images[:8])).probs  # what is loaded still answers
            add_version(repository / "mnist", 2, repository / "mnist" / "1")
            await until(lambda: "2" in {v.version for v in server.repository.versions()}, "mnist/2 after them")
    finally:
        poller.cancel()
        for version in server.repository.versions():
            await version.unload()
    assert reference.check(0, 8, probs)
    failures = [r for r in caplog.records if r.getMessage() == "repository rescan failed; serving what is loaded"]
    assert [str(r.exc_info[1]) for r in failures] == ["Input/output error", "boom"]
