"""KServe 0.21 ModelServer: the same model.onnx on onnxruntime CPU (runs inside the KServe venv only).

python kserve_server.py --model-onnx PATH --grpc-port P --http-port Q
"""

import argparse

import grpc
import numpy as np
import onnxruntime as ort
import uvicorn
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer

# KServe binds [::] (gRPC) and 0.0.0.0 (HTTP) unconditionally; the benchmark serves on loopback only.
_add_port = grpc.aio._server.Server.add_insecure_port
grpc.aio._server.Server.add_insecure_port = lambda self, address: _add_port(
    self, address.replace("[::]:", "127.0.0.1:")
)
_config_init = uvicorn.Config.__init__
uvicorn.Config.__init__ = lambda self, *a, **kw: _config_init(self, *a, **{**kw, "host": "127.0.0.1"})


class OnnxMnist(Model):
    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.ready = True

    def predict(self, payload: InferRequest, headers=None) -> InferResponse:
        x = payload.inputs[0].as_numpy().astype(np.float32).reshape(-1, 784)
        probs = self.session.run(None, {self.input_name: x})[0]
        out = InferOutput(name="probabilities", shape=list(probs.shape), datatype="FP32")
        out.set_data_from_numpy(probs)
        return InferResponse(model_name=self.name, infer_outputs=[out], response_id=payload.id)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--model-onnx", required=True)
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--http-port", type=int, required=True)
    a = p.parse_args()
    ModelServer(grpc_port=a.grpc_port, http_port=a.http_port, workers=1).start([OnnxMnist("mnist", a.model_onnx)])
