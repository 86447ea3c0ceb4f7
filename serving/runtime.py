"""onnxruntime sessions: choose the execution provider, report the one really in use, run batches."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving.config import IMAGE_PIXELS, NUM_CLASSES, Settings
from serving.errors import StartupError
from serving.iobinding import BoundSession
from training.data import PIXEL_SCALE

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_dlls_preloaded = False


def requested_providers(settings: Settings) -> list:
    """Providers to ask onnxruntime for, best first."""
    global _dlls_preloaded
    if settings.device == "cpu":
        return [CPU]
    if not _dlls_preloaded and hasattr(ort, "preload_dlls"):
        # Loads the CUDA/cuDNN libraries shipped in pip wheels; harmless on a CPU-only build.
        try:
            ort.preload_dlls()
        except Exception as exc:  # a missing optional DLL must not stop a CPU server
            log.warning("onnxruntime.preload_dlls() failed: %s", exc)
        _dlls_preloaded = True
    if CUDA not in ort.get_available_providers():
        if settings.device == "cuda" or settings.require_gpu:
            log.warning("CUDA requested but this onnxruntime build has no %s", CUDA)
        return [CPU]
    options = {"device_id": settings.cuda_device_id}
    if settings.cuda_graphs:
        options["enable_cuda_graph"] = "1"
    if settings.require_gpu:
        return [(CUDA, options)]  # no CPU provider: OnnxModel then forbids any node falling back to CPU
    return [(CUDA, options), CPU]


def uses_io_binding(settings: Settings, provider: str) -> bool:
    """IO binding as set; `auto` (and CUDA graphs, which need it) turn it on when CUDA really runs."""
    if settings.io_binding == "on":
        return True
    on_cuda = provider == CUDA
    return on_cuda and (settings.io_binding == "auto" or settings.cuda_graphs)


def intra_op_threads(settings: Settings) -> int:
    """Threads per session: as set, else the cores left once each worker's event loop has one, shared by the
    workers' execution threads (at least 1)."""
    if settings.intra_op_threads:
        return settings.intra_op_threads
    # NOTE: the event loop and gRPC's threads keep a core busy under load; onnxruntime threads beyond the other
    # cores fight them for it (2 cores, c=32 batch 1: 455-464 vs 495-517 us of CPU per request with 2 threads;
    # batch 256 c=2: 150k vs 124k images/s).
    cores = len(os.sched_getaffinity(0))
    return max(1, (cores - settings.workers) // (settings.workers * settings.instance_count))


def with_uint8_input(model_bytes: bytes) -> bytes:
    """The same model taking UINT8 pixels [N,784]: `Cast` to float and `Div` by 255 inside the graph.

    Exactly the training scaling (`x.astype(float32) / 255`, both IEEE divisions), but the conversion runs in
    onnxruntime on the execution provider: on a GPU, 784 bytes per image cross PCIe instead of 3,136, and on
    any provider the event loop no longer spends time converting large batches.
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    (original,) = graph.input
    scaled = original.name + "_scaled"
    for node in graph.node:
        node.input[:] = [scaled if name == original.name else name for name in node.input]
    dims = [d.dim_param or d.dim_value for d in original.type.tensor_type.shape.dim]
    graph.input.pop()
    graph.input.append(helper.make_tensor_value_info(original.name, TensorProto.UINT8, dims))
    graph.initializer.append(helper.make_tensor(original.name + "_pixel_scale", TensorProto.FLOAT, [], [PIXEL_SCALE]))
    prefix = [
        helper.make_node("Cast", [original.name], [original.name + "_float"], to=TensorProto.FLOAT),
        helper.make_node("Div", [original.name + "_float", original.name + "_pixel_scale"], [scaled]),
    ]
    nodes = prefix + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model.SerializeToString()


class OnnxModel:
    """One loaded model.onnx: a session for FP32 images and one for UINT8 pixels; `run` is thread-safe."""

    def __init__(self, path: Path, settings: Settings) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = intra_op_threads(settings)
        if threads:
            options.intra_op_num_threads = threads
        # Spinning threads burn the cores that gRPC needs between small batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = requested_providers(settings)
        if CPU not in providers:
            # --require-gpu on CUDA: a node CUDA cannot run makes the session fail to load instead of running on CPU.
            options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        try:
            model_bytes = path.read_bytes()
            self.session = ort.InferenceSession(model_bytes, options, providers=providers)
        except Exception as exc:
            raise StartupError(f"cannot load {path}: {exc}") from exc
        # onnxruntime falls back to CPU silently: what get_providers() says is what really runs.
        self.provider = self.session.get_providers()[0]
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or inputs[0].shape[-1] != IMAGE_PIXELS or outputs[0].shape[-1] != NUM_CLASSES:
            raise StartupError(
                f"{path}: expected one input [N,{IMAGE_PIXELS}] and output [N,{NUM_CLASSES}], "
                f"got {[(i.name, i.shape) for i in inputs]} -> {[(o.name, o.shape) for o in outputs]}"
            )
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        try:
            self.uint8_session = ort.InferenceSession(with_uint8_input(model_bytes), options, providers=providers)
        except Exception as exc:
            raise StartupError(f"cannot build the UINT8-input variant of {path}: {exc}") from exc
        # IO binding: one BoundSession per dtype, its buffers allocated here, once per batch bucket.
        self.bound: dict[type, BoundSession] = {}
        if uses_io_binding(settings, self.provider):
            device = "cuda" if self.provider == CUDA else "cpu"
            graphs = settings.cuda_graphs and device == "cuda"
            try:
                for dtype, session in ((np.float32, self.session), (np.uint8, self.uint8_session)):
                    self.bound[dtype] = BoundSession(
                        session, self.input_name, self.output_name, dtype, settings.buckets, device,
                        settings.cuda_device_id, settings.pinned_memory, graphs,
                    )  # fmt: skip
            except Exception as exc:
                raise StartupError(f"cannot set up IO binding for {path} on {device}: {exc}") from exc
            log.info(
                "%s: IO binding on %s, buckets %s, pinned host memory %s, CUDA graphs %s",
                path, device, settings.buckets, self.bound[np.uint8].pinned, graphs,
            )  # fmt: skip

    def run(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities, float32 (N, 10), for float32 (N, 784) images in [0, 1] or uint8 pixels 0-255."""
        if self.bound:
            return self.bound[np.uint8 if images.dtype == np.uint8 else np.float32].run(images)
        session = self.uint8_session if images.dtype == np.uint8 else self.session
        return session.run([self.output_name], {self.input_name: images})[0]

    def warm_up(self, max_batch_size: int) -> None:
        """First real inferences (batch 1 and the largest, both dtypes) so the first request pays no set-up.

        With IO binding every bucket runs (with CUDA graphs each bucket's graph is captured here).
        """
        for bound in self.bound.values():
            try:
                bound.warm_up()
            except Exception as exc:
                raise StartupError(f"IO-binding warm-up failed: {exc}") from exc
        for n in sorted({1, max_batch_size}):
            for dtype in (np.float32, np.uint8):
                probs = self.run(np.zeros((n, IMAGE_PIXELS), dtype=dtype))
                if probs.shape != (n, NUM_CLASSES) or not np.all(np.isfinite(probs)):
                    raise StartupError(f"warm-up inference gave {probs.shape} / non-finite output")
