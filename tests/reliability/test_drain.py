"""Graceful drain: SIGTERM under concurrent load loses no accepted request and exits 0."""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rel_harness import CLIENT_OPTIONS, report
from server_process import start_server

from serving.client import infer_request, probabilities
from serving.protos import grpc_service_pb2_grpc as pb_grpc

STREAMS = 40
GRACE_S = 20.0
SIZES = (1, 4, 16, 64, 256)
SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass
class Outcome:
    sent: float
    done: float
    code: grpc.StatusCode
    details: str
    correct: bool


async def _stream(stub, reference, seed: int, outcomes: list[Outcome], stop: asyncio.Event) -> None:
    """Loop requests until the server refuses one (or the test says stop)."""
    rng = np.random.default_rng(seed)
    while not stop.is_set():
        n = int(rng.choice(SIZES))
        lo = int(rng.integers(0, 2048 - n))
        sent = time.monotonic()
        try:
            reply = await stub.ModelInfer(infer_request(reference.images[lo : lo + n], "mnist"), timeout=60)
        except grpc.aio.AioRpcError as err:
            outcomes.append(Outcome(sent, time.monotonic(), err.code(), err.details() or "", False))
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                return
            continue
        outcomes.append(
            Outcome(sent, time.monotonic(), grpc.StatusCode.OK, "", reference.check(lo, n, probabilities(reply)))
        )


async def _watch_health(url: str, statuses: list[str], connected: asyncio.Event) -> None:
    """Poll health until the server is gone: records SERVING / NOT_SERVING / the refusal code."""
    async with grpc.aio.insecure_channel(url) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
            except grpc.aio.AioRpcError as err:
                statuses.append(err.code().name)
                return
            connected.set()
            await asyncio.sleep(0.005)


