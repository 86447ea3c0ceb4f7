"""The gRPC services: V2 inference protocol and accuracy feedback. Thin: message in, data plane, message out."""

from __future__ import annotations

import time

import grpc

from serving import __version__, codec, wire
from serving.dataplane import DataPlane
from serving.errors import ServerDraining, grpc_errors
from serving.feedback import Feedback
from serving.model_control import ModelControl, load_options
from serving.protos import feedback_pb2, feedback_pb2_grpc
from serving.protos import grpc_service_pb2 as pb
from serving.protos import grpc_service_pb2_grpc as pb_grpc
from serving.stream import InferStream
from serving.tracing import NOT_TRACED

SERVER_NAME = "mnist-serving"
EXTENSIONS = ("model_configuration", "statistics", "model_repository", "parameters")


def _deadline(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """`inference.GRPCInferenceService`, as Triton and KServe define it."""

    def __init__(self, plane: DataPlane, control: ModelControl) -> None:
        self.plane = plane
        self.control = control

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.plane.ready())

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.plane.model_ready(request.name, request.version))

    async def ServerMetadata(self, request, context):
        # The provider really in use is part of the version string: a silent CUDA->CPU fallback shows here.
        version = f"{__version__} ({', '.join(self.plane.providers())})"
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=version, extensions=EXTENSIONS)

    @grpc_errors
    async def ModelMetadata(self, request, context):
        return self.plane.metadata(request.name, request.version)

    @grpc_errors
    async def ModelConfig(self, request, context):
        return pb.ModelConfigResponse(config=self.plane.config(request.name, request.version))

    @grpc_errors
    async def ModelStatistics(self, request, context):
        return pb.ModelStatisticsResponse(model_stats=self.plane.statistics(request.name, request.version))

    @grpc_errors
    async def RepositoryIndex(self, request, context):
        models = [
            pb.RepositoryIndexResponse.ModelIndex(name=e.name, version=e.version, state=e.state, reason=e.reason)
            for e in await self.plane.index(request.ready)
        ]
        return pb.RepositoryIndexResponse(models=models)

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
    async def ModelInfer(self, requests, context, span=NOT_TRACED):
        """Registered stream-unary (the same bytes on the wire as unary, see add_inference_service), so that
        the request is read only once admitted: one refused for memory is never copied into the process."""
        deadline = _deadline(context)
        await self.plane.refuse_new_call(deadline)  # before reading: a refused call is never read
        received = await self.plane.read_admitted(context.read, grpc.aio.EOF)
        return await self.plane.infer(received, deadline, span=span)

    async def traced_model_infer(self, requests, context):
        """ModelInfer in its request span, registered in ModelInfer's place when tracing is on (off, a call takes
        no extra step). The span is current around the error mapping, so its log lines carry the trace id."""
        with self.plane.trace("ModelInfer", context.invocation_metadata()) as span:
            span.context = context
            return await self.ModelInfer(requests, context, span)

    async def ModelStreamInfer(self, request_iterator, context):
        """Triton's bidirectional stream: each request answered (in completion order) with its id echoed."""
        try:
            await self.plane.refuse_new_call(_deadline(context))
        except ServerDraining as exc:
            await context.abort(exc.code, str(exc), trailing_metadata=exc.trailers)
        stream = InferStream(self.plane, request_iterator, _deadline(context), context.invocation_metadata())
        async for response in stream.responses():
            yield response
        if stream.cut_by_drain:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "server is shutting down; reopen the stream on another replica"
            )


def add_inference_service(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """Register GRPCInferenceService: the generated handlers, except that ModelInfer and ModelStreamInfer read
    their requests with serving.wire (raw tensor bytes by reference, no copies): the handlers get InferRequests."""

    def adapt(handlers: dict) -> dict:
        handlers["ModelStreamInfer"] = handlers["ModelStreamInfer"]._replace(
            request_deserializer=wire.parse_infer_request, response_serializer=wire.serialize
        )
        # Clients call ModelInfer as unary; served as stream-unary (identical on the wire) the handler decides
        # whether to read the request at all (ModelInfer above).
        handlers["ModelInfer"] = grpc.stream_unary_rpc_method_handler(
            servicer.ModelInfer if servicer.plane.tracing is None else servicer.traced_model_infer,
            request_deserializer=wire.parse_infer_request,
            response_serializer=wire.serialize,
        )
        return handlers

    add_generic(pb_grpc.add_GRPCInferenceServiceServicer_to_server, servicer, server, adapt)


def add_generic(add_to_server, servicer, server: grpc.aio.Server, adapt=None) -> None:
    """Register a service through the generated `add_..._to_server`, as a generic handler only.

    NOTE: grpcio 1.85's accept loop waits on one future per registered method (plus one for generic handlers)
    for every call and re-arms one each time (17 here). As generic handlers only, every call comes through the
    one generic future: with uvloop 0.90x the CPU per request of the no-compute server, no measurable change for
    this one (bench/README.md, "Request path"); kept, as it costs nothing."""
    captured = _Registration()
    add_to_server(servicer, captured)
    handlers = dict(captured.handlers)
    if adapt is not None:
        handlers = adapt(handlers)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(captured.service, handlers),))


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
