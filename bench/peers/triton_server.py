"""NVIDIA Triton (tritonserver from PyTriton 0.7): the same model.onnx on onnxruntime CPU (runs inside the Triton venv).

python triton_server.py --model-onnx PATH --grpc-port P --http-port Q --metrics-port R --workspace DIR

PyTriton runs the real tritonserver binary as a child process; the model is a Triton Python-backend model whose stub
hands each batch (from Triton's dynamic batcher) over a Unix socket and shared memory to the @batch function below,
which runs in this process. Every endpoint binds 127.0.0.1. SIGTERM or SIGINT stops tritonserver and exits 0.
"""

import argparse
import logging
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonLifecyclePolicy

MAX_BATCH_SIZE = 1024


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--model-onnx", required=True)
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--workspace", type=Path, required=True, help="created afresh (PyTriton refuses an existing one)")
    return p.parse_args()


def _infer_function(model_onnx: str):
    """The model on onnxruntime CPU, one intra-op thread, as PyTriton's batched inference function."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model_onnx, sess_options=options, providers=["CPUExecutionProvider"])

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        x = inputs["input"].astype(np.float32, copy=False).reshape(-1, 784)
        return {"probabilities": session.run(None, {"input": x})[0]}

    return infer


def main() -> int:
    a = _args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    infer = _infer_function(a.model_onnx)
    shutil.rmtree(a.workspace, ignore_errors=True)
    a.workspace.parent.mkdir(parents=True, exist_ok=True)
    config = TritonConfig(
        grpc_address="127.0.0.1", grpc_port=a.grpc_port,
        http_address="127.0.0.1", http_port=a.http_port,
        metrics_address="127.0.0.1", metrics_port=a.metrics_port,
        allow_gpu_metrics=False, exit_timeout_secs=3,
    )  # fmt: skip
    # The model is written to the model store before tritonserver starts (which loads it at start): the server's
    # ServerReady only turns true once "mnist" is loaded. With the default policy tritonserver starts empty and is
    # ready before PyTriton loads the model, so a client waiting on ServerReady would race the model load.
    policy = TritonLifecyclePolicy(launch_triton_on_startup=False, local_model_store=True)
    # Triton.serve() stops tritonserver on KeyboardInterrupt: SIGTERM takes the same path as SIGINT.
    signalled: list[int] = []

    def interrupt(signum, _frame):
        if not signalled:  # a second signal must not interrupt the stop the first one started
            signalled.append(signum)
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    triton = Triton(config=config, workspace=a.workspace, triton_lifecycle_policy=policy)
    try:
        triton.bind(
            model_name="mnist",
            infer_func=infer,
            inputs=[Tensor(name="input", dtype=np.float32, shape=(784,))],
            outputs=[Tensor(name="probabilities", dtype=np.float32, shape=(10,))],
            config=ModelConfig(max_batch_size=MAX_BATCH_SIZE, batcher=DynamicBatcher(max_queue_delay_microseconds=0)),
        )
        triton.serve()  # returns after SIGINT/SIGTERM (having stopped tritonserver) or when tritonserver dies
    except KeyboardInterrupt:  # a signal before serve() took over
        pass
    finally:
        triton.stop()
    if not signalled:
        logging.error("tritonserver or the model's stub exited unasked")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
