"""Replicas come and go under load and no client sees an error: a drain on SIGTERM, and scale-out that reaches
existing clients (connection ageing) — two real server processes on loopback, clients configured as the README
says (serving.client.channel_options: round_robin + health checking, or pick_first, with a retry policy)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter

import grpc
from balancer import Balancer
from rel_harness import report, until
from server_process import start_server

from serving.client import channel_options, infer_request, probabilities
from serving.protos import grpc_service_pb2_grpc as pb_grpc

DRAIN_DELAY_S = 1.5
GRACE_S = 20.0


class Load:
    """Closed-loop callers on some channels; every outcome counted, every answer checked against the reference."""

    def __init__(self, reference) -> None:
        self.reference = reference
        self.codes: Counter[str] = Counter()
        self.wrong = 0
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task] = []

    def add(self, channel: grpc.aio.Channel, callers: int, label: str) -> None:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        self.tasks += [asyncio.create_task(self._call(stub, i, label)) for i in range(callers)]

    async def _call(self, stub, seed: int, label: str) -> None:
        lo = seed
        while not self.stop.is_set():
            lo = (lo + 7) % 2000
            n = 1 + lo % 4
            try:
                reply = await stub.ModelInfer(infer_request(self.reference.images[lo : lo + n], "mnist"), timeout=30)
            except grpc.aio.AioRpcError as err:
                self.codes[f"{label}:{err.code().name}:{err.details()}"] += 1
                continue
            self.codes[f"{label}:OK"] += 1
            self.wrong += not self.reference.check(lo, n, probabilities(reply))

    def ok(self, label: str = "") -> int:
        return sum(v for k, v in self.codes.items() if k.endswith(":OK") and k.startswith(label))

    def failed(self) -> dict[str, int]:
        return {k: v for k, v in self.codes.items() if not k.endswith(":OK")}

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)


async def test_sigterm_on_one_of_two_replicas_fails_no_call(trained_repository, tmp_path, reference):
    flags = ("--drain-delay-s", str(DRAIN_DELAY_S), "--grace-period-s", str(GRACE_S), "--metrics-port", "0")
    a = start_server(trained_repository, tmp_path, *flags)
    b = start_server(trained_repository, tmp_path, *flags)
    load = Load(reference)
    try:
        with Balancer([a.grpc_port, b.grpc_port]) as balancer:
            # Client-side round robin over both replicas (a headless Service), and pick_first clients behind a
            # per-connection balancer (a ClusterIP Service): connections 1 and 3 go to replica a.
            targets = [(f"ipv4:{a.url},{b.url}", "round_robin")] + [(balancer.url, "pick_first")] * 4
            # (a local subchannel pool: each channel its own connection, as separate client processes would have)
            own = [("grpc.use_local_subchannel_pool", 1)]
            channels = [grpc.aio.insecure_channel(t, options=channel_options(lb) + own) for t, lb in targets]
            for (_, lb), ch in zip(targets, channels, strict=True):
                load.add(ch, 4, lb)
            await until(lambda: load.ok("round_robin") > 200 and load.ok("pick_first") > 200, "traffic")
            assert balancer.connections[a.grpc_port] >= 2, balancer.connections
            before = a.answered()
            signalled = time.monotonic()
            a.proc.send_signal(signal.SIGTERM)
            # The endpoints controller drops the terminating pod: new connections go to b only.
            balancer.set_backends([b.grpc_port])
            code = await asyncio.to_thread(a.proc.wait, GRACE_S + 10)
            exited = time.monotonic() - signalled
            after_exit = load.ok()
            await until(lambda: load.ok() > after_exit + 300, "traffic after replica a left")
            await load.finish()
            for ch in channels:
                await ch.close()
            connections = dict(balancer.connections)
    finally:
        load.stop.set()
        a.stop(signal.SIGKILL)
        b.stop()
    log = a.log()
    answered_during_drain = int(log.split("answered_during_drain=")[1].split()[0])
    result = {
        "calls": sum(load.codes.values()),
        "failed": load.failed(),
        "wrong_answers": load.wrong,
        "a_answered_before_signal": before,
        "a_exit_code": code,
        "a_exit_s": round(exited, 2),
        "balancer_connections": connections,
        "answered_during_drain": answered_during_drain,
    }
    report("rollout_sigterm", result)
    assert load.failed() == {}, result
    assert load.wrong == 0
    assert code == 0, log[-3000:]
    # It kept answering through the drain delay, then left well inside the grace period.
    assert answered_during_drain > 0, result
    assert DRAIN_DELAY_S <= exited < DRAIN_DELAY_S + 5, result
    assert "Traceback" not in log, log[-3000:]


async def test_a_new_replica_gets_a_fair_share_of_a_long_lived_client(trained_repository, tmp_path, reference):
    flags = ("--max-connection-age-s", "2", "--max-connection-age-grace-s", "5", "--metrics-port", "0")
    a = start_server(trained_repository, tmp_path, *flags)
    b = None
    load = Load(reference)
    try:
        with Balancer([a.grpc_port]) as balancer:
            # One long-lived client with one connection at a time (pick_first through a ClusterIP-like balancer).
            async with grpc.aio.insecure_channel(balancer.url, options=channel_options("pick_first")) as ch:
                load.add(ch, 4, "client")
                await until(lambda: load.ok() > 200, "traffic to replica a")
                b = start_server(trained_repository, tmp_path, *flags)
                balancer.set_backends([a.grpc_port, b.grpc_port])
                added = time.monotonic()
                await until(lambda: b.answered() > 0, "replica b to get its first call", timeout=20)
                first_call_s = time.monotonic() - added
                # Over the next 8 s (four connection ages) b must serve about half.
                a0, b0 = a.answered(), b.answered()
                await asyncio.sleep(8)
                a1, b1 = a.answered(), b.answered()
                await load.finish()
                connections = dict(balancer.connections)
    finally:
        load.stop.set()
        a.stop()
        if b is not None:
            b.stop()
    share = (b1 - b0) / max(1, (a1 - a0) + (b1 - b0))
    result = {
        "calls": sum(load.codes.values()),
        "failed": load.failed(),
        "b_first_call_after_s": round(first_call_s, 2),
        "b_share_next_8s": round(share, 3),
        "balancer_connections": connections,
    }
    report("scale_out", result)
    assert load.failed() == {}, result
    assert load.wrong == 0
    assert 0.25 <= share <= 0.75, result
