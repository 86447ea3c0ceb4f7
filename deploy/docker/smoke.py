"""Image build smoke test: the installed server loads a model and answers over gRPC, with only the image's packages.

The build context holds no trained model, so this writes one with random weights and the real model's interface
(input [N,784] -> Dense 512 relu -> Dense 10 softmax), then starts the real server on loopback (CPU provider:
there is no GPU at build time), sends FP32 and UINT8 requests and checks the health service. Exit 0 or a
traceback: a missing runtime dependency (onnx for the UINT8 variant, say) fails the build, not the pod.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

import grpc
import numpy as np


def write_model(path: Path) -> None:
    """A random-weight MLP with the served model's input/output names and shapes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.normal(0, 0.05, (784, 512)).astype(np.float32),
        "b1": np.zeros(512, np.float32),
        "w2": rng.normal(0, 0.05, (512, 10)).astype(np.float32),
        "b2": np.zeros(10, np.float32),
    }
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["input", "w1", "b1"], ["h"]),
            helper.make_node("Relu", ["h"], ["hr"]),
            helper.make_node("Gemm", ["hr", "w2", "b2"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "smoke",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 784])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True)
    path.write_bytes(model.SerializeToString())


async def smoke(repository: Path) -> str:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from serving.client import infer_request, probabilities
    from serving.config import Settings
    from serving.protos import grpc_service_pb2_grpc as pb_grpc
    from serving.server import InferenceServer

    settings = Settings(model_repository=repository, grpc_port=0, metrics_port=0, device="cpu", drain_delay_s=0)
    server = InferenceServer(settings)
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING, health
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            images = np.random.default_rng(1).integers(0, 256, (4, 784), dtype=np.uint8)
            answers = [
                probabilities(await stub.ModelInfer(infer_request(images, "mnist", datatype=d), timeout=10))
                for d in ("UINT8", "FP32")
            ]
        for probs in answers:
            assert probs.shape == (4, 10) and np.allclose(probs.sum(axis=1), 1, atol=1e-5), probs
        assert np.allclose(answers[0], answers[1], atol=1e-6), "UINT8 and FP32 answers differ"
        return (
            f"smoke test passed: mnist/1 loaded on {server.repository.versions()[0].provider}, FP32 and UINT8 answered"
        )
    finally:
        await server.stop(grace=0, delay=0)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp) / "models"
        write_model(repository / "mnist" / "1" / "model.onnx")
        sys.stdout.write(asyncio.run(smoke(repository)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
