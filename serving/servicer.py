"""The gRPC services: V2 inference protocol and accuracy feedback. Thin: decode, delegate, encode."""

from __future__ import annotations

import asyncio
import time

from serving import __version__, codec
from serving.config import IMAGE_PIXELS, NUM_CLASSES, Settings
from serving.errors import Overloaded, ServerDraining, grpc_errors, status_of
from serving.feedback import Feedback
from serving.metrics import IN_FLIGHT
from serving.protos import feedback_pb2, feedback_pb2_grpc
from serving.protos import grpc_service_pb2 as pb
from serving.protos import grpc_service_pb2_grpc as pb_grpc
from serving.protos import model_config_pb2 as mc
from serving.receipts import ReceiptKey
from serving.repository import Duration, ModelRepository, ModelVersion

SERVER_NAME = "mnist-serving"
EXTENSIONS = ("model_configuration", "statistics", "model_repository", "parameters")
PLATFORM = "onnxruntime_onnx"
_INPUT_META = pb.ModelMetadataResponse.TensorMetadata(name=codec.INPUT_NAME, datatype="FP32", shape=(-1, IMAGE_PIXELS))
_OUTPUT_META = (
    pb.ModelMetadataResponse.TensorMetadata(name=codec.PROBABILITIES, datatype="FP32", shape=(-1, NUM_CLASSES)),
    pb.ModelMetadataResponse.TensorMetadata(name=codec.PREDICTED_CLASS, datatype="INT64", shape=(-1, 1)),
)


class ServerState:
    """What the RPCs need to know about the process: readiness and drain."""

    def __init__(self) -> None:
        self.draining = False  # SIGTERM received: not ready (health NOT_SERVING), still answering
        self.refusing = False  # the drain's last moments: new calls get UNAVAILABLE with a retry pushback
        self.last_call = 0.0  # time.monotonic() of the latest ModelInfer, refused ones included
        self.in_flight_bytes = 0  # serialized size of the ModelInfer requests inside a handler


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """`inference.GRPCInferenceService`, as Triton and KServe define it."""

    def __init__(
        self, repository: ModelRepository, settings: Settings, state: ServerState, receipts: ReceiptKey
    ) -> None:
        self.repository = repository
        self.settings = settings
        self.state = state
        self.receipts = receipts

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
        return pb.ModelConfigResponse(config=model_config(mv, self.settings))

    @grpc_errors
    async def ModelStatistics(self, request, context):
        if request.name:
            versions = [self.repository.get(request.name, request.version)]
        else:
            versions = self.repository.versions()
        return pb.ModelStatisticsResponse(model_stats=[model_statistics(mv) for mv in versions])

    @grpc_errors
    async def RepositoryIndex(self, request, context):
        models = [
            pb.RepositoryIndexResponse.ModelIndex(name=mv.name, version=mv.version, state="READY")
            for mv in self.repository.versions()
        ]
        if not request.ready:
            models += [
                pb.RepositoryIndexResponse.ModelIndex(name=n, version=str(v), state="UNAVAILABLE", reason=why)
                for (n, v), why in self.repository.failed.items()
            ]
        return pb.RepositoryIndexResponse(models=models)

    @grpc_errors
    async def ModelInfer(self, request, context):
        start = time.perf_counter()
        IN_FLIGHT.inc()
        self.state.last_call = time.monotonic()
        mv: ModelVersion | None = None
        code, images, size = "OK", 0, 0
        try:
            if self.state.refusing:
                raise ServerDraining("server is shutting down; retry on another replica")
            mv = self.repository.get(request.model_name, request.model_version)
            size = self._admit(request, mv)
            decoded = codec.decode_infer_request(request, self.settings.max_batch_size)
            images = decoded.images.shape[0]
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            probs = await mv.batcher.infer(decoded.images, deadline)
            classes = probs.argmax(axis=1)
            mv.record_answers(probs, classes, decoded.labels)
            # Labels attached to the request are scored already: no receipt to score them again.
            receipt = "" if decoded.labels is not None else self.receipts.issue(mv.name, mv.version, classes)
            return codec.encode_infer_response(request, mv.version, probs, decoded.outputs, receipt, classes)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except BaseException as exc:
            code = status_of(exc)[0].name
            raise
        finally:
            IN_FLIGHT.dec()
            self.state.in_flight_bytes -= size
            if mv is not None:
                mv.record_request(code, time.perf_counter() - start, images)

    def _admit(self, request, mv: ModelVersion) -> int:
        """Count the request's bytes in flight, or refuse it (before decoding copies it) when over the limit."""
        size = request.ByteSize()
        held = self.state.in_flight_bytes
        if held and held + size > self.settings.max_inflight_bytes:  # one request alone is always admitted
            mv.on_shed("inflight_bytes")
            raise Overloaded(
                f"server memory bound: {held >> 20} MiB of requests in flight, limit "
                f"{self.settings.max_inflight_bytes >> 20} MiB; retry later"
            )
        self.state.in_flight_bytes = held + size
        return size


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
        input=[mc.ModelInput(name=codec.INPUT_NAME, data_type=mc.TYPE_FP32, dims=[IMAGE_PIXELS])],
        output=[
            mc.ModelOutput(name=codec.PROBABILITIES, data_type=mc.TYPE_FP32, dims=[NUM_CLASSES]),
            mc.ModelOutput(name=codec.PREDICTED_CLASS, data_type=mc.TYPE_INT64, dims=[1]),
        ],
        dynamic_batching=mc.ModelDynamicBatching(max_queue_delay_microseconds=settings.max_queue_delay_us),
        instance_group=[
            mc.ModelInstanceGroup(
                count=1,
                kind=mc.ModelInstanceGroup.KIND_GPU if "CUDA" in mv.provider else mc.ModelInstanceGroup.KIND_CPU,
            )
        ],
        parameters={"execution_provider": mc.ModelParameter(string_value=mv.provider)},
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
            compute_infer=_duration(s.compute_infer),
        ),
        batch_stats=[
            pb.InferBatchStatistics(batch_size=size, compute_infer=_duration(d))
            for size, d in sorted(s.batches.items())
        ],
    )
