"""`make gpu-check`: on a machine without CUDA a clean report, exit 0 (non-zero with --require); on a machine
with CUDA the real check runs and must pass. Each machine asserts what is true on it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.common import REPO_ROOT
from bench.gpu_check import CUDA, VARIANTS, cuda_devices

ort = pytest.importorskip("onnxruntime")
HAS_CUDA = CUDA in ort.get_available_providers() and bool(cuda_devices())
no_cuda_only = pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA: test_cuda_check_passes runs instead")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )


@no_cuda_only
def test_no_cuda_is_a_clean_pass():
    done = _run()
    assert done.returncode == 0, done.stderr
    assert "no CUDA here: onnxruntime providers = [" in done.stdout
    assert "CPUExecutionProvider" in done.stdout and "nothing to check" in done.stdout
    assert "Traceback" not in done.stderr


@no_cuda_only
def test_require_fails_without_cuda():
    done = _run("--require")
    assert done.returncode == 1
    assert "no CUDA here" in done.stdout and "--require" in done.stderr


@pytest.mark.slow
def test_rehearsal_on_cpu_runs_every_in_process_variant_and_writes_json_and_png(trained_repository, tmp_path):
    """The script itself, without a GPU: each fast-path variant against CPU on all 10k images, the report files."""
    done = _run(
        "--rehearse-on-cpu", "--no-grpc", "--inproc-duration", "0.05", "--results-dir", str(tmp_path),
        "--model-repository", str(trained_repository),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "latest.json").read_text())
    assert (tmp_path / "latest.png").stat().st_size > 10_000
    compared = {c["name"]: c for c in report["inprocess_comparisons"]}
    for variant in VARIANTS:
        for dtype in ("FP32", "UINT8"):
            c = compared[f"in-process {variant} {dtype} vs CPU"]
            assert c["ok"] and c["argmax_differ"] == 0
    assert {r["variant"] for r in report["inprocess"]} == set(VARIANTS)
    assert all(item["ok"] for item in report["checks"])
    assert report["rehearsal_on_cpu"] is True


@pytest.mark.slow
def test_rehearsal_on_cpu_over_grpc_serves_through_io_binding_like_cpu(trained_repository, tmp_path):
    """The server part of the check, on CPU: the server with --io-binding on answers all 10k like CPU, under load."""
    done = _run(
        "--rehearse-on-cpu", "--inproc-duration", "0.05", "--duration", "0.3", "--workers", "1",
        "--client-procs", "1", "--results-dir", str(tmp_path), "--model-repository", str(trained_repository),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "latest.json").read_text())
    compared = {c["name"]: c for c in report["server"]["comparisons"]}
    assert compared["server (default) over gRPC FP32 vs CPU"]["ok"]
    assert compared["server (default) over gRPC UINT8 vs CPU"]["ok"]
    checked = {c["check"]: c for c in report["checks"]}
    placement = checked["server (default) ModelConfig node_placement: every node on CPUExecutionProvider"]
    assert placement["ok"] and "FP32: CPUExecutionProvider Gemm x2, Relu, Softmax" in placement["detail"]
    assert checked["model without a CUDA kernel: placement names its Scaler"]["ok"]
    labels = [r["label"] for r in report["server"]["grpc"]]
    assert labels == [
        "closed c=1 batch=1 FP32", "closed c=64 batch=1 FP32", "closed c=8 batch=1024 UINT8",
        "closed c=8 batch=4096 UINT8",
    ]  # fmt: skip
    assert all(not r["errors"] and r["ok"] > 0 for r in report["server"]["grpc"])
    # The streaming step: the load generator's, 4 streams of 2 batches of 4096 in flight.
    assert [s["label"] for s in report["server"]["stream"]] == ["stream c=8 window=2 batch=4096 UINT8"]
    assert all(not s["errors"] and s["ok"] > 0 and s["img_per_s"] > 0 for s in report["server"]["stream"])
    assert [g["goal"].split(" ")[0] for g in report["goals"]] == [
        "CPUExecutionProvider",
        "answers",
        ">=",
        "batch",
        "no",
    ]


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA here: the no-CUDA report is tested instead")
def test_cuda_check_passes(trained_repository):
    """In process only (the gRPC table is a benchmark): CUDA really active and the same answers as CPU."""
    done = _run("--require", "--no-grpc", "--duration", "0.2", "--model-repository", str(trained_repository))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[FAIL]" not in done.stdout and "gpu-check PASSED" in done.stdout
