"""The gRPC services: V2 inference protocol and accuracy feedback. Thin: decode, delegate, encode."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import grpc

from serving import __version__, codec, metrics, wire
from serving.admission import Admission
from serving.config import IMAGE_PIXELS, NUM_CLASSES, Settings
from serving.errors import InvalidInput, Overloaded, ServerDraining, grpc_errors, status_of
from serving.feedback import Feedback
from serving.metrics import IN_FLIGHT
from serving.model_control import ModelControl, load_options
from serving.protos import feedback_pb2, feedback_pb2_grpc
from serving.protos import grpc_service_pb2 as pb
from serving.protos import grpc_service_pb2_grpc as pb_grpc
from serving.protos import model_config_pb2 as mc
from serving.receipts import ReceiptKey
from serving.repository import Duration, ModelRepository, ModelVersion

log = logging.getLogger(__name__)

SERVER_NAME = "mnist-serving"
EXTENSIONS = ("model_configuration", "statistics", "model_repository", "parameters")
PLATFORM = codec.PLATFORM
_INPUT_META = pb.ModelMetadataResponse.TensorMetadata(name=codec.INPUT_NAME, datatype="FP32", shape=(-1, IMAGE_PIXELS))
_OUTPUT_META = (
    pb.ModelMetadataResponse.TensorMetadata(name=codec.PROBABILITIES, datatype="FP32", shape=(-1, NUM_CLASSES)),
    pb.ModelMetadataResponse.TensorMetadata(name=codec.PREDICTED_CLASS, datatype="INT64", shape=(-1, 1)),
)


class ServerState:
    """What the RPCs need to know about the process: readiness and drain."""

    def __init__(self) -> None:
        self.draining = False  # SIGTERM received: not ready (health NOT_SERVING), still answering
        # The drain's last moments: new calls get UNAVAILABLE with a retry pushback, streams stop reading.
        self.refusing_started = asyncio.Event()
        self.last_call = 0.0  # time.monotonic() of the latest ModelInfer, refused ones included

    @property
    def refusing(self) -> bool:
        return self.refusing_started.is_set()

    @refusing.setter
    def refusing(self, value: bool) -> None:
        (self.refusing_started.set if value else self.refusing_started.clear)()


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """`inference.GRPCInferenceService`, as Triton and KServe define it."""

    def __init__(
        self,
        repository: ModelRepository,
        settings: Settings,
        state: ServerState,
        receipts: ReceiptKey,
        control: ModelControl | None = None,
    ) -> None:
        self.repository = repository
        self.control = control or ModelControl(repository, settings)
        self.settings = settings
        self.state = state
        self.receipts = receipts
        self.admission = Admission(settings.max_inflight_bytes)

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.repository.ready and not self.state.draining)

    async def ModelReady(self, request, context):
        try:
            self.repository.get(request.name, request.version)
        except Exception:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=not self.state.draining)

    async def ServerMetadata(self, request, context):
        providers = sorted({mv.provider for mv in self.repository.versions()})
        # The provider really in use is part of the version string: a silent CUDA->CPU fallback shows here.
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=f"{__version__} ({', '.join(providers)})", extensions=EXTENSIONS
        )

    @grpc_errors
    async def ModelMetadata(self, request, context):
        mv = self.repository.get(request.name, request.version)
        versions = sorted(self.repository.models[mv.name], reverse=True)
        return pb.ModelMetadataResponse(
            name=mv.name,
            versions=[str(v) for v in versions],
            platform=f"{PLATFORM}:{mv.provider}",
            inputs=[_INPUT_META],
            outputs=_OUTPUT_META,
        )

    @grpc_errors
    async def ModelConfig(self, request, context):
        mv = self.repository.get(request.name, request.version)
        return pb.ModelConfigResponse(config=model_config(mv, mv.settings))

    @grpc_errors
    async def ModelStatistics(self, request, context):
        if request.name:
            versions = [self.repository.get(request.name, request.version)]
        else:
            versions = self.repository.versions()
        return pb.ModelStatisticsResponse(model_stats=[model_statistics(mv) for mv in versions])

    @grpc_errors
    async def RepositoryIndex(self, request, context):
        entries = await self.repository.index()
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(name=e.name, version=e.version, state=e.state, reason=e.reason)
                for e in entries
                if e.state == "READY" or not request.ready
            ]
        )

    @grpc_errors
    async def RepositoryModelLoad(self, request, context):
        self.control.authorize(context.invocation_metadata())
        await self.control.load(request.model_name, load_options(request.parameters))
        return pb.RepositoryModelLoadResponse()

    @grpc_errors
    async def RepositoryModelUnload(self, request, context):
        self.control.authorize(context.invocation_metadata())
        await self.control.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    @grpc_errors
    async def ModelInfer(self, requests, context):
        """Registered stream-unary (the same bytes on the wire as unary, see add_inference_service), so that
        the request is read only once admitted: one refused for memory is never copied into the process."""
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        self._refuse_if_draining()  # before reading: a refused call costs nothing
        return await self.infer(await self._read_admitted(context), deadline)

    def _refuse_if_draining(self) -> None:
        self.state.last_call = time.monotonic()  # refused calls too: the drain waits for quiet
        if self.state.refusing:
            raise ServerDraining("server is shutting down; retry on another replica")

    async def _read_admitted(self, context) -> wire.InferRequest:
        try:
            self.admission.before_read()
        except Overloaded:
            # Not read, so its model is unknown: counted without model and version.
            metrics.SHED.labels("", "", "inflight_bytes").inc()
            metrics.REQUESTS.labels("", "", grpc.StatusCode.RESOURCE_EXHAUSTED.name).inc()
            raise
        received = await self.admission.read(context.read, end=grpc.aio.EOF)
        if received is None:
            raise InvalidInput("ModelInfer call without a request message")
        return received

    async def ModelStreamInfer(self, request_iterator, context):
        """Triton's bidirectional stream: each request answered (in completion order) with its id echoed."""
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        stream = InferStream(self, request_iterator, deadline)
        async for response in stream.responses():
            yield response
        if stream.cut_by_drain:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "server is shutting down; reopen the stream on another replica"
            )

    async def infer(self, received: wire.InferRequest, deadline: float | None, stream: bool = False) -> bytes:
        """One inference, unary or streamed: decode, batch, encode; metrics and statistics for both. A streamed
        request waits for room in a full queue (the stream stops reading meanwhile) instead of being refused."""
        start = time.perf_counter()
        request = received.message
        IN_FLIGHT.inc()
        mv: ModelVersion | None = None
        size = 0
        try:
            self._refuse_if_draining()
            if received.error:
                raise InvalidInput(received.error)
            mv = self.repository.get(request.model_name, request.model_version)
            try:
                self.admission.hold(received.nbytes)
            except Overloaded:
                mv.on_shed("inflight_bytes")
                raise
            size = received.nbytes
            decoded = codec.decode_infer_request(request, mv.settings.max_batch_size, received.raw)
            decoded_at = time.perf_counter()
            answer = await mv.batcher.infer(decoded.images, deadline, wait=stream)
            answered_at = time.perf_counter()
            if decoded.labels is not None:
                mv.score(answer.classes == decoded.labels)
            # Labels attached to the request are scored already: no receipt to score them again.
            receipt = "" if decoded.labels is not None else self.receipts.issue(mv.name, mv.version, answer.classes)
            response = codec.encode_infer_response(
                request, mv.version, answer.probs, decoded.outputs, receipt, answer.classes
            )
            end = time.perf_counter()
            mv.record_success(
                end - start, answer.probs.shape[0], answer.queue_s, decoded_at - start, answer.run_s, end - answered_at
            )
            return response
        except asyncio.CancelledError:
            if mv is not None:
                mv.record_failure("CANCELLED", time.perf_counter() - start)
            raise
        except BaseException as exc:
            if mv is not None:
                mv.record_failure(status_of(exc)[0].name, time.perf_counter() - start)
            raise
        finally:
            IN_FLIGHT.dec()
            self.admission.release(size)


