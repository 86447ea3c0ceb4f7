"""`make gpu-check`: on a CUDA machine prove CUDA really runs, matches CPU, and how fast; elsewhere say so."""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from bench.common import REPO_ROOT, ChildServer, find_model, free_port, install_sigterm_exit, python_cmd
from training.data import to_model_input

CUDA = "CUDAExecutionProvider"
BATCHES = (1, 256, 4096)
# Closed-loop concurrency per batch size for the gRPC table: enough requests in flight to keep the GPU fed.
GRPC_CONCURRENCY = {1: 32, 256: 4, 4096: 2}


class Checks:
    """Named pass/fail results, printed as they come."""

    def __init__(self) -> None:
        self.items: list[dict] = []

    def add(self, name: str, ok: bool, detail: str) -> bool:
        self.items.append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)
        return bool(ok)

    @property
    def ok(self) -> bool:
        return all(i["ok"] for i in self.items)


def cuda_devices() -> list[str]:
    return sorted(glob.glob("/dev/nvidia[0-9]*"))


def _probabilities(model, x_uint8: np.ndarray, dtype: str = "FP32", chunk: int = 4096) -> np.ndarray:
    """The model's answers for all images, sent as FP32 (scaled here) or as UINT8 (scaled inside the model)."""
    chunks = [x_uint8[i : i + chunk] for i in range(0, len(x_uint8), chunk)]
    if dtype == "FP32":
        chunks = [to_model_input(c) for c in chunks]
    return np.concatenate([model.run(c) for c in chunks])


def check_inprocess(checks: Checks, model_path: Path, x: np.ndarray, y: np.ndarray, tol: float, duration: float):
    """CUDA session really on CUDA; all 10k test images agree with CPU; throughput per batch and dtype."""
    from bench import inprocess

    gpu = inprocess.load_model(model_path, "cuda")
    if not checks.add("in-process provider", gpu.provider == CUDA, f"Settings(device='cuda') runs on {gpu.provider}"):
        return None, []
    cpu = inprocess.load_model(model_path, "cpu")
    p_gpu, p_cpu = _probabilities(gpu, x), _probabilities(cpu, x)
    mismatched = int((p_gpu.argmax(1) != p_cpu.argmax(1)).sum())
    checks.add("argmax CUDA == CPU", mismatched == 0, f"{mismatched} of {len(x)} test images differ")
    diff = float(np.abs(p_gpu - p_cpu).max())
    checks.add("max |prob CUDA - prob CPU|", diff <= tol, f"{diff:.3g} (tolerance {tol:g})")
    p_gpu_u8 = _probabilities(gpu, x, "UINT8")  # the in-graph Cast/Div on the GPU
    diff_u8 = float(np.abs(p_gpu_u8 - p_cpu).max())
    checks.add("UINT8 on CUDA == FP32 on CPU", diff_u8 <= tol, f"max |dprob| {diff_u8:.3g} (tolerance {tol:g})")
    acc_gpu, acc_cpu = float((p_gpu.argmax(1) == y).mean()), float((p_cpu.argmax(1) == y).mean())
    checks.add("accuracy CUDA == CPU", acc_gpu == acc_cpu, f"CUDA {acc_gpu:.4f}, CPU {acc_cpu:.4f}")
    table = [
        inprocess.measure(gpu, x, y, b, d, duration=duration, warmup=0.3) for b in BATCHES for d in ("UINT8", "FP32")
    ]
    print(inprocess.format_table(table, "\nin-process onnxruntime on CUDA"))
    return p_cpu, table


