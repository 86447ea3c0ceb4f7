"""`make gpu-check`: on a CUDA machine prove CUDA really runs, matches CPU, and how fast, end to end; else say so.

In process, each part of the CUDA fast path (IO binding, pinned host memory, CUDA graphs, TF32) is checked against
CPU on all 10,000 test images, every node of every variant must be placed on CUDA, and `--require-gpu` must refuse
a model with a node that has no CUDA kernel. Then the real server starts with `--device cuda --require-gpu`, in
its default configuration and with CUDA graphs: its metadata, config (node placement) and metrics must name the
CUDA provider, its answers over gRPC must match CPU, and load over gRPC (batch 1 at c=1 and c=64, UINT8 batches of
1024 and 4096, streaming, 1/2/4 workers) is measured against the goals. Results:
bench/results/gpu_check/<time>.json and .png (and latest.*), like `make bench`.
"""

from __future__ import annotations

import argparse
import glob
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import metrics_text
from bench.common import REPO_ROOT, child_env, find_model, free_port, install_sigterm_exit, serving_cmd, start_serving
from bench.metrics_text import Snapshot
from serving.cuda_host import driver_problem, explain
from serving.runtime import FP32_TOLERANCE, TF32_TOLERANCE, describe_placement
from training.data import to_model_input

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
MAX_BATCH = 4096
STREAMS, WINDOW = 4, 2  # the streaming step: 4 ModelStreamInfer streams, 2 batches of MAX_BATCH in flight on each
# In-process variants of the CUDA path, each switched by the server's own settings.
VARIANTS = {
    "plain (numpy in/out)": {"io_binding": "off"},
    "IO binding, pageable": {"io_binding": "on", "pinned_memory": False},
    "IO binding, pinned": {"io_binding": "on", "pinned_memory": True},
    "IO binding, pinned, CUDA graphs": {"io_binding": "on", "pinned_memory": True, "cuda_graphs": True},
    "IO binding, pinned, TF32": {"io_binding": "on", "pinned_memory": True, "tf32": True},
}
# Goals of the issue (H100/H200-class GPU, 16 cores, over gRPC, end to end).
GOAL_IMG_PER_S = 1_000_000
GOAL_P99_MS = 1.0


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


def nvidia_smi() -> str:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _probabilities(model, x_uint8: np.ndarray, dtype: str = "FP32", chunk: int = 1000) -> np.ndarray:
    """The model's answers for all images, sent as FP32 (scaled here) or as UINT8 (scaled inside the model)."""
    chunks = [x_uint8[i : i + chunk] for i in range(0, len(x_uint8), chunk)]
    if dtype == "FP32":
        chunks = [to_model_input(c) for c in chunks]
    return np.concatenate([model.run(c) for c in chunks])


def compare(checks: Checks, name: str, probs: np.ndarray, reference: np.ndarray, tol: float) -> dict:
    """argmax identical on every image and max |prob difference| within tol, against the CPU reference."""
    differ = int((probs.argmax(1) != reference.argmax(1)).sum())
    diff = float(np.abs(probs - reference).max())
    ok = checks.add(
        name, differ == 0 and diff <= tol, f"{differ} of {len(probs)} argmax differ, max |dprob| {diff:.3g}"
    )
    return {"name": name, "ok": ok, "argmax_differ": differ, "max_abs_dprob": diff}


