"""The data plane: what happens to an inference request between the wire and the model, for unary calls and
streams alike — drain, admission, lookup, decoding, batching, scoring attached labels, the receipt, encoding and
recording — and the model lookups around it (readiness, metadata, configuration, statistics, the repository index).
The servicer and the stream only convert protocol messages and call its named operations; serving.errors maps what
it raises to status codes. Independent of the transport: messages in, answers out, no gRPC types (a second
transport would call the same operations).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from serving import codec, telemetry, wire
from serving.admission import Admission
from serving.batcher import Answer
from serving.config import Settings
from serving.errors import InvalidInput, Overloaded, ServerDraining, ServingError, status_of
from serving.model_version import ModelVersion
from serving.protos import grpc_service_pb2 as pb
from serving.receipts import ReceiptKey
from serving.repository import ModelRepository
from serving.state import ServerState
from serving.tracing import NOT_TRACED, RequestSpan, Tracing

DRAINING = "server is shutting down; retry on another replica"
# A held call is refused this long before its deadline, so that the client gets the refusal, not DEADLINE_EXCEEDED.
_DEADLINE_MARGIN_S = 0.05


class DataPlane:
    """Inference for the loaded models of one process."""

    def __init__(
        self,
        repository: ModelRepository,
        settings: Settings,
        state: ServerState,
        receipts: ReceiptKey,
        tracing: Tracing | None = None,
    ) -> None:
        self.repository = repository
        self.settings = settings
        self.state = state
        self.receipts = receipts
        self.admission = Admission(settings.max_inflight_bytes)
        self.tracing = tracing  # None: tracing off

    def trace(self, method: str, metadata, traceparent: str = "") -> RequestSpan:
        """The span of one request, to hand to `infer` (a context manager; a no-op one when tracing is off)."""
        return NOT_TRACED if self.tracing is None else self.tracing.request(method, metadata, traceparent)

    # ---------------------------------------------------------------- health and lookups

    def ready(self) -> bool:
        return self.state.started and self.repository.ready and not self.state.draining

    def model_ready(self, name: str, version: str) -> bool:
        try:
            self.repository.get(name, version)
        except ServingError:  # not found, or not ready (being unloaded)
            return False
        return self.state.started and not self.state.draining

    def version(self, name: str, version: str = "") -> ModelVersion:
        """The loaded version (the newest when `version` is empty); ModelNotFound / ModelNotReady otherwise."""
        return self.repository.get(name, version)

    def providers(self) -> list[str]:
        return sorted({mv.provider for mv in self.repository.versions()})

    def metadata(self, name: str, version: str) -> pb.ModelMetadataResponse:
        mv = self.version(name, version)
        return codec.model_metadata(mv, sorted(self.repository.models[mv.name], reverse=True))

    def config(self, name: str, version: str) -> pb.ModelConfig:
        return codec.model_config(self.version(name, version))

    def statistics(self, name: str, version: str) -> list[pb.ModelStatistics]:
        """Triton's statistics of one version (the newest when `version` is empty), or of every version."""
        versions = [self.version(name, version)] if name else self.repository.versions()
        return [mv.telemetry.stats.proto(mv.name, mv.version) for mv in versions]

    async def index(self, ready_only: bool) -> list:
        """The repository index: every model version with its state and reason (READY ones only if asked)."""
        return [e for e in await self.repository.index() if e.state == "READY" or not ready_only]

    # ---------------------------------------------------------------- new calls, reading

    async def refuse_new_call(self, deadline: float | None) -> None:
        """Let a new call (unary or stream) in, or, in the drain's last phase, hold it and refuse it
        (`refuse_after_goaway`)."""
        self.state.last_call = time.monotonic()  # refused calls too: the drain waits for quiet
        if self.state.refusing:
            await self.refuse_after_goaway(deadline)

    async def refuse_after_goaway(self, deadline: float | None) -> None:
        """Hold a call that arrived in the drain's last phase until GOAWAY is on its way (or just before its
        deadline), then refuse it with UNAVAILABLE.

        NOTE: gRPC's shutdown cancels (CANCELLED) every call it has received but not yet handed to a handler. A
        client that calls again after each refusal would always have some there; held, its calls stop arriving,
        so that nothing is waiting in gRPC when the shutdown begins, and it sees GOAWAY before its refusals."""
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic() - _DEADLINE_MARGIN_S)
        try:
            await asyncio.wait_for(self.state.goaway.wait(), timeout)
        except TimeoutError:
            pass
        raise ServerDraining(DRAINING)

    async def read_admitted(self, read: Callable[[], Awaitable], end: object) -> wire.InferRequest:
        """A unary call's request, read only once the process has room for it (else RESOURCE_EXHAUSTED unread);
        `end`: what `read` returns when the call has no message."""
        try:
            self.admission.before_read()
        except Overloaded:
            telemetry.refused_unread()
            raise
        received = await self.admission.read(read, end=end)
        if received is None:
            raise InvalidInput("ModelInfer call without a request message")
        return received

    @property
    def stream_window(self) -> int:
        """Requests a stream may have unanswered before it stops reading."""
        return self.settings.stream_max_in_flight

    async def read_streamed(self, read: Callable[[], Awaitable]) -> wire.InferRequest | None:
        """A stream's next request, read once the process has room for a typical one (a stream is never refused
        for memory: it stops reading, and HTTP/2 flow control slows the client); None when the client is done."""
        await self.admission.wait_for_room()
        return await self.admission.read(read)

    async def refusing_begun(self) -> None:
        """Returns when the drain's last phase begins (streams stop reading then)."""
        await self.state.refusing_started.wait()

    # ---------------------------------------------------------------- inference

    async def infer(
        self, received: wire.InferRequest, deadline: float | None, stream: bool = False, span: RequestSpan = NOT_TRACED
    ) -> bytes:
        """One inference, unary or streamed: the serialized ModelInferResponse. A streamed request waits for room
        in a full queue (the stream stops reading meanwhile) instead of being refused. `span`: its trace."""
        start = time.perf_counter()
        request = received.message
        telemetry.request_started()
        mv: ModelVersion | None = None
        held = 0
        try:
            if received.error:
                raise InvalidInput(received.error)
            mv = self.repository.get(request.model_name, request.model_version)
            held = self._hold(mv, received.nbytes)
            decoded = codec.decode_infer_request(request, mv.settings.max_batch_size, received.raw)
            decoded_at = time.perf_counter()
            answer = await mv.batcher.infer(decoded.images, deadline, wait=stream, trace=span.span)
            answered_at = time.perf_counter()
            if decoded.labels is None:
                receipt = self.receipts.issue(mv.name, mv.version, answer.classes)
            else:  # scored now: no receipt to score them again
                receipt = ""
                mv.telemetry.score(answer.classes == decoded.labels)
            response = codec.encode_infer_response(
                request, mv.version, answer.probs, decoded.outputs, receipt, answer.classes
            )
            end = time.perf_counter()
            mv.telemetry.record_success(
                end - start, answer.probs.shape[0], queue_s=answer.queue_s, input_s=decoded_at - start,
                infer_s=answer.run_s, output_s=end - answered_at,
            )  # fmt: skip
            if span.span is not None:
                self._traced(span.span, mv, request, answer, (start, decoded_at, answered_at, end))
            return response
        except BaseException as exc:  # CancelledError included: the client went away
            code, message = status_of(exc)
            if mv is not None:
                mv.telemetry.record_failure(code.name, time.perf_counter() - start)
            if span.span is not None:
                self.tracing.failed(span.span, code, message, mv)
            raise
        finally:
            telemetry.request_ended()
            self.admission.release(held)

    def _traced(self, span, mv: ModelVersion, request, answer: Answer, times: tuple[float, ...]) -> None:
        """A traced request's attributes and timestamps, and (once per run) the span of the run it joined."""
        run = answer.run
        if run.span is None and run.traced:
            run.span = self.tracing.run_span(run, run.traced, mv.name, mv.version, mv.provider)
        read, decoded, resumed, encoded = times
        datatype = request.inputs[0].datatype if request.inputs else ""
        events = {
            "REQUEST_READ": read, "QUEUE_START": decoded, "COMPUTE_START": run.joined, "COMPUTE_END": run.ended,
            "RESUMED": resumed, "RESPONSE_ENCODED": encoded,
        }  # fmt: skip
        self.tracing.request_done(span, request, mv.version, answer.probs.shape[0], datatype, events)

    def _hold(self, mv: ModelVersion, nbytes: int) -> int:
        """Count the request's bytes against the process budget; the bytes held."""
        try:
            self.admission.hold(nbytes)
        except Overloaded:
            mv.telemetry.on_shed("inflight_bytes")
            raise
        return nbytes