async def test_sigterm_under_load_answers_every_accepted_request(trained_repository, tmp_path, reference):
    # A short batching delay keeps requests waiting in the batcher queue when the signal lands.
    server = start_server(
        trained_repository,
        tmp_path,
        *("--grace-period-s", str(GRACE_S), "--max-queue-delay-us", "3000", "--drain-delay-s", "0.5"),
    )
    outcomes: list[Outcome] = []
    stop = asyncio.Event()
    try:
        async with grpc.aio.insecure_channel(server.url, options=CLIENT_OPTIONS) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            streams = [asyncio.create_task(_stream(stub, reference, i, outcomes, stop)) for i in range(STREAMS)]
            while sum(o.code == grpc.StatusCode.OK for o in outcomes) < 400:
                await asyncio.sleep(0.05)
                assert server.proc.poll() is None, server.log()
            statuses: list[str] = []
            connected = asyncio.Event()
            watcher = asyncio.create_task(_watch_health(server.url, statuses, connected))
            await asyncio.wait_for(connected.wait(), 30)
            signalled = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            # Every stream ends at its first refusal; the bound is only a hang guard.
            await asyncio.wait_for(asyncio.gather(*streams), GRACE_S + 30)
            await asyncio.wait_for(watcher, 30)
        code = await asyncio.to_thread(server.proc.wait, GRACE_S + 10)
        exited = time.monotonic() - signalled
    finally:
        stop.set()
        server.stop(signal.SIGKILL)

    accepted = [o for o in outcomes if o.code != grpc.StatusCode.UNAVAILABLE]
    answered = [o for o in accepted if o.code == grpc.StatusCode.OK and o.correct]
    in_flight_at_signal = [o for o in answered if o.sent < signalled < o.done]
    refused = [o for o in outcomes if o.code == grpc.StatusCode.UNAVAILABLE]
    failed = [
        (o.code.name, o.details, round(o.sent - signalled, 4), round(o.done - signalled, 4))
        for o in accepted
        if not (o.code == grpc.StatusCode.OK and o.correct)
    ]
    result = {
        "streams": STREAMS,
        "accepted": len(accepted),
        "answered": len(answered),
        "failed": len(failed),
        "answered_across_the_signal": len(in_flight_at_signal),
        "refused_unavailable": len(refused),
        "health_after_signal": sorted(set(statuses)),
        "exit_code": code,
        "exit_s": round(exited, 2),
    }
    report("drain", result)

    assert failed == [], failed[:5]  # (code, details, sent, done) relative to the signal
    assert len(accepted) == len(answered) >= 400
    assert len(in_flight_at_signal) >= 1, result  # the drain really had work to finish
    assert len(refused) == STREAMS  # every stream's first post-drain request was refused, none hung
    # Health goes NOT_SERVING while the drain runs, then the port closes; never SERVING again in between.
    first_down = statuses.index("NOT_SERVING")
    # (a health call caught in flight as the port closes may be CANCELLED: only ModelInfer is waited for)
    assert set(statuses[first_down:]) <= {"NOT_SERVING", "UNAVAILABLE", "CANCELLED"}, statuses
    assert code == 0, server.log()
    assert exited < GRACE_S  # generous: the drain takes milliseconds, the grace is 20 s
    log = server.log()
    assert "signal received (SIGTERM): draining" in log and log.rstrip().endswith("stopped"), log[-2000:]
    # The drain delay: health NOT_SERVING while calls are still answered (clients without a retry policy, as
    # here, see UNAVAILABLE only in the drain's last moments, then the port closes).
    assert int(log.split("answered_during_drain=")[1].split()[0]) > 0, log[-2000:]
    assert "Traceback" not in log


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_plain_client_sees_answers_or_refusals_never_cancelled_or_cut(
    trained_repository, tmp_path, reference, workers
):
    """A client without a retry policy (no service config at all), 32 calls in flight, SIGTERM with the server's
    default flags: every call is answered, or refused with UNAVAILABLE before the server read it; none is
    CANCELLED (a client cannot tell that from its own cancellation) and no connection is cut under a call."""
    server = start_server(trained_repository, tmp_path, "--workers", str(workers))
    outcomes: list[Outcome] = []
    stop = asyncio.Event()
    try:
        async with grpc.aio.insecure_channel(server.url) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)

            async def calls(seed: int) -> None:
                lo = seed * 8
                while not stop.is_set():
                    sent = time.monotonic()
                    try:
                        reply = await stub.ModelInfer(infer_request(reference.images[lo : lo + 1], "mnist"), timeout=30)
                    except grpc.aio.AioRpcError as err:
                        outcomes.append(Outcome(sent, time.monotonic(), err.code(), err.details() or "", False))
                        return  # a plain client gives up at its first error
                    done = time.monotonic()
                    outcomes.append(
                        Outcome(sent, done, grpc.StatusCode.OK, "", reference.check(lo, 1, probabilities(reply)))
                    )

            tasks = [asyncio.create_task(calls(i)) for i in range(32)]
            await asyncio.sleep(1.5)
            assert sum(o.code == grpc.StatusCode.OK for o in outcomes) > 100, server.log()
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
        code = await asyncio.to_thread(server.proc.wait, 30)
    finally:
        stop.set()
        server.stop(signal.SIGKILL)
    errors = [(o.code.name, o.details) for o in outcomes if o.code != grpc.StatusCode.OK]
    report(f"drain_plain_client_w{workers}", {
        "ok": len(outcomes) - len(errors), "errors": sorted({f"{c}: {d[:60]}" for c, d in errors}), "exit": code,
    })  # fmt: skip
    assert code == 0
    assert all(o.correct for o in outcomes if o.code == grpc.StatusCode.OK)
    assert not [e for e in errors if e[0] == "CANCELLED"], errors
    # UNAVAILABLE only as the drain's refusal (read nothing, retry elsewhere): not "socket closed" or a reset.
    assert all(c == "UNAVAILABLE" and "shutting down" in d for c, d in errors), errors


# grpc.aio's client reports a write that races the server's end of a stream as this INTERNAL status (it sets it
# itself when the write fails in its core) instead of the server's UNAVAILABLE: when the drain ends a stream whose
# client is sending, some clients see it. Measured in docs/reliability.md; the code before the held refusals gave
# it too (14-94 per drain, and CANCELLED), the stream test still holds that none is CANCELLED or reset.
GRPC_AIO_WRITE_RACE = ("INTERNAL", "Internal error from Core")


