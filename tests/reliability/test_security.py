"""Security basics: optional TLS, a metrics port that serves only metrics, message limits, no request data in logs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rel_harness import CLIENT_OPTIONS, channel, infer_ok, report
from server_process import ROOT, start_server

from serving.client import infer_request, probabilities
from serving.protos import grpc_service_pb2 as pb
from serving.protos import grpc_service_pb2_grpc as pb_grpc

RESULTS: dict[str, object] = {}
needs_openssl = pytest.mark.skipif(
    shutil.which("openssl") is None,
    reason="no openssl binary: it makes the throw-away certificates for the TLS tests (Debian package openssl)",
)


def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A throw-away self-signed certificate for 127.0.0.1 / localhost (openssl; `cryptography` is not installed)."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def _secure(server, ca: Path) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    return grpc.secure_channel(server.url, creds, options=CLIENT_OPTIONS)


def _wait_tls_serving(server, ca: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with _secure(server, ca) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            assert server.proc.poll() is None, server.log()
            try:
                if (
                    health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                time.sleep(0.1)
    raise AssertionError(f"TLS server not SERVING:\n{server.log()}")


@pytest.fixture(scope="module")
def server(trained_repository, tmp_path_factory):
    srv = start_server(trained_repository, tmp_path_factory.mktemp("security"))
    yield srv
    assert srv.stop() == 0, srv.log()


@needs_openssl
def test_tls_client_works_and_plaintext_or_untrusted_clients_do_not(trained_repository, tmp_path, reference):
    cert, key = _self_signed(tmp_path, "server")
    other, _ = _self_signed(tmp_path, "other")
    server = start_server(trained_repository, tmp_path, "--tls-cert", str(cert), "--tls-key", str(key), wait=False)
    try:
        _wait_tls_serving(server, cert)
        with _secure(server, cert) as ch:
            reply = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(
                infer_request(reference.images[:16], "mnist"), timeout=30
            )
        assert reference.check(0, 16, probabilities(reply))
        with pytest.raises(grpc.RpcError) as plain:
            infer_ok(server, reference.images[:1], timeout=5)
        with _secure(server, other) as ch, pytest.raises(grpc.RpcError) as untrusted:
            pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(infer_request(reference.images[:1], "mnist"), timeout=5)
        # The command-line client speaks TLS too.
        cli = subprocess.run(
            [sys.executable, "-m", "serving.client", "--url", server.url, "--tls-ca", str(cert), "health"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        code = server.stop()
    log = server.log()
    RESULTS["tls"] = {"plaintext_client": plain.value.code().name, "untrusted_ca": untrusted.value.code().name}
    assert code == 0, log
    assert "(TLS)" in log
    assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
    assert untrusted.value.code() == grpc.StatusCode.UNAVAILABLE
    assert cli.returncode == 0, cli.stdout + cli.stderr


def _mismatched(tmp_path: Path) -> tuple[Path, Path]:
    cert, _ = _self_signed(tmp_path, "a")
    _, key = _self_signed(tmp_path, "b")
    return cert, key  # a certificate with another certificate's private key


def _not_pem(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "junk.crt", tmp_path / "junk.key"
    cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    key.write_text("hello")
    return cert, key


@needs_openssl
@pytest.mark.parametrize("pair", [_mismatched, _not_pem], ids=["cert-with-another-key", "not-pem"])
def test_a_bad_certificate_and_key_pair_is_a_clear_start_up_failure(trained_repository, tmp_path, pair):
    cert, key = pair(tmp_path)
    server = start_server(trained_repository, tmp_path, "--tls-cert", str(cert), "--tls-key", str(key), wait=False)
    code = server.proc.wait(60)
    log = server.log()
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert code == 1, log
    assert "Traceback" not in log, log
    port = server.grpc_port
    assert (
        f"ERROR {server.proc.pid} serving.lifecycle: start-up failed: cannot listen on 127.0.0.1:{port} with TLS "
        in (errors[-1])
    ), log
    assert "(are --tls-cert/--tls-key a PEM certificate and its private key?)" in errors[-1], log


def _http(method: str, url: str) -> tuple[int, str]:
    request = urllib.request.Request(url, method=method, data=b"x=1" if method in ("POST", "PUT") else None)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def test_metrics_port_serves_metrics_and_nothing_else(server):
    """prometheus_client answers every GET path with the metrics (by design) and refuses other methods."""
    base = f"http://127.0.0.1:{server.metrics_port}"
    seen = {}
    for path in (
        "/metrics",
        "/",
        "/anything",
        "/../../../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/model_repository/",
    ):
        status, body = _http("GET", base + path)
        seen[f"GET {path}"] = status
        assert status == 200 and body.startswith("# HELP"), (path, body[:200])
        assert "root:" not in body and "<a href" not in body  # no files, no directory listing
    for method in ("POST", "PUT", "DELETE"):
        status, _ = _http(method, base + "/metrics")
        seen[f"{method} /metrics"] = status
        assert status == 405, method
    RESULTS["metrics_endpoint"] = seen


def test_message_over_the_limit_is_resource_exhausted(server):
    """The default limit fits a max_batch_size FP32 request plus 1 MiB; one byte more is refused by gRPC."""
    limit = 1024 * 784 * 4 + (1 << 20)
    request = pb.ModelInferRequest(
        model_name="mnist",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1024, 784])],
        raw_input_contents=[bytes(limit)],  # the envelope makes the message just over the limit
    )
    with channel(server) as ch, pytest.raises(grpc.RpcError) as err:
        pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request, timeout=30)
    RESULTS["oversized_message"] = err.value.code().name
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()


def test_request_content_stays_out_of_the_log(server, reference):
    secret_id = "req-7f3a9c2e-do-not-log"
    images = reference.images[:3]
    request = infer_request(images, "mnist", request_id=secret_id)
    request.parameters["labels"].string_param = "7,2,1"
    bad = infer_request(images, "mnist", request_id=secret_id + "-bad")
    bad.inputs[0].shape[1] = 783
    with channel(server) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        assert stub.ModelInfer(request, timeout=30).id == secret_id
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(bad, timeout=30)
    log = server.log()
    pixels = images[images > 0][:16].astype(int).tolist()  # the first non-zero pixel values, as a list repr
    report("security", RESULTS | {"request_id_in_log": secret_id in log})
    assert secret_id not in log
    assert "7,2,1" not in log
    assert str(pixels)[1:-1] not in log and images.tobytes()[:64].hex() not in log