def check_inprocess(checks: Checks, model_path: Path, x: np.ndarray, y: np.ndarray, args) -> tuple:
    """Every fast-path variant on CUDA: provider, answers vs CPU on all 10k (FP32 and UINT8), batch 1/4096 speed."""
    from bench import inprocess
    from serving.config import Settings
    from serving.runtime import OnnxModel

    cpu = OnnxModel(model_path, Settings(device="cpu", io_binding="off"))
    p_cpu = _probabilities(cpu, x)
    table, comparisons = [], []
    for name, overrides in VARIANTS.items():
        try:
            model = OnnxModel(model_path, Settings(device=args.device, max_batch_size=MAX_BATCH, **overrides))
            model.warm_up(MAX_BATCH)
        except Exception as exc:  # a variant that cannot start is a failed check, not the end of the run
            checks.add(f"in-process {name}: loads", False, f"{type(exc).__name__}: {exc}"[:2000])
            continue
        checks.add(f"in-process {name}: provider", model.provider == args.expect, model.provider)
        placed = {p for where in model.placement.values() for p in where}
        checks.add(f"in-process {name}: every node on {args.expect}", placed == {args.expect}, describe_placement(
            model.placement
        ))  # fmt: skip
        # TF32 rounds MatMul inputs: its own, stated bound (serving.runtime); every other variant is FP32.
        tolerance = TF32_TOLERANCE if overrides.get("tf32") else args.tolerance
        for dtype in ("FP32", "UINT8"):
            comparisons.append(
                compare(checks, f"in-process {name} {dtype} vs CPU", _probabilities(model, x, dtype), p_cpu, tolerance)
            )
        for batch in (1, MAX_BATCH):
            row = inprocess.measure(model, x, y, batch, "UINT8", duration=args.inproc_duration, warmup=0.2)
            table.append({**row, "variant": name, "pinned": bool(model.bound and model.bound[np.uint8].pinned)})
        del model
    print(
        inprocess.format_table(
            table, "\nin-process onnxruntime, UINT8 (variants in order: " + ", ".join(VARIANTS) + ")"
        )
    )
    return p_cpu, table, comparisons