def _cut(code: str, details: str, stream: bool = False) -> bool:
    """An outcome that means a call was lost or cut under way, rather than answered or refused."""
    if code == "CANCELLED":
        return True
    if stream and (code, details) == GRPC_AIO_WRITE_RACE:
        return False
    if code != "UNAVAILABLE":
        return True
    # The drain's refusal, or (once this server is gone) no server to connect to: both sent nothing anywhere.
    return not ("shutting down" in details or "failed to connect" in details.lower())


async def _keep_calling_unary(stub, reference, outcomes: list[tuple[str, str]], stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            reply = await stub.ModelInfer(infer_request(reference.images[:1], "mnist"), timeout=30)
        except grpc.aio.AioRpcError as err:
            outcomes.append((err.code().name, err.details() or ""))
            await asyncio.sleep(0.01)  # as application code and load generators do: pause, call again
            continue
        outcomes.append(("OK" if reference.check(0, 1, probabilities(reply)) else "WRONG", ""))


async def _keep_streaming(stub, reference, outcomes: list[tuple[str, str]], stop: asyncio.Event) -> None:
    """One request at a time over a ModelStreamInfer stream, reopened 10 ms after the stream fails."""
    while not stop.is_set():
        call = stub.ModelStreamInfer(timeout=60)
        try:
            while not stop.is_set():
                await call.write(infer_request(reference.images[:1], "mnist"))
                response = await call.read()
                if response is grpc.aio.EOF:
                    outcomes.append(("EOF", ""))
                    break
                if response.error_message:
                    outcomes.append(tuple(response.error_message.split(": ", 1)))
                else:
                    ok = reference.check(0, 1, probabilities(response.infer_response))
                    outcomes.append(("OK" if ok else "WRONG", ""))
            await call.done_writing()
            await call
        except grpc.aio.AioRpcError as err:
            outcomes.append((err.code().name, err.details() or ""))
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    ("workers", "kind"), [(1, "unary"), (2, "unary"), (1, "stream")], ids=["w1-unary", "w2-unary", "w1-stream"]
)
async def test_a_client_that_keeps_calling_through_the_drain_is_never_cancelled(
    trained_repository, tmp_path, reference, workers, kind
):
    """A client with no retry policy that calls again 10 ms after every error (as application code and load
    generators do), 32 calls in flight on one channel, SIGTERM with the default flags: every call is answered, or
    refused with UNAVAILABLE (by the drain, or once the server is gone, for want of a server to connect to); none
    is CANCELLED or cut. (gRPC's shutdown cancels the calls waiting in its queue: the drain keeps it empty.)"""
    server = start_server(trained_repository, tmp_path, "--workers", str(workers))
    outcomes: list[tuple[str, str]] = []
    stop = asyncio.Event()
    caller = _keep_calling_unary if kind == "unary" else _keep_streaming
    try:
        async with grpc.aio.insecure_channel(server.url) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            tasks = [asyncio.create_task(caller(stub, reference, outcomes, stop)) for _ in range(32)]
            await asyncio.sleep(1.5)
            assert sum(o[0] == "OK" for o in outcomes) > 100, server.log()
            server.proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(server.proc.wait, 60)
            await asyncio.sleep(0.5)  # the client keeps calling a server that is gone
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
    finally:
        stop.set()
        server.stop(signal.SIGKILL)
    seen = {f"{c}: {d[:50]}" for c, d in outcomes if c != "OK"}
    report(f"drain_keeps_calling_{kind}_w{workers}", {"ok": sum(c == "OK" for c, _ in outcomes), "seen": sorted(seen)})
    assert code == 0, server.log()[-3000:]
    cut = [(c, d) for c, d in outcomes if c != "OK" and _cut(c, d, stream=kind == "stream")]
    assert cut == [], (cut[:5], sorted(seen))
    assert any("shutting down" in d for _, d in outcomes), sorted(seen)  # the drain's refusal was seen
