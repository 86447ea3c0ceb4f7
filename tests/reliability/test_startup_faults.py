"""Start-up faults: a clear one-line error and a non-zero exit; one bad version among good ones is served around."""

from __future__ import annotations

import re
import shutil
import socket
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rel_harness import add_version, channel, infer_ok, metric_value, report
from server_process import start_server

from serving.protos import grpc_service_pb2 as pb
from serving.protos import grpc_service_pb2_grpc as pb_grpc

CUDA = "CUDAExecutionProvider"
RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
GRPC_CORE_RECORD = re.compile(r"^[IWE]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \w+\.cc:\d+\] ")  # gRPC's own stderr
RESULTS: dict[str, dict] = {}


def _listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def _break_onnx(repo: Path) -> None:
    (repo / "mnist" / "1" / "model.onnx").write_bytes(b"\x08\x07garbage, not a protobuf")


def _bad_json(repo: Path) -> None:
    (repo / "mnist" / "1" / "metadata.json").write_text('{"test_accuracy": 0.9')


def _metadata_is_a_directory(repo: Path) -> None:
    path = repo / "mnist" / "1" / "metadata.json"
    path.unlink()
    path.mkdir()


def _empty(repo: Path) -> None:
    shutil.rmtree(repo / "mnist")


def _missing(repo: Path) -> None:
    shutil.rmtree(repo)


# case -> (change to the repository, extra flags ('{port}': a port already in use), expected exit, error line)
CASES = {
    "missing repository": (_missing, [], 1, "start-up failed: model repository '.*' does not exist"),
    "empty repository": (_empty, [], 1, r"start-up failed: model repository '.*' has no <model>/<version>/model.onnx"),
    "corrupt model.onnx": (
        _break_onnx, [], 1, r"start-up failed: no model version in '.*' could be loaded: .*cannot load .*model.onnx",
    ),
    "unparsable metadata.json": (
        _bad_json, [], 1, r"start-up failed: no model version .* could be loaded: .*unreadable .*metadata.json",
    ),
    "unreadable metadata.json": (
        _metadata_is_a_directory, [], 1, r"start-up failed: no model version .*unreadable .*metadata.json",
    ),
    "gRPC port in use": (None, ["--grpc-port", "{port}"], 1, r"start-up failed: cannot listen on 127.0.0.1:\d+"),
    "metrics port in use": (None, ["--metrics-port", "{port}"], 1, r"cannot serve metrics on 127.0.0.1:\d+: .*in use"),
    "--require-gpu without a GPU": (
        None, ["--require-gpu"], 1,
        r"start-up failed: --require-gpu: CUDA is not active: .* has no CUDAExecutionProvider \(providers: .*CPU",
    ),
    "--device cuda without a GPU": (
        None, ["--device", "cuda"], 1,
        r"start-up failed: --device cuda: CUDA is not active: .* has no CUDAExecutionProvider \(providers: .*CPU",
    ),
    "--require-gpu with --device cpu": (
        None, ["--require-gpu", "--device", "cpu"], 1,
        r"start-up failed: --require-gpu: CUDA is not active: --device cpu chooses the CPU provider",
    ),
    "invalid setting": (None, ["--max-batch-size", "0"], 2, r"error: --max-batch-size: Input should be greater"),
    "TLS cert without key": (None, ["--tls-cert", "/nonexistent.pem"], 2, r"error: tls_cert and tls_key must be"),
    "TLS key missing": (
        None, ["--tls-cert", "{repo}/mnist/1/metadata.json", "--tls-key", "/nonexistent.key"], 1,
        r"start-up failed: cannot read the TLS key/certificate: .*No such file or directory: '/nonexistent.key'",
    ),
    "TLS certificate unreadable (a directory)": (
        None, ["--tls-cert", "{repo}", "--tls-key", "{repo}/mnist/1/metadata.json"], 1,
        r"start-up failed: cannot read the TLS key/certificate: .*Is a directory",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_startup_fault_exits_non_zero_with_one_clear_line(case, repository, tmp_path, active_provider):
    if case.endswith("without a GPU") and active_provider == CUDA:
        pytest.skip("CUDA is active here: test_require_gpu_with_cuda_active serves instead")
    change, flags, expected_code, line = CASES[case]
    if change is not None:
        change(repository)
    busy = _listening_socket()
    try:
        flags = [f.format(port=busy.getsockname()[1], repo=repository) for f in flags]
        server = start_server(repository, tmp_path, *flags, wait=False)
        code = server.proc.wait(60)
    finally:
        busy.close()
    log = server.log()
    errors = [ln for ln in log.splitlines() if " ERROR " in ln or ": error: " in ln]
    RESULTS[case] = {"exit": code, "line": errors[-1] if errors else None}
    assert code == expected_code, log
    assert "Traceback" not in log, log
    assert re.search(line, errors[-1]), (line, log)  # the last error line says what is wrong
    # Every line is a log record (ours or gRPC core's) or argparse's usage banner: no multi-line dumps.
    banner = ("usage:", " ", "python -m serving")
    assert all(RECORD.match(ln) or GRPC_CORE_RECORD.match(ln) or ln.startswith(banner) for ln in log.splitlines()), log


def test_require_gpu_with_cuda_active_serves_on_cuda(trained_repository, tmp_path, active_provider, reference):
    """The other half of the --require-gpu case, on a machine where CUDA really runs."""
    if active_provider != CUDA:
        pytest.skip(f"no CUDA here (onnxruntime runs on {active_provider}): the start-up fault case covers it")
    server = start_server(trained_repository, tmp_path, "--require-gpu")
    try:
        probs, _ = infer_ok(server, reference.images[:16])
        text = server.metrics()
    finally:
        code = server.stop()
    assert code == 0, server.log()
    assert reference.check(0, 16, probs)
    assert metric_value(text, "mnist_serving_gpu_required") == 1
    assert metric_value(text, "mnist_serving_execution_provider_info", provider=CUDA) == 1


def test_one_bad_version_among_good_ones_is_reported_and_skipped(repository, tmp_path, reference):
    model_dir = repository / "mnist"
    add_version(model_dir, 2, model_dir / "1", onnx=b"garbage")
    add_version(model_dir, 3, model_dir / "1")
    (model_dir / "3" / "metadata.json").write_text("[not json")
    add_version(model_dir, 4, model_dir / "1")
    server = start_server(repository, tmp_path)
    try:
        with channel(server) as ch:
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="mnist"), timeout=10)
            index = pb_grpc.GRPCInferenceServiceStub(ch).RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
        probs, version = infer_ok(server, reference.images[:10])
        with pytest.raises(grpc.RpcError) as err:
            infer_ok(server, reference.images[:1], version="2")
        failures = metric_value(server.metrics(), "mnist_serving_model_load_failures_total", model="mnist")
    finally:
        code = server.stop()
    log = server.log()
    states = {m.version: (m.state, m.reason) for m in index.models}
    RESULTS["one bad version among good ones"] = {"served": sorted(v for v, s in states.items() if s[0] == "READY")}
    report("startup_faults", RESULTS)

    assert code == 0, log
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert version == "4" and reference.check(0, 10, probs)  # the newest good version serves
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert states["1"] == ("READY", "") and states["4"] == ("READY", "")
    assert states["2"][0] == "UNAVAILABLE" and "cannot load" in states["2"][1]
    assert states["3"][0] == "UNAVAILABLE" and "unreadable" in states["3"][1]
    assert "model mnist version 2 rejected: cannot load" in log
    assert "model mnist version 3 rejected: unreadable" in log
    assert failures == 2
