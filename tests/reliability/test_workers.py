"""--workers N: one failing worker takes the server down (non-zero exit), the metrics port is checked, and the
multiprocess metrics start from zero whatever an earlier run left in PROMETHEUS_MULTIPROC_DIR."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
from rel_harness import infer_ok, metric_value
from server_process import ROOT, start_server

GUARD_S = 60  # hang guard only
M = {"model": "mnist", "version": "1"}


def _wait_ready(server, workers: int) -> None:
    deadline = time.monotonic() + GUARD_S
    while server.log().count("serving.server: ready:") < workers:
        assert time.monotonic() < deadline, server.log()
        assert server.proc.poll() is None, server.log()
        time.sleep(0.1)


def _workers(server) -> list[psutil.Process]:
    children = psutil.Process(server.proc.pid).children()
    return [c for c in children if "resource_tracker" not in " ".join(c.cmdline())]


def test_a_crashed_worker_stops_the_others_and_the_server_exits_non_zero(trained_repository, tmp_path):
    server = start_server(trained_repository, tmp_path, "--workers", "2")
    workers: list[psutil.Process] = []
    try:
        _wait_ready(server, 2)
        workers = _workers(server)
        assert len(workers) == 2, workers
        workers[0].send_signal(signal.SIGKILL)
        code = server.proc.wait(GUARD_S)
        _, alive = psutil.wait_procs(workers, timeout=GUARD_S)
    finally:
        for process in [*workers, psutil.Process(server.proc.pid)] if server.proc.poll() is None else workers:
            if process.is_running():
                process.kill()
    assert code == 1, server.log()
    assert not alive
    assert "exited with -9; stopping the others" in server.log()


def test_a_metrics_port_in_use_is_a_start_up_failure_with_workers(trained_repository, tmp_path):
    """Checked before any worker is started, as the single-process server does: exit 1, no worker ever ran."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        server = start_server(
            trained_repository, tmp_path, "--workers", "2", "--metrics-port", str(busy.getsockname()[1]), wait=False
        )
        code = server.proc.wait(GUARD_S)
    finally:
        busy.close()
    log = server.log()
    assert code == 1, log
    assert "cannot serve metrics on 127.0.0.1:" in log and "in use" in log, log
    assert "workers on" not in log and "serving.server" not in log, log
    assert "Traceback" not in log, log


@pytest.fixture
def stale_dir(tmp_path):
    """A PROMETHEUS_MULTIPROC_DIR holding what an earlier run left: 1000 OK requests for mnist/1."""
    directory = tmp_path / "prom"
    directory.mkdir()
    stale = "from serving import metrics; metrics.REQUESTS.labels('mnist', '1', 'OK').inc(1000)"
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}  # conftest removed SERVING_* already
    subprocess.run([sys.executable, "-c", stale], cwd=ROOT, env=env, check=True, timeout=60)
    assert list(directory.glob("counter_*.db"))
    return directory


def test_stale_multiprocess_files_are_cleared_at_start(trained_repository, tmp_path, stale_dir, reference):
    server = start_server(
        trained_repository, tmp_path, "--workers", "2", env={"PROMETHEUS_MULTIPROC_DIR": str(stale_dir)}
    )
    try:
        _wait_ready(server, 2)
        before = metric_value(server.metrics(), "mnist_serving_requests_total", **M, code="OK")
        for n in (1, 2, 3):
            probs, _ = infer_ok(server, reference.images[:n])
            assert reference.check(0, n, probs)
        after = metric_value(server.metrics(), "mnist_serving_requests_total", **M, code="OK")
    finally:
        code = server.stop()
    assert code == 0, server.log()
    assert (before, after) == (0, 3)


