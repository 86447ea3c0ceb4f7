"""One server process's gRPC server: its assembly (services over the data plane), its start (bind, load, say
SERVING) and its drain on SIGTERM. The process around it (entry point, workers, exit codes) is serving.lifecycle."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from serving import telemetry, tracing
from serving.canary import Canary
from serving.config import Settings
from serving.dataplane import DataPlane
from serving.errors import StartupError
from serving.feedback import Feedback, ReceiptLedger
from serving.model_control import ModelControl
from serving.protos import feedback_pb2, feedback_pb2_grpc
from serving.protos import grpc_service_pb2 as pb
from serving.protos.pool import POOL
from serving.receipts import ReceiptKey
from serving.repository import ModelRepository
from serving.runtime import check_device
from serving.servicer import FeedbackServicer, InferenceServicer, add_generic, add_inference_service
from serving.state import ServerState
from serving.workers import Readiness

log = logging.getLogger(__name__)

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
FEEDBACK_SERVICE = feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"].full_name
# Stays SERVING while the process runs (liveness); "" and the service names mean ready to infer.
LIVENESS = "liveness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# The drain's last phase holds new calls until none has arrived for this long, then sends GOAWAY and refuses the
# held calls: their clients were waiting for an answer, so no call is caught half-way in gRPC's queue.
REFUSE_QUIET_S = 0.25
# ... but never longer than this (calls arriving on new connections would keep it going).
REFUSE_MAX_S = 2.0
# How long after the shutdown begins the calls held in the last phase are refused: GOAWAY reaches their clients
# first, so that their next calls do not land in this server's queue.
GOAWAY_LEAD_S = 0.05
# After the drain, spans still queued for export get this long (a receiver that is away would block for
# OTEL_EXPORTER_OTLP_TIMEOUT, 10 s by default, per attempt).
TRACE_FLUSH_S = 2.0


class InferenceServer:
    """One server process: gRPC services, health, the model repository and their lifecycle."""

    def __init__(self, settings: Settings, readiness: Readiness | None = None) -> None:
        self.settings = settings
        self.readiness = readiness  # with --workers: the other workers' loads, which readiness waits for
        self.tracing = tracing.from_environment()  # None: off (OTEL_TRACES_EXPORTER unset); StartupError if bad
        if self.tracing is not None:
            tracing.log_trace_ids()
        self.state = ServerState()
        self.repository = ModelRepository(settings)
        self.control = ModelControl(self.repository, settings, self._model_changed)
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._poller: asyncio.Task | None = None
        self._canary: asyncio.Task | None = None
        self.hurry = asyncio.Event()  # set by a second signal: skip what is left of the drain delay
        self.stopping = asyncio.Event()  # set by the first signal: a start still waiting for other workers gives up

    async def start(self) -> int:
        """Bind and start answering (health NOT_SERVING), then load and warm up models, then SERVING."""
        check_device(self.settings)  # a CUDA that cannot be fails here, before the port opens
        server = self._grpc_server()
        self.port = self._bind(server)
        self._server = server
        await self._set_health(NOT_SERVING)
        await self.health.set(LIVENESS, SERVING)
        await server.start()
        log.info(
            "gRPC listening on %s:%d (%s)",
            self.settings.host,
            self.port,
            "TLS" if self.settings.tls_cert else "plaintext",
        )
        await self._load()
        if not await self._workers_loaded():
            return self.port
        self.state.started = True
        for mv in self.repository.versions():
            await self.health.set(mv.name, SERVING)
        await self._set_health(SERVING)
        if self.settings.model_control_mode == "poll":
            self._poller = asyncio.create_task(self._poll_repository())
        if self.settings.canary_interval_s:
            self._canary = asyncio.create_task(Canary(self.repository, self.settings).run())
        log.info(
            "ready: %s", ", ".join(f"{mv.name}/{mv.version} on {mv.provider}" for mv in self.repository.versions())
        )
        return self.port

    def _grpc_server(self) -> grpc.aio.Server:
        """The gRPC server with its services: inference (over the data plane), feedback, health, reflection."""
        s = self.settings
        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 1 if s.workers > 1 else 0),
        ]
        if s.stream_window_bytes:
            # NOTE: with BDP probing gRPC grows every call's window to several MiB, and buffers that much of each
            # request before the handler decides anything: memory then grew ~5 MiB per concurrent large caller,
            # refused ones included (docs/reliability.md, "Memory under overload").
            options += [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", s.stream_window_bytes)]
        if s.max_connection_age_s:
            # GOAWAY after the age (gRPC adds +-10 % jitter): the client reconnects, through its balancer, and so
            # reaches replicas added since. In-flight calls get the grace; new calls go to the new connection.
            options += [
                ("grpc.max_connection_age_ms", int(s.max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(s.max_connection_age_grace_s * 1000)),
            ]
        server = grpc.aio.server(options=options)
        receipts = ReceiptKey.from_file(s.receipt_key_file, s.receipt_max_age_s)
        ledger = ReceiptLedger(s.feedback_capacity, s.receipt_max_age_s)
        feedback = Feedback(receipts, ledger, self.repository.scorer)
        plane = DataPlane(self.repository, s, self.state, receipts, self.tracing)
        add_inference_service(InferenceServicer(plane, self.control), server)
        add_generic(feedback_pb2_grpc.add_FeedbackServiceServicer_to_server, FeedbackServicer(feedback), server)
        add_generic(health_pb2_grpc.add_HealthServicer_to_server, self.health, server)
        services = (INFERENCE_SERVICE, FEEDBACK_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
        add_generic(
            reflection_pb2_grpc.add_ServerReflectionServicer_to_server,
            reflection.aio.ReflectionServicer(services, pool=POOL),
            server,
        )
        return server

    def _bind(self, server: grpc.aio.Server) -> int:
        """The port the server listens on (plaintext or TLS); StartupError naming the address otherwise."""
        s = self.settings
        address = f"[{s.host}]:{s.grpc_port}" if ":" in s.host else f"{s.host}:{s.grpc_port}"  # IPv6 in brackets
        tls = ""
        if s.tls_cert is not None:
            try:
                key_and_cert = (s.tls_key.read_bytes(), s.tls_cert.read_bytes())
            except OSError as exc:
                raise StartupError(f"cannot read the TLS key/certificate: {exc}") from exc
            # gRPC reports a bad PEM pair only as a failure to bind.
            tls = " with TLS (are --tls-cert/--tls-key a PEM certificate and its private key?)"
        try:
            if s.tls_cert is not None:
                port = server.add_secure_port(address, grpc.ssl_server_credentials([key_and_cert]))
            else:
                port = server.add_insecure_port(address)
        except (RuntimeError, OSError) as exc:
            raise StartupError(f"cannot listen on {address}{tls}: {exc}") from exc
        if not port:
            raise StartupError(f"cannot listen on {address} (port in use?)")
        return port

    async def _load(self) -> None:
        """The start-up load (under --require-gpu every version checks its own placement: runtime.check_placement)."""
        await self.repository.load_all()
        # The models, modules and protobuf descriptors loaded by now live as long as the process: the garbage
        # collector stops scanning them on every collection the request path triggers.
        gc.freeze()
        telemetry.gpu_required(self.settings.require_gpu)

    async def _workers_loaded(self) -> bool:
        """With --workers, count this one in and wait until every worker has loaded (a probe's new connection may
        land on any of them); False when a signal came first (a worker failed, or the server is being stopped)."""
        if self.readiness is None:
            return True
        self.readiness.loaded()
        if not self.readiness.all_loaded():
            log.info("loaded; waiting for the other workers before saying SERVING")
        while not self.readiness.all_loaded():
            if self.stopping.is_set():
                return False
            await asyncio.sleep(0.02)
        return True

    async def _set_health(self, status) -> None:
        for name in ("", INFERENCE_SERVICE, FEEDBACK_SERVICE):
            await self.health.set(name, status)

    async def _poll_repository(self) -> None:
        while True:
            await asyncio.sleep(self.settings.model_poll_interval_s)
            try:
                before = set(self.repository.models)
                await self.repository.rescan()
                for name in set(self.repository.models) | before:
                    await self._model_changed(name)
            except Exception:
                log.exception("repository rescan failed; serving what is loaded")

    async def _model_changed(self, name: str) -> None:
        """A model was loaded, unloaded or refused: its health follows (its metrics follow its versions)."""
        serving = name in self.repository.models and self.state.started and not self.state.draining
        await self.health.set(name, SERVING if serving else NOT_SERVING)

    async def stop(self, grace: float | None = None, delay: float | None = None) -> None:
        """Drain so that clients see no error: NOT_SERVING but still answering for `delay` (balancers and
        health-checking clients move away), then hold stragglers until calls stop, then GOAWAY (clients reconnect
        elsewhere), refuse the held calls with a retry pushback and let accepted calls finish within `grace`."""
        s = self.settings
        grace = s.grace_period_s if grace is None else grace
        delay = s.drain_delay_s if delay is None else delay
        self.state.draining = True
        answered_before = self._answered()
        await self._set_health(NOT_SERVING)
        for name in list(self.repository.models):
            await self.health.set(name, NOT_SERVING)
        for task in (self._poller, self._canary):
            if task is not None:
                task.cancel()
        if delay and not self.hurry.is_set():
            log.info("draining: NOT_SERVING, still answering for %.1fs", delay)
            try:
                await asyncio.wait_for(self.hurry.wait(), delay)
            except TimeoutError:
                pass
        if self._server is not None:
            # NOTE: grpc's stop() cancels calls it has received but not yet handed to a handler (CANCELLED, which
            # clients do not retry). So first hold every new call (refused with UNAVAILABLE plus a retry pushback
            # once GOAWAY is out, DataPlane.refuse_after_goaway): clients that call again after each answer stop
            # sending, the stream of calls dries up, and only then does the shutdown (and GOAWAY) begin.
            self.state.refusing = True
            started = time.monotonic()
            while (
                time.monotonic() - self.state.last_call < REFUSE_QUIET_S
                and time.monotonic() - started < min(REFUSE_MAX_S, grace)
                and not self.hurry.is_set()
            ):
                await asyncio.sleep(0.01)
            stopping = asyncio.create_task(self._server.stop(0 if self.hurry.is_set() else grace))
            # The shutdown has begun (GOAWAY on its way, nothing waiting in gRPC's queue): the held calls are
            # refused now, and their clients' next calls go to a new connection.
            await asyncio.sleep(GOAWAY_LEAD_S)
            self.state.goaway.set()
            await stopping
            log.info("drained: answered_during_drain=%d", self._answered() - answered_before)
        for mv in self.repository.versions():
            mv.batcher.close()
        self.control.close()
        if self.tracing is not None:  # the spans of the last calls, exported before the process exits
            timeout = TRACE_FLUSH_S if not self.hurry.is_set() else 0.5
            if not await self.tracing.close(timeout):
                log.warning("traces: the last spans could not be exported within %.1fs; dropped", timeout)

    def _answered(self) -> int:
        return sum(mv.telemetry.stats.success.count for mv in self.repository.versions())

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve(settings: Settings, readiness: Readiness | None = None) -> None:
    """Run one server process until SIGTERM/SIGINT, then drain and return. SIGTERM (an orchestrator) drains
    with the drain delay; SIGINT (Ctrl-C) without it; a second signal cuts the delay short. A worker says SERVING
    only once every worker has loaded (`readiness`)."""
    server = InferenceServer(settings, readiness)
    received: list[signal.Signals] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig)
        server.stopping.set()
        if stop.is_set():
            server.hurry.set()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await server.start()
    except BaseException:
        await server.stop(0, 0)
        raise
    await stop.wait()
    delay = settings.drain_delay_s if received[0] == signal.SIGTERM else 0.0
    log.info(
        "signal received (%s): draining (answering for %.1fs, then up to %.1fs for accepted calls)",
        received[0].name, delay, settings.grace_period_s,
    )  # fmt: skip
    await server.stop(delay=delay)
    log.info("stopped")
