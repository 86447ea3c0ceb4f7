"""onnxruntime sessions: choose the execution provider, report where every node runs, run batches."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving.config import Settings
from serving.contract import IMAGE_PIXELS, NUM_CLASSES, PIXEL_SCALE
from serving.cuda_host import driver_problem, explain
from serving.errors import ModelLoadError, StartupError
from serving.iobinding import BoundSession

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# Largest |probability difference| from CPU expected of CUDA: FP32 kernels accumulate in another order (1e-5);
# TF32 (--tf32) rounds MatMul/Gemm inputs to 10 mantissa bits: emulated on CPU over the 10,000 test images it
# moves probabilities by up to 6.6e-4 (tests/serving/test_cuda_path.py), so its bound is 2e-3.
FP32_TOLERANCE = 1e-5
TF32_TOLERANCE = 2e-3
_dlls_preloaded = False


def wants_cuda(settings: Settings) -> bool:
    """Whether CUDA was asked for in a way that forbids serving on CPU instead (--device cuda, --require-gpu)."""
    return settings.device == "cuda" or settings.require_gpu


def cuda_options(settings: Settings) -> dict[str, str]:
    """The CUDA execution provider's options: TF32 off unless --tf32 (onnxruntime turns it on by default)."""
    options = {"device_id": str(settings.cuda_device_id), "use_tf32": "1" if settings.tf32 else "0"}
    if settings.cuda_graphs:
        options["enable_cuda_graph"] = "1"
    return options


def _preload_cuda_libraries() -> None:
    """Load the CUDA/cuDNN libraries shipped in pip wheels once; harmless on a CPU-only build."""
    global _dlls_preloaded
    if not _dlls_preloaded and hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as exc:  # a missing optional library must not stop a CPU server
            log.warning("onnxruntime.preload_dlls() failed: %s", exc)
        _dlls_preloaded = True


def check_device(settings: Settings) -> None:
    """StartupError, before anything loads, when CUDA is required (--device cuda, --require-gpu) but cannot be."""
    if not wants_cuda(settings):
        return
    if settings.device == "cpu":
        raise StartupError("--require-gpu: CUDA is not active: --device cpu chooses the CPU provider")
    _preload_cuda_libraries()
    if CUDA not in ort.get_available_providers():
        problem = driver_problem()
        raise StartupError(
            f"{_asked(settings)}: CUDA is not active: onnxruntime {ort.__version__} has no {CUDA} "
            f"(providers: {', '.join(ort.get_available_providers())}); "
            + (explain(problem) if problem else "install onnxruntime-gpu (make venv DEVICE=cuda) or use --device cpu")
        )


def requested_providers(settings: Settings) -> list:
    """Providers to ask onnxruntime for, best first; StartupError when CUDA is required and this build lacks it."""
    check_device(settings)
    if settings.device == "cpu":
        return [CPU]
    _preload_cuda_libraries()
    if CUDA not in ort.get_available_providers():
        return [CPU]
    if settings.require_gpu:
        return [(CUDA, cuda_options(settings))]  # no CPU provider: a node CUDA cannot run fails the load
    return [(CUDA, cuda_options(settings)), CPU]


def _asked(settings: Settings) -> str:
    return " and ".join(
        f for f, on in (("--device cuda", settings.device == "cuda"), ("--require-gpu", settings.require_gpu)) if on
    )


def placement(session: ort.InferenceSession) -> dict[str, list[str]]:
    """Where onnxruntime put every node: provider -> op types, from its own record of the assignment."""
    out: dict[str, list[str]] = {}
    for subgraph in session.get_provider_graph_assignment_info():
        out.setdefault(subgraph.ep_name, []).extend(node.op_type for node in subgraph.get_nodes())
    return {provider: sorted(ops) for provider, ops in out.items()}


def describe_placement(by_input: dict[str, dict[str, list[str]]]) -> str:
    """'FP32: CUDAExecutionProvider Gemm x2, Relu, Softmax; UINT8: ...' for logs and errors."""
    parts = []
    for name, providers in by_input.items():
        for provider, ops in providers.items():
            counted = ", ".join(f"{op} x{n}" if n > 1 else op for op, n in sorted(Counter(ops).items()))
            parts.append(f"{name}: {provider} {counted}")
    return "; ".join(parts)


def uses_io_binding(settings: Settings, provider: str) -> bool:
    """IO binding as set; `auto` (and CUDA graphs, which need it) turn it on when CUDA really runs."""
    if settings.io_binding == "on":
        return True
    on_cuda = provider == CUDA
    return on_cuda and (settings.io_binding == "auto" or settings.cuda_graphs)