class InferStream:
    """One ModelStreamInfer call: reads requests while at most `stream_max_in_flight` are unanswered (then
    stops reading, so HTTP/2 flow control slows the client), answers each as it completes, a bad request
    with `error_message`; on drain stops reading and answers what it accepted."""

    def __init__(self, servicer: InferenceServicer, requests, deadline: float | None) -> None:
        self.servicer, self.requests, self.deadline = servicer, requests, deadline
        self.window = asyncio.Semaphore(servicer.settings.stream_max_in_flight)
        self.answers: asyncio.Queue[bytes | pb.ModelStreamInferResponse | None] = asyncio.Queue()
        self.tasks: set[asyncio.Task] = set()
        self.reading = True
        self.cut_by_drain = False  # the drain stopped the reading: the stream ends UNAVAILABLE

    async def responses(self):
        reader = asyncio.create_task(self._read())
        watcher = asyncio.create_task(self._stop_reading_on_drain(reader))
        try:
            while (answer := await self.answers.get()) is not None:
                yield answer
        finally:
            watcher.cancel()
            reader.cancel()
            for task in self.tasks:
                task.cancel()

    async def _stop_reading_on_drain(self, reader: asyncio.Task) -> None:
        await self.servicer.state.refusing_started.wait()
        if self.reading:  # a client that already closed its side just gets its answers and OK
            self.cut_by_drain = True
            reader.cancel()

    async def _read(self) -> None:
        admission = self.servicer.admission
        requests = aiter(self.requests)
        try:
            while True:
                await self.window.acquire()
                # NOTE: a stream is never refused for memory: it stops reading (HTTP/2 flow control slows the
                # client) until the process has room for a typical request.
                await admission.wait_for_room()
                request = await admission.read(lambda: anext(requests, None))
                if request is None:  # the client closed its side
                    break
                task = asyncio.create_task(self._answer(request))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        except asyncio.CancelledError:
            pass  # drain or the call ended: accept nothing more, answer what was accepted
        self.reading = False
        while self.tasks:
            await asyncio.wait(list(self.tasks))
        self.answers.put_nowait(None)

    async def _answer(self, received: wire.InferRequest) -> None:
        request = received.message
        try:
            response = wire.stream_response(await self.servicer.infer(received, self.deadline, stream=True))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            code, message = status_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("unexpected failure in ModelStreamInfer")
            response = pb.ModelStreamInferResponse(
                error_message=f"{code.name}: {message}",
                infer_response=pb.ModelInferResponse(
                    model_name=request.model_name, model_version=request.model_version, id=request.id
                ),
            )
        finally:
            self.window.release()
        self.answers.put_nowait(response)