def model_without_cuda_kernel(path: Path) -> Path:
    """A tiny [N,784] -> [N,10] model whose first node, ai.onnx.ml Scaler, has no CUDA kernel in onnxruntime."""
    import onnx
    from onnx import TensorProto, helper

    weights = np.random.default_rng(0).standard_normal((784, 10)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Scaler", ["x"], ["scaled"], domain="ai.onnx.ml", offset=[0.0], scale=[1.0]),
            helper.make_node("MatMul", ["scaled", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "no_cuda_kernel",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 784])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        [onnx.numpy_helper.from_array(weights, "w")],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def check_refusal(checks: Checks, args, workdir: Path) -> None:
    """--require-gpu refuses a model with a node CUDA cannot run; without it the node's placement on CPU shows.
    On a CPU rehearsal: the generated model loads and its placement names the Scaler."""
    from serving.config import Settings
    from serving.errors import StartupError
    from serving.runtime import OnnxModel

    path = model_without_cuda_kernel(workdir / "no_cuda_kernel" / "model.onnx")
    if args.expect != CUDA:
        model = OnnxModel(path, Settings(device="cpu"))
        checks.add("model without a CUDA kernel: placement names its Scaler", "Scaler" in model.placement["FP32"][CPU],
                   describe_placement(model.placement))  # fmt: skip
        return
    try:
        OnnxModel(path, Settings(device="cuda", require_gpu=True))
        checks.add("--require-gpu refuses a model with a node without a CUDA kernel", False, "it loaded")
    except StartupError as exc:
        checks.add("--require-gpu refuses a model with a node without a CUDA kernel", "CPU" in str(exc), str(exc))
    mixed = OnnxModel(path, Settings(device="cuda"))
    checks.add(
        "--device cuda reports the node without a CUDA kernel on CPU",
        mixed.placement["FP32"].get(CPU) == ["Scaler"] and CUDA in mixed.placement["FP32"],
        describe_placement(mixed.placement),
    )


def server_flags(device: str, require: bool, workers: int, graphs: bool) -> list[str]:
    """The server flags of the check, beside the repository and ports of bench.common.serving_cmd."""
    # IO binding: auto is on with CUDA; a CPU rehearsal turns it on so the same bound path serves over gRPC.
    return [
        "--io-binding", "on" if device == "cpu" else "auto",
        "--device", device, "--max-batch-size", str(MAX_BATCH), "--workers", str(workers), "--log-level", "WARNING",
        "--max-queue-images", str(16 * MAX_BATCH),  # c=8 of 4096 must queue, not be shed
        "--max-inflight-bytes", str(64 << 20),  # ... nor refused for memory (8 x 4096 UINT8 = 26 MB; the GPU overlay's)
        "--require-gpu" if require else "--no-require-gpu", "--cuda-graphs" if graphs else "--no-cuda-graphs",
    ]  # fmt: skip


def scrape(mport: int) -> Snapshot:
    """The server's /metrics (empty when it cannot be read: every check on it then fails, saying so)."""
    return metrics_text.scrape(f"http://127.0.0.1:{mport}/metrics", timeout=5) or Snapshot("")


def grpc_answers(target: str, x: np.ndarray, y: np.ndarray, dtype: str) -> np.ndarray:
    """All test images through ModelInfer in batches of 1000: the probabilities the server returns."""
    import grpc

    from bench.loadgen import build_requests
    from serving.protos import grpc_service_pb2 as pb

    requests, _ = build_requests(x, y, 1000, dtype)
    with grpc.insecure_channel(target) as ch:
        infer = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        out = []
        for raw in requests:
            resp = pb.ModelInferResponse.FromString(infer(raw, timeout=30))
            index = [o.name for o in resp.outputs].index("probabilities")
            out.append(np.frombuffer(resp.raw_output_contents[index], dtype="<f4").reshape(-1, 10))
    return np.concatenate(out)


def check_server(checks: Checks, repo: Path, x, y, p_cpu, args, logs: Path) -> dict:
    """The real server: CUDA proven active, answers like CPU over gRPC, then load: the default configuration for
    every worker count, then CUDA graphs on (one worker)."""
    out: dict = {"grpc": [], "stream": [], "workers": []}
    require = args.expect == CUDA
    # --require-gpu must refuse a server that would run on CPU: start one with --device cpu and see it exit.
    if require:
        cmd = serving_cmd(repo, free_port(), free_port(), *server_flags("cpu", True, 1, False))
        done = subprocess.run(cmd, cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=120)
        checks.add(
            "--require-gpu refuses to serve on CPU",
            done.returncode != 0 and "CUDA is not active" in (done.stdout + done.stderr),
            f"--device cpu --require-gpu exited {done.returncode}",
        )
    from bench.loadgen import LoadGenerator

    configurations = [(workers, False) for workers in args.workers]
    if args.cuda_graphs:
        configurations.append((args.workers[0], True))
    gens = (LoadGenerator("127.0.0.1:1", x, y), LoadGenerator("127.0.0.1:1", x, y, args.client_procs).start())
    try:
        for workers, graphs in configurations:
            server = _start(checks, repo, args.device, require, workers, graphs, logs)
            if server is not None:
                with server:
                    _measure(checks, server, gens, x, y, p_cpu, args, out, workers, graphs)
    finally:
        gens[1].close()
    errors = sum(sum(r["errors"].values()) for r in out["grpc"] + out["stream"])
    checks.add("gRPC load without errors", errors == 0, f"{errors} errors")
    return out


def _measure(checks: Checks, server, gens, x, y, p_cpu, args, out: dict, workers: int, graphs: bool) -> None:
    """One server configuration: provider and answers proven (first worker count), then load and streaming; gens:
    the load generators for one client process (c=1, the streams) and for c>1."""
    from bench.loadgen import Step, format_table

    config = "CUDA graphs" if graphs else "default"
    out["workers"].append({"workers": workers, "cuda_graphs": graphs})
    first = workers == args.workers[0]
    if first:
        _prove_provider(checks, server.target, server.metrics_port, args.expect, config)
        for dtype in ("FP32", "UINT8"):
            p_srv = grpc_answers(server.target, x, y, dtype)
            out.setdefault("comparisons", []).append(
                compare(checks, f"server ({config}) over gRPC {dtype} vs CPU", p_srv, p_cpu, args.tolerance)
            )
    steps = [
        Step(concurrency=1, batch=1, dtype="FP32", duration=args.duration, warmup=0.5),
        Step(concurrency=64, batch=1, dtype="FP32", duration=args.duration, warmup=0.5),
        Step(concurrency=8, batch=1024, dtype="UINT8", duration=args.duration, warmup=0.5),
        Step(concurrency=8, batch=4096, dtype="UINT8", duration=args.duration, warmup=0.5),
    ]
    if not first:
        steps = steps[1:]  # the worker sweep: throughput steps only
    rows = []
    for step in steps:
        gen = gens[0] if step.concurrency == 1 else gens[1]
        gen.retarget(server.target)
        rows.append({**gen.run(step), "workers": workers, "cuda_graphs": graphs})
    print(format_table(rows, f"over gRPC, {workers} worker(s), {config}, closed loop"))
    out["grpc"] += rows
    # STREAMS streams of WINDOW in flight each, one connection per stream, from one client process.
    stream_step = Step(
        stream=True, concurrency=STREAMS * WINDOW, window=WINDOW, channels=STREAMS, batch=MAX_BATCH, dtype="UINT8",
        duration=args.duration, warmup=0.5,
    )  # fmt: skip
    gens[0].retarget(server.target)
    stream = {**gens[0].run(stream_step), "workers": workers, "cuda_graphs": graphs}
    if "UNIMPLEMENTED" in stream["errors"]:
        checks.add(f"{server.name}: ModelStreamInfer", False, "UNIMPLEMENTED")
        return
    out["stream"].append(stream)
    print(format_table([stream], f"over gRPC, ModelStreamInfer, {STREAMS} streams of {WINDOW} in flight"))
    if args.expect == CUDA:
        _no_cpu_series(checks, server.name, scrape(server.metrics_port))


def _start(checks: Checks, repo: Path, device: str, require: bool, workers: int, graphs: bool, logs: Path):
    """A ready server (ChildServer with .metrics_port), or None after a failed check."""
    name = f"server-{device}-w{workers}{'-graphs' if graphs else ''}"
    flags = server_flags(device, require, workers, graphs)
    server = start_serving(repo, logs / f"{name}.log", *flags, name=name, wait=False)
    print(f"\n{name}: {' '.join(server.cmd[1:])}", flush=True)
    try:
        server.wait_ready(timeout=240)
    except (RuntimeError, TimeoutError) as exc:
        server.stop()
        checks.add(f"{name} starts", False, str(exc)[-2000:])
        return None
    return server


def _prove_provider(checks: Checks, target: str, mport: int, expect: str, config: str) -> None:
    """The provider in ModelMetadata, every node on it in ModelConfig's node_placement, and the same in metrics."""
    import grpc

    from serving.protos import grpc_service_pb2 as pb

    with grpc.insecure_channel(target) as ch:
        meta = ch.unary_unary(
            "/inference.GRPCInferenceService/ModelMetadata",
            request_serializer=pb.ModelMetadataRequest.SerializeToString,
            response_deserializer=pb.ModelMetadataResponse.FromString,
        )(pb.ModelMetadataRequest(name="mnist"), timeout=10)
        config_response = ch.unary_unary(
            "/inference.GRPCInferenceService/ModelConfig",
            request_serializer=pb.ModelConfigRequest.SerializeToString,
            response_deserializer=pb.ModelConfigResponse.FromString,
        )(pb.ModelConfigRequest(name="mnist"), timeout=10)
    checks.add(f"server ({config}) ModelMetadata platform", meta.platform.endswith(expect), meta.platform)
    placement = json.loads(config_response.config.parameters["node_placement"].string_value)
    placed = {p for where in placement.values() for p in where}
    checks.add(
        f"server ({config}) ModelConfig node_placement: every node on {expect}",
        placed == {expect},
        describe_placement(placement),
    )
    snap = scrape(mport)
    nodes = [lab for lab, v in snap.series("mnist_serving_execution_nodes") if v]
    active = [lab for lab, v in snap.series("mnist_serving_execution_provider_info") if v] + nodes
    checks.add(
        f"server ({config}) metrics execution_provider_info and execution_nodes",
        bool(nodes) and all(lab["provider"] == expect for lab in active),
        "; ".join(str(lab) for lab in active) or "no provider series",
    )


def _no_cpu_series(checks: Checks, name: str, snap: Snapshot) -> None:
    on_cpu = [lab for lab, v in snap.series("mnist_serving_execution_provider_info", provider=CPU) if v]
    required = snap.first("mnist_serving_gpu_required") == 1.0
    checks.add(
        f"{name}: nothing served on CPU",
        not on_cpu and required,
        "; ".join(str(lab) for lab in on_cpu) or "gpu_required=1, no CPU series",
    )


def goals(checks: Checks, inproc_cmp: list, server: dict, expect: str) -> list[dict]:
    """The issue's goals, each met or not, from what this run measured."""
    out = []

    def goal(text: str, met: bool, value: str) -> None:
        out.append({"goal": text, "met": bool(met), "value": value})

    provider_checks = [c for c in checks.items if "provider" in c["check"] or "platform" in c["check"]]
    goal(f"{expect} provider proven active", bool(provider_checks) and all(c["ok"] for c in provider_checks), "")
    cmp_all = inproc_cmp + server.get("comparisons", [])
    worst = max((c["max_abs_dprob"] for c in cmp_all), default=float("nan"))
    goal(
        "answers identical to CPU (argmax on all 10k, max |dprob| <= 1e-5; TF32 variant <= 2e-3)",
        bool(cmp_all) and all(c["ok"] for c in cmp_all),
        f"{sum(c['argmax_differ'] for c in cmp_all)} argmax differences, worst |dprob| {worst:.3g}",
    )
    u8 = [r for r in server["grpc"] if r["step"]["dtype"] == "UINT8"] + server["stream"]
    best = max((r["img_per_s"] for r in u8), default=0.0)
    goal(f">= {GOAL_IMG_PER_S:,} images/s with UINT8 batches over gRPC", best >= GOAL_IMG_PER_S, f"{best:,.0f} img/s")
    c1 = [r for r in server["grpc"] if r["step"]["concurrency"] == 1 and r["step"]["batch"] == 1]
    p99 = c1[0]["latency_ms"]["p99"] if c1 and c1[0]["latency_ms"]["p99"] is not None else float("inf")
    goal(f"batch 1, c=1: p99 <= {GOAL_P99_MS:g} ms", p99 <= GOAL_P99_MS, f"p99 {p99:.3f} ms")
    guard = [c for c in checks.items if "require-gpu" in c["check"] or "nothing served on CPU" in c["check"]
             or "every node" in c["check"]]  # fmt: skip
    goal("no image served on CPU with --require-gpu", bool(guard) and all(c["ok"] for c in guard), "")
    print("\ngoals (this machine):")
    for g in out:
        print(f"  [{'MET' if g['met'] else 'NOT MET'}] {g['goal']}{': ' + g['value'] if g['value'] else ''}")
    return out


def plot(report: dict, path: Path) -> None:
    """Images/s and p99 per gRPC step and worker count, and the in-process variants."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.5))
    rows = report["server"]["grpc"]
    for workers in sorted({r["workers"] for r in rows}):
        mine = [r for r in rows if r["workers"] == workers]
        labels = [r["label"].replace("closed ", "") for r in mine]
        ax1.barh(
            [f"{label} w{workers}" for label in labels], [r["img_per_s"] for r in mine], label=f"{workers} worker(s)"
        )
        ax2.barh([f"{label} w{workers}" for label in labels], [r["latency_ms"]["p99"] or 0 for r in mine])
    for s in report["server"]["stream"]:
        ax1.barh([f"{s['label']} w{s['workers']}"], [s["img_per_s"]], color="grey")
    ax1.axvline(GOAL_IMG_PER_S, ls="--", color="red", label="goal 1M img/s (UINT8)")
    ax2.axvline(GOAL_P99_MS, ls="--", color="red", label="goal p99 1 ms (batch 1, c=1)")
    ax1.set_xscale("log")
    ax1.set_xlabel("images/s over gRPC")
    ax2.set_xscale("log")
    ax2.set_xlabel("p99 latency (ms)")
    inproc = report["inprocess"]
    ax3.barh([f"{r['variant']} b{r['batch']}" for r in inproc], [r["img_per_s"] for r in inproc])
    ax3.set_xscale("log")
    ax3.set_xlabel("images/s in process (UINT8)")
    for ax in (ax1, ax2, ax3):
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(True, axis="x", alpha=0.3)
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    m = report["machine"]
    fig.suptitle(f"gpu-check {report['timestamp']} - {report['gpus'] or 'no GPU'} - {m['nproc']} CPUs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__)
    p.add_argument("--require", action="store_true", help="exit non-zero when there is no CUDA to check")
    p.add_argument("--model-repository", type=Path, default=REPO_ROOT / "model_repository")
    p.add_argument("--data-dir", type=Path, default=REPO_ROOT / "data")
    p.add_argument(
        "--tolerance", type=float, default=FP32_TOLERANCE, help="max |prob difference| against CPU (TF32: its own)"
    )
    p.add_argument("--duration", type=float, default=3.0, help="seconds per gRPC load step")
    p.add_argument("--inproc-duration", type=float, default=1.0, help="seconds per in-process timing")
    p.add_argument("--workers", type=_ints, default=[1, 2, 4], help="server worker counts to measure (first: full)")
    p.add_argument("--client-procs", type=int, default=4, help="load-generator processes for c > 1")
    p.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after the default configuration, also serve with --cuda-graphs",
    )
    p.add_argument("--no-grpc", action="store_true", help="only the in-process checks")
    p.add_argument(
        "--rehearse-on-cpu",
        action="store_true",
        help="run every step on the CPU provider (tests this script without a GPU; the goals are not the point)",
    )
    p.add_argument("--results-dir", type=Path, default=REPO_ROOT / "bench" / "results" / "gpu_check")
    p.add_argument("--json", type=Path, help="also write the report here")
    return p


def choose_device(args, providers: list[str], devices: list[str]) -> int | None:
    """Set args.device/expect for CUDA (or the CPU rehearsal); the exit code when there is nothing to check."""
    import onnxruntime as ort

    problem = driver_problem()  # the driver's own reason, asked once
    if args.rehearse_on_cpu:
        args.device, args.expect, args.cuda_graphs = "cpu", CPU, False
        print("rehearsal on CPU: every step runs on CPUExecutionProvider; CUDA is not checked")
    elif CUDA not in providers or not devices or problem:
        why = "" if CUDA not in providers else f" (the build has {CUDA} but there is no /dev/nvidia* device)"
        if problem:
            why = f"; {explain(problem)}"
        print(f"no CUDA here: onnxruntime providers = {providers}{why}; nothing measured, nothing to check")
        if args.require:
            print("--require: failing because CUDA is not available", file=sys.stderr)
            return 1
        return 0
    else:
        args.device, args.expect = "cuda", CUDA
        ort.preload_dlls()
    return None


def write_report(report: dict, args) -> None:
    """The JSON (timestamped, latest.json and --json) and the plot."""
    stamp = report["timestamp"]
    text = json.dumps(report, indent=2, default=str)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    for name in (f"{stamp}.json", "latest.json"):
        (args.results_dir / name).write_text(text)
    if args.json:
        args.json.write_text(text)
    try:
        plot(report, args.results_dir / f"{stamp}.png")
        (args.results_dir / "latest.png").write_bytes((args.results_dir / f"{stamp}.png").read_bytes())
    except Exception as exc:  # a missing plot must not hide the checks
        print(f"plot failed: {exc}", file=sys.stderr)
    print(f"results: {args.results_dir / (stamp + '.json')} (and latest.json, latest.png)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import onnxruntime as ort

    providers, devices = ort.get_available_providers(), cuda_devices()  # asked once
    code = choose_device(args, providers, devices)
    if code is not None:
        return code
    install_sigterm_exit()
    from bench.common import load_test_set, machine_info

    gpus = nvidia_smi()
    print(f"gpu-check: onnxruntime {ort.__version__} providers {providers}, devices {devices}\n{gpus}")
    checks = Checks()
    try:
        model_path = find_model(args.model_repository)
    except FileNotFoundError as exc:
        print(f"gpu-check: {exc}", file=sys.stderr)
        return 2
    x, y = load_test_set(args.data_dir)
    t0 = time.perf_counter()
    p_cpu, inproc, inproc_cmp = check_inprocess(checks, model_path, x, y, args)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as workdir:
        check_refusal(checks, args, Path(workdir))
    server: dict = {"grpc": [], "stream": [], "workers": []}
    if not args.no_grpc:
        logs = REPO_ROOT / "bench" / "results" / "logs" / "gpu_check"
        server = check_server(checks, args.model_repository, x, y, p_cpu, args, logs)
    met = goals(checks, inproc_cmp, server, args.expect)
    print(f"\ngpu-check {'PASSED' if checks.ok else 'FAILED'} in {time.perf_counter() - t0:.0f} s")
    write_report({
        "timestamp": time.strftime("%Y%m%d-%H%M%S"), "rehearsal_on_cpu": args.rehearse_on_cpu, "gpus": gpus,
        "machine": machine_info(),
        "settings": {"cuda_graphs": args.cuda_graphs, "workers": args.workers, "duration_s": args.duration},
        "checks": checks.items, "goals": met, "inprocess": inproc, "inprocess_comparisons": inproc_cmp,
        "server": server,
    }, args)  # fmt: skip
    return 0 if checks.ok else 1


if __name__ == "__main__":
    sys.exit(main())