def intra_op_threads(settings: Settings, instances: int | None = None) -> int:
    """Threads per session: as set, else the cores left once each worker's event loop has one, shared by the
    workers' execution threads (`instances` per worker: the model's instance count, by default the flag's; at
    least 1)."""
    if settings.intra_op_threads:
        return settings.intra_op_threads
    # NOTE: the event loop and gRPC's threads keep a core busy under load; onnxruntime threads beyond the other
    # cores fight them for it (2 cores, c=32 batch 1: 455-464 vs 495-517 us of CPU per request with 2 threads;
    # batch 256 c=2: 150k vs 124k images/s).
    cores = len(os.sched_getaffinity(0))
    return max(1, (cores - settings.workers) // (settings.workers * (instances or settings.instance_count)))


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


def session_options(settings: Settings, threads: int) -> ort.SessionOptions:
    """Options for both sessions of a model: all graph optimizations, no spinning, placement recorded."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    # Spinning threads burn the cores that gRPC needs between small batches.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Where each node runs, kept by onnxruntime for placement(): what get_providers() cannot say.
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    if settings.require_gpu:
        # A node CUDA cannot run makes the session fail to load instead of running on CPU.
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    return options


def create_sessions(
    graphs: dict[str, bytes], settings: Settings, path: Path, instances: int | None = None
) -> dict[str, ort.InferenceSession]:
    """One session per graph, all on the requested providers, with onnxruntime's own fallback off.

    onnxruntime's Python layer would otherwise rebuild a session CPU-only when CUDA fails (at load or at a run),
    printing a line and hiding the cause. Here a CUDA failure stops the start when CUDA was required
    (--device cuda, --require-gpu), with its own message; under --device auto both sessions move to CPU together,
    logged with the cause.
    """
    providers = requested_providers(settings)
    options = session_options(settings, intra_op_threads(settings, instances))
    while True:
        try:
            return {
                name: ort.InferenceSession(graph, options, providers=providers, enable_fallback=0)
                for name, graph in graphs.items()
            }
        except Exception as exc:
            problem = "" if providers == [CPU] else _cuda_cause()
            if providers == [CPU] or wants_cuda(settings):
                raise ModelLoadError(f"cannot load {path} on {_names(providers)}: {exc}{problem}") from exc
            log.warning("%s: CUDA failed, serving on CPU (--device auto): %s%s", path, exc, problem)
            providers = [CPU]


def _cuda_cause() -> str:
    """'; CUDA cannot run here: <the driver's cause>. Remedies: ...' when the driver says why, else ''."""
    problem = driver_problem()
    return f"; {explain(problem)}" if problem else ""


def _names(providers: list) -> str:
    return ", ".join(p[0] if isinstance(p, tuple) else p for p in providers)


def check_placement(by_input: dict[str, dict[str, list[str]]], settings: Settings, path: Path) -> None:
    """Refuse a model that would not run where it was asked to: --require-gpu wants every node on CUDA,
    --device cuda at least one (onnxruntime drops a provider it cannot create with a warning only)."""
    if not wants_cuda(settings):
        return
    elsewhere = {name: {p: ops for p, ops in providers.items() if p != CUDA} for name, providers in by_input.items()}
    elsewhere = {name: providers for name, providers in elsewhere.items() if providers}
    on_cuda = any(CUDA in providers for providers in by_input.values())
    if settings.require_gpu and elsewhere:
        raise ModelLoadError(
            f"--require-gpu: {path} has nodes that do not run on CUDA: {describe_placement(elsewhere)}"
        )
    if not on_cuda:
        raise ModelLoadError(f"{_asked(settings)}: no node of {path} runs on CUDA: {describe_placement(by_input)}")
    if elsewhere:
        log.warning("%s: nodes without a CUDA kernel run elsewhere: %s", path, describe_placement(elsewhere))


class OnnxModel:
    """One loaded model.onnx: a session for FP32 images and one for UINT8 pixels; `run` is thread-safe."""

    def __init__(self, path: Path, settings: Settings, instances: int | None = None) -> None:
        """`instances`: the execution threads that will run it (the model's instance count; default the flag's)."""
        try:
            model_bytes = path.read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"cannot read {path}: {exc}") from exc
        try:
            uint8_bytes = with_uint8_input(model_bytes)
        except Exception as exc:
            raise ModelLoadError(f"cannot load {path}: its UINT8-input variant cannot be built: {exc}") from exc
        sessions = create_sessions({"FP32": model_bytes, "UINT8": uint8_bytes}, settings, path, instances)
        self.session, self.uint8_session = sessions["FP32"], sessions["UINT8"]
        # Per input, provider -> op types: where onnxruntime really put each node.
        self.placement = {name: placement(session) for name, session in sessions.items()}
        check_placement(self.placement, settings, path)
        fp32 = Counter({provider: len(ops) for provider, ops in self.placement["FP32"].items()})
        # The provider running most of the model; the placement says where every node runs.
        self.provider = fp32.most_common(1)[0][0] if fp32 else self.session.get_providers()[0]
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or inputs[0].shape[-1] != IMAGE_PIXELS or outputs[0].shape[-1] != NUM_CLASSES:
            raise ModelLoadError(
                f"{path}: expected one input [N,{IMAGE_PIXELS}] and output [N,{NUM_CLASSES}], "
                f"got {[(i.name, i.shape) for i in inputs]} -> {[(o.name, o.shape) for o in outputs]}"
            )
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        log.info("%s: %s", path, describe_placement(self.placement))
        self.bound: dict[type, BoundSession] = {}
        if uses_io_binding(settings, self.provider):
            self._bind(settings, path)

    def _bind(self, settings: Settings, path: Path) -> None:
        """IO binding: one BoundSession per dtype, its buffers allocated here, once per batch bucket."""
        device = "cuda" if self.provider == CUDA else "cpu"
        graphs = settings.cuda_graphs and device == "cuda"
        try:
            for dtype, session in ((np.float32, self.session), (np.uint8, self.uint8_session)):
                self.bound[dtype] = BoundSession(
                    session, self.input_name, self.output_name, dtype, buckets=settings.buckets, device=device,
                    device_id=settings.cuda_device_id, pinned=settings.pinned_memory, cuda_graphs=graphs,
                )  # fmt: skip
        except Exception as exc:
            raise ModelLoadError(f"cannot set up IO binding for {path} on {device}: {exc}") from exc
        log.info(
            "%s: IO binding on %s, buckets %s, page-locked staging for %d of %d buckets, CUDA graphs %s",
            path, device, settings.buckets, min(len(b.pinned_buckets) for b in self.bound.values()),
            len(settings.buckets), graphs,
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
                raise ModelLoadError(f"IO-binding warm-up failed: {exc}") from exc
        for n in sorted({1, max_batch_size}):
            for dtype in (np.float32, np.uint8):
                probs = self.run(np.zeros((n, IMAGE_PIXELS), dtype=dtype))
                if probs.shape != (n, NUM_CLASSES) or not np.all(np.isfinite(probs)):
                    raise ModelLoadError(f"warm-up inference gave {probs.shape} / non-finite output")


def tiny_model() -> bytes:
    """A one-Gemm ONNX model, [N,4] -> [N,2], for checking that a provider can create and run a session."""
    from onnx import TensorProto, helper

    weights = helper.make_tensor("w", TensorProto.FLOAT, [4, 2], [1, 0, 0, 1, 1, 0, 0, 1])
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    return model.SerializeToString()


def device_check(device: str) -> str:
    """Create and run a tiny session on `device` (cpu|cuda) with no fallback; a line saying where it ran.

    Raises StartupError with onnxruntime's own cause when the provider cannot run it (a CUDA build without a
    usable driver or libraries lists CUDAExecutionProvider all the same)."""
    settings = Settings(device=device, require_gpu=device == "cuda", verify_on_load=False)
    session = create_sessions({"tiny": tiny_model()}, settings, Path("<tiny model>"))["tiny"]
    where = {"tiny": placement(session)}
    check_placement(where, settings, Path("<tiny model>"))
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    y = session.run(None, {"x": x})[0]
    if not np.array_equal(y, x[:, :2] + x[:, 2:]):
        raise StartupError(f"the tiny model on {device} computed {y.tolist()}")
    return f"onnxruntime {ort.__version__} runs a session on {device}: {describe_placement(where)}"


def main(argv: list[str] | None = None) -> int:
    """`python -m serving.runtime --device-check cuda`: what the venv set-up runs to prove the provider works.
    With `--asked auto` (make's DEVICE=auto) a CUDA that fails is a warning: the server then runs on CPU."""
    parser = argparse.ArgumentParser(prog="python -m serving.runtime", description=main.__doc__)
    parser.add_argument("--device-check", choices=["cpu", "cuda"], required=True)
    parser.add_argument("--asked", choices=["auto", "cpu", "cuda"], default=None, help="what DEVICE asked for")
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(device_check(args.device_check) + "\n")
    except StartupError as exc:
        cause = f"{exc}{_cuda_cause() if args.device_check == 'cuda' else ''}"
        if args.asked == "auto" and args.device_check == "cuda":
            sys.stderr.write(f"warning: DEVICE=auto: CUDA does not work here, the server will run on CPU: {cause}\n")
            return 0
        sys.stderr.write(f"device check failed: {cause}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
