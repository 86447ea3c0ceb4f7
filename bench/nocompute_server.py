"""No-compute V2 gRPC server (grpc.aio): a constant answer, no model; the ceiling for a Python gRPC server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import signal
import sys

import grpc
import numpy as np

from serving.protos import grpc_service_pb2 as pb
from serving.protos import grpc_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

CONSTANT_CLASS = 1
# A fixed distribution whose argmax is CONSTANT_CLASS: accuracy of its answers is P(label == 1).
CONSTANT_PROBS = np.full(10, 0.05, dtype="<f4")
CONSTANT_PROBS[CONSTANT_CLASS] = 0.55
MAX_MESSAGE_BYTES = 64 << 20


class NoComputeServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Readiness, metadata, config and (empty) statistics for perf_analyzer, plus ModelInfer and
    ModelStreamInfer answering every image with CONSTANT_PROBS."""

    platform = "none"

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self._raw: dict[int, bytes] = {}

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=request.name == "mnist")

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="nocompute", version="0", extensions=["statistics"])

    async def ModelMetadata(self, request, context):
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name="mnist",
            versions=["1"],
            platform=self.platform,
            inputs=[tensor(name="input", datatype="FP32", shape=[-1, 784])],
            outputs=[tensor(name="probabilities", datatype="FP32", shape=[-1, 10])],
        )

    async def ModelConfig(self, request, context):
        from serving.protos import model_config_pb2 as mc

        return pb.ModelConfigResponse(
            config=mc.ModelConfig(
                name="mnist",
                max_batch_size=1024,
                input=[mc.ModelInput(name="input", data_type=mc.TYPE_FP32, dims=[784])],
                output=[mc.ModelOutput(name="probabilities", data_type=mc.TYPE_FP32, dims=[10])],
            )
        )

    async def ModelStatistics(self, request, context):
        return pb.ModelStatisticsResponse(model_stats=[pb.ModelStatistics(name="mnist", version="1")])

    async def ModelStreamInfer(self, request_iterator, context):
        async for request in request_iterator:
            yield pb.ModelStreamInferResponse(infer_response=await self.ModelInfer(request, context))

    def probabilities(self, request: pb.ModelInferRequest) -> tuple[int, bytes]:
        """(N, raw FP32 [N,10] bytes) for the request."""
        n = request.inputs[0].shape[0] if request.inputs and request.inputs[0].shape else 1
        raw = self._raw.get(n)
        if raw is None:
            raw = self._raw[n] = np.tile(CONSTANT_PROBS, n).tobytes()
        return n, raw

    async def ModelInfer(self, request, context):
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        n, raw = self.probabilities(request)
        return pb.ModelInferResponse(
            model_name=request.model_name,
            model_version="1",
            id=request.id,
            outputs=[pb.ModelInferResponse.InferOutputTensor(name="probabilities", datatype="FP32", shape=[n, 10])],
            raw_output_contents=[raw],
        )


async def serve(
    servicer: pb_grpc.GRPCInferenceServiceServicer, host: str, port: int, reuseport: bool, tuned: bool = False
) -> None:
    """Serve until SIGTERM/SIGINT; `tuned`: registered as the real server registers its services."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 1 if reuseport else 0),
        ]
    )
    if tuned:
        from serving.servicer import add_generic

        add_generic(pb_grpc.add_GRPCInferenceServiceServicer_to_server, servicer, server)
    else:
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise SystemExit(f"cannot listen on {host}:{port}")
    await server.start()
    log.info("%s listening on %s:%d (pid %d)", type(servicer).__name__, host, bound, os.getpid())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", "--grpc-port", type=int, required=True)
    p.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    p.add_argument("--log-level", default="WARNING")
    p.add_argument(
        "--tuned", action="store_true", help="the real server's transport choices: uvloop, generic handlers only"
    )
    return p


def _worker(make_servicer, host: str, port: int, reuseport: bool, level: str, tuned: bool = False) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s")
    from serving.lifecycle import loop_factory

    with asyncio.Runner(loop_factory=loop_factory("uvloop" if tuned else "asyncio")) as runner:
        runner.run(serve(make_servicer(), host, port, reuseport, tuned))


def run(make_servicer, args: argparse.Namespace) -> int:
    """One process, or `--workers` spawned processes on one port; SIGTERM stops them all."""
    if args.workers <= 1:
        _worker(make_servicer, args.host, args.port, False, args.log_level, args.tuned)
        return 0
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_worker, args=(make_servicer, args.host, args.port, True, args.log_level, args.tuned))
        for _ in range(args.workers)
    ]
    signal.signal(signal.SIGTERM, lambda *_: [os.kill(p.pid, signal.SIGTERM) for p in procs if p.is_alive()])
    signal.signal(signal.SIGINT, signal.getsignal(signal.SIGTERM))
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return max((p.exitcode or 0) for p in procs)


class _Factory:
    """Picklable servicer factory (spawned workers build their own servicer)."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def __call__(self) -> NoComputeServicer:
        return NoComputeServicer(self.delay_s)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--delay-ms", type=float, default=0.0, help="sleep this long (asyncio) before each answer")
    args = p.parse_args(argv)
    return run(_Factory(args.delay_ms / 1000.0), args)


if __name__ == "__main__":
    sys.exit(main())