def add_inference_service(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """Register the generated GRPCInferenceService handlers, except that ModelInfer and ModelStreamInfer read
    their requests with serving.wire (raw tensor bytes by reference, no copies): the handlers get InferRequests."""
    captured = _Registration()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, captured)
    handlers = dict(captured.handlers)
    handlers["ModelStreamInfer"] = handlers["ModelStreamInfer"]._replace(
        request_deserializer=wire.parse_infer_request, response_serializer=wire.serialize
    )
    # Clients call ModelInfer as unary; served as stream-unary (identical on the wire) the handler decides
    # whether to read the request at all (ModelInfer above).
    handlers["ModelInfer"] = grpc.stream_unary_rpc_method_handler(
        servicer.ModelInfer,
        request_deserializer=wire.parse_infer_request,
        response_serializer=wire.serialize,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(captured.service, handlers),))
    server.add_registered_method_handlers(captured.service, handlers)


class _Registration:
    """Stands in for the server to catch the generated code's method handlers."""

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service, self.handlers = service, handlers


class FeedbackServicer(feedback_pb2_grpc.FeedbackServiceServicer):
    """Ground truth for earlier answers, scored against their signed receipts (online accuracy)."""

    def __init__(self, feedback: Feedback) -> None:
        self.feedback = feedback

    @grpc_errors
    async def SendFeedback(self, request, context):
        f = codec.decode_feedback_request(request)
        result = self.feedback.score(f.receipt, f.indexes, f.labels, f.model, f.version)
        return feedback_pb2.FeedbackResponse(matched=result.matched, correct=result.correct, duplicate=result.duplicate)


def model_config(mv: ModelVersion, settings: Settings) -> mc.ModelConfig:
    """Triton's ModelConfig for a version: batch dimension implicit (max_batch_size > 0)."""
    return mc.ModelConfig(
        name=mv.name,
        platform=PLATFORM,
        backend="onnxruntime",
        max_batch_size=settings.max_batch_size,
        input=codec.MODEL_INPUTS,
        output=codec.MODEL_OUTPUTS,
        dynamic_batching=mc.ModelDynamicBatching(max_queue_delay_microseconds=settings.max_queue_delay_us),
        instance_group=[
            mc.ModelInstanceGroup(
                count=settings.instance_count,
                kind=mc.ModelInstanceGroup.KIND_GPU if "CUDA" in mv.provider else mc.ModelInstanceGroup.KIND_CPU,
            )
        ],
        parameters={
            "execution_provider": mc.ModelParameter(string_value=mv.provider),
            # Where onnxruntime runs every node, per input type: {"FP32": {"CPUExecutionProvider": ["Gemm", ...]}}.
            "node_placement": mc.ModelParameter(string_value=json.dumps(mv.model.placement, sort_keys=True)),
        },
    )


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def model_statistics(mv: ModelVersion) -> pb.ModelStatistics:
    s = mv.stats
    return pb.ModelStatistics(
        name=mv.name,
        version=mv.version,
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(s.success),
            fail=_duration(s.fail),
            queue=_duration(s.queue),
            compute_input=_duration(s.compute_input),
            compute_infer=_duration(s.compute_infer),
            compute_output=_duration(s.compute_output),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=size,
                compute_input=_duration(b.compute_input),
                compute_infer=_duration(b.compute_infer),
                compute_output=_duration(b.compute_output),
            )
            for size, b in sorted(s.batches.items())
        ],
    )