async def test_sigterm_with_workers_under_load_drains_every_worker(trained_repository, tmp_path, reference):
    """SIGTERM to the parent drains both workers: every call is answered or refused retryably, none is cut."""
    import asyncio
    from collections import Counter

    import grpc

    from serving.client import channel_options, infer_request, probabilities
    from serving.protos import grpc_service_pb2_grpc as pb_grpc

    server = start_server(trained_repository, tmp_path, "--workers", "2", "--drain-delay-s", "1")
    codes: Counter[str] = Counter()
    wrong = 0
    stop = asyncio.Event()

    async def caller(stub, seed: int) -> None:
        nonlocal wrong
        lo = seed
        while not stop.is_set():
            lo = (lo + 13) % 2000
            try:
                reply = await stub.ModelInfer(infer_request(reference.images[lo : lo + 2], "mnist"), timeout=30)
            except grpc.aio.AioRpcError as err:
                codes[err.code().name] += 1
                await asyncio.sleep(0.05)
                continue
            codes["OK"] += 1
            wrong += not reference.check(lo, 2, probabilities(reply))

    try:
        _wait_ready(server, 2)
        # Separate connections (SO_REUSEPORT spreads connections, not calls, over the workers).
        own = [("grpc.use_local_subchannel_pool", 1)]
        channels = [
            grpc.aio.insecure_channel(server.url, options=channel_options("pick_first") + own) for _ in range(12)
        ]
        tasks = [
            asyncio.create_task(caller(pb_grpc.GRPCInferenceServiceStub(ch), i)) for i, ch in enumerate(channels * 2)
        ]
        while codes["OK"] < 300:
            await asyncio.sleep(0.05)
        server.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(server.proc.wait, GUARD_S)
        stop.set()
        await asyncio.gather(*tasks)
        for ch in channels:
            await ch.close()
    finally:
        stop.set()
        server.stop(signal.SIGKILL)
    log = server.log()
    assert code == 0, log[-3000:]
    # Alone (no other replica to retry on), a call after the port closed fails UNAVAILABLE; nothing else fails.
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
    assert wrong == 0
    drained = [
        int(line.split("answered_during_drain=")[1].split()[0]) for line in log.splitlines() if "drained:" in line
    ]
    assert len(drained) == 2 and all(n > 0 for n in drained), log[-3000:]  # both workers answered through the delay


def _readiness_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("workers_readiness", ROOT / "scripts" / "workers_readiness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_worker_says_serving_while_another_is_still_loading(trained_repository, tmp_path, reference):
    """One worker held (SIGSTOP) before it loads: the other loads but says NOT_SERVING on every new connection
    (health, ServerReady, ModelReady); once the held one loads, every fresh connection is answered."""
    from grpc_health.v1 import health_pb2

    from serving.protos import grpc_service_pb2 as pb
    from serving.protos import grpc_service_pb2_grpc as pb_grpc

    script = _readiness_script()
    server = start_server(trained_repository, tmp_path, "--workers", "2", wait=False)
    held: psutil.Process | None = None
    try:
        deadline = time.monotonic() + GUARD_S
        while len(workers := _workers(server)) < 2:
            assert time.monotonic() < deadline and server.proc.poll() is None, server.log()
            time.sleep(0.005)
        held = workers[1]
        held.suspend()
        while "waiting for the other workers" not in server.log():
            assert time.monotonic() < deadline and server.proc.poll() is None, server.log()
            time.sleep(0.05)
        # New connections land on either worker: the held one does not answer, the loaded one must not say ready.
        statuses = {script.probe(server.url, timeout=0.5) for _ in range(12)}
        assert health_pb2.HealthCheckResponse.SERVING not in statuses, statuses
        assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses, statuses
        import grpc

        ready_answers = set()
        for _ in range(8):
            with grpc.insecure_channel(server.url, options=script.FRESH) as ch:
                stub = pb_grpc.GRPCInferenceServiceStub(ch)
                try:
                    ready_answers.add(stub.ServerReady(pb.ServerReadyRequest(), timeout=0.5).ready)
                    ready_answers.add(stub.ModelReady(pb.ModelReadyRequest(name="mnist"), timeout=0.5).ready)
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err  # landed on the held worker
        assert ready_answers == {False}, ready_answers
        held.resume()
        held = None
        script.wait_first_serving(server.url, server.child.alive)
        codes = script.call_fresh(server.url, reference.images[:1], 16)
    finally:
        if held is not None:
            held.resume()
        code = server.stop(signal.SIGINT)
    assert codes == {"OK": 16}, codes
    assert code == 0, server.log()


@pytest.mark.parametrize("workers", [2, 4])
def test_the_first_probe_that_says_serving_means_every_worker_answers(trained_repository, tmp_path, reference, workers):
    """As a probe and a fresh client see it: 3 starts, 16 new connections the moment one probe says SERVING."""
    script = _readiness_script()
    for start in range(3):
        result = script.trial(trained_repository, tmp_path / str(start), workers, reference.images[:1], 16)
        assert result["codes"] == {"OK": 16} and result["exit_code"] == 0, result