def check_server(checks: Checks, repo: Path, x: np.ndarray, y: np.ndarray, p_cpu, duration: float, logs: Path):
    """The real server started with --device cuda --require-gpu reports CUDA and answers like CPU."""
    from bench.loadgen import LoadGenerator, Step, build_requests, format_table
    from serving.protos import grpc_service_pb2 as pb

    port, mport = free_port(), free_port()
    cmd = python_cmd(
        "-m", "serving", "--model-repository", str(repo), "--grpc-port", str(port), "--metrics-port", str(mport),
        "--device", "cuda", "--require-gpu", "--max-batch-size", str(max(BATCHES)), "--log-level", "WARNING",
    )  # fmt: skip
    table = []
    with ChildServer("real-cuda", cmd, port, logs / "real-cuda.log").start() as server:
        try:
            server.wait_ready(timeout=180)
        except (RuntimeError, TimeoutError) as exc:
            checks.add("server starts with --device cuda --require-gpu", False, str(exc)[-2000:])
            return []
        import grpc

        with grpc.insecure_channel(server.target) as ch:
            meta = ch.unary_unary(
                "/inference.GRPCInferenceService/ModelMetadata",
                request_serializer=pb.ModelMetadataRequest.SerializeToString,
                response_deserializer=pb.ModelMetadataResponse.FromString,
            )(pb.ModelMetadataRequest(name="mnist"), timeout=10)
            checks.add("server ModelMetadata platform", meta.platform.endswith(CUDA), meta.platform)
            infer = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            requests, _ = build_requests(x, y, 1000, "UINT8")
            probs = []
            for raw in requests:
                resp = pb.ModelInferResponse.FromString(infer(raw, timeout=30))
                probs.append(np.frombuffer(resp.raw_output_contents[0], dtype="<f4").reshape(-1, 10))
        p_srv = np.concatenate(probs)
        if p_cpu is not None:
            mismatched = int((p_srv.argmax(1) != p_cpu.argmax(1)).sum())
            checks.add("server argmax == CPU", mismatched == 0, f"{mismatched} of {len(p_srv)} differ over gRPC")
        checks.add("server accuracy", True, f"{float((p_srv.argmax(1) == y[: len(p_srv)]).mean()):.4f} on 10k")
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
        except OSError as exc:
            text = f"# cannot scrape /metrics: {exc}"
        active = [
            line
            for line in text.splitlines()
            if line.startswith("mnist_serving_execution_provider_info{") and line.rstrip().endswith(" 1.0")
        ]
        checks.add(
            "metric mnist_serving_execution_provider_info",
            bool(active) and all(f'provider="{CUDA}"' in line for line in active),
            "; ".join(active) or "no active provider series",
        )
        with LoadGenerator(server.target, x, y, client_procs=1) as gen:
            for b in BATCHES:
                for d in ("UINT8", "FP32"):
                    table.append(
                        gen.run(Step(concurrency=GRPC_CONCURRENCY[b], batch=b, dtype=d, duration=duration, warmup=0.3))
                    )
        print(format_table(table, "\nover gRPC (python -m serving --device cuda), closed loop"))
        errors = sum(sum(r["errors"].values()) for r in table)
        checks.add("gRPC load without errors", errors == 0, f"{errors} errors")
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__)
    p.add_argument("--require", action="store_true", help="exit non-zero when there is no CUDA to check")
    p.add_argument("--model-repository", type=Path, default=REPO_ROOT / "model_repository")
    p.add_argument("--data-dir", type=Path, default=REPO_ROOT / "data")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |prob difference| CUDA vs CPU")
    p.add_argument("--duration", type=float, default=1.5, help="seconds per throughput cell")
    p.add_argument("--no-grpc", action="store_true", help="only the in-process checks")
    p.add_argument("--json", type=Path, help="write checks and tables here")
    args = p.parse_args(argv)

    import onnxruntime as ort

    providers = ort.get_available_providers()
    devices = cuda_devices()
    if CUDA not in providers or not devices:
        why = "" if CUDA not in providers else f" (the build has {CUDA} but there is no /dev/nvidia* device)"
        print(f"no CUDA here: onnxruntime providers = {providers}{why}; nothing to check")
        if args.require:
            print("--require: failing because CUDA is not available", file=sys.stderr)
            return 1
        return 0

    install_sigterm_exit()
    print(f"CUDA check: onnxruntime {ort.__version__} providers {providers}, devices {devices}")
    from bench.common import load_test_set

    checks = Checks()
    model_path = find_model(args.model_repository)
    x, y = load_test_set(args.data_dir)
    t0 = time.perf_counter()
    p_cpu, inproc = check_inprocess(checks, model_path, x, y, args.tolerance, args.duration)
    grpc_table = []
    if not args.no_grpc:
        logs = REPO_ROOT / "bench" / "results" / "logs" / "gpu_check"
        grpc_table = check_server(checks, args.model_repository, x, y, p_cpu, args.duration, logs)
    print(f"\ngpu-check {'PASSED' if checks.ok else 'FAILED'} in {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"checks": checks.items, "inprocess": inproc, "grpc": grpc_table}, indent=2))
    return 0 if checks.ok else 1


if __name__ == "__main__":
    sys.exit(main())
