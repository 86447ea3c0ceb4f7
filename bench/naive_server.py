"""Naive V2 gRPC server: one onnxruntime run per request, inside the handler (the reference to beat)."""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort

from bench.common import find_model
from bench.nocompute_server import NoComputeServicer, parser, run
from serving.protos import grpc_service_pb2 as pb

_DTYPES = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1")}


class NaiveServicer(NoComputeServicer):
    """ModelInfer decodes the input and calls session.run on the event loop: no batching, no offload."""

    platform = "onnxruntime_onnx"

    def __init__(self, model_path: str, intra_op_threads: int = 0) -> None:
        super().__init__()
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        self.session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def probabilities(self, request: pb.ModelInferRequest) -> tuple[int, bytes]:
        tensor = request.inputs[0]
        x = np.frombuffer(request.raw_input_contents[0], dtype=_DTYPES[tensor.datatype]).reshape(-1, 784)
        if x.dtype != np.float32:
            x = x.astype(np.float32) / np.float32(255.0)
        probs = self.session.run(None, {self.input_name: x})[0]
        return len(x), np.ascontiguousarray(probs, dtype="<f4").tobytes()


class _Factory:
    def __init__(self, model_path: str, threads: int) -> None:
        self.model_path, self.threads = model_path, threads

    def __call__(self) -> NaiveServicer:
        return NaiveServicer(self.model_path, self.threads)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--model-repository", default="model_repository")
    p.add_argument("--intra-op-threads", type=int, default=0)
    args = p.parse_args(argv)
    return run(_Factory(str(find_model(args.model_repository)), args.intra_op_threads), args)


if __name__ == "__main__":
    sys.exit(main())
