"""The shipped deployment serves: the server from exactly the serving image's dependency set (its build stage
replayed in a venv, image_venv.py), started with each overlay's rendered args, env and ConfigMap, the image's ENV
and a fresh emptyDir, loads the real trained model and answers over gRPC; then drains on SIGTERM with exit 0.

The GPU image's dependency set (onnxruntime-gpu, 256 MB) is not built here; its overlay is run with the CPU
image's set, where `--require-gpu` must refuse to start rather than serve on the CPU."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
import image_venv
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from k8s_check import DOCKER, env_vars, find_object, last, secret_volumes, stages

from bench.common import ChildServer, free_port
from serving.client import infer_request, probabilities
from serving.protos import grpc_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
IMAGE = "serving-cpu.Dockerfile"


@pytest.fixture(scope="module")
def image_python() -> Path:
    return image_venv.build(IMAGE) / "bin" / "python"


def container(objects: list[dict]) -> tuple[dict, dict]:
    deployment = find_object(objects, "Deployment", "mnist-serving")
    (server,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "server"]
    return deployment, server


def pod_command(objects: list[dict], python: Path, paths: dict[str, Path], ports: dict[str, int]) -> tuple:
    """(argv, env) of the server container: ENTRYPOINT + args, image ENV + envFrom ConfigMaps + env, with the
    pod's paths mapped onto local directories and its ports onto free ones."""

    def local(value: str) -> str:
        for pod_path, path in paths.items():
            if value == pod_path or value.startswith(pod_path + "/"):
                return str(path) + value[len(pod_path) :]
        return ports.get(value, value)

    _, server = container(objects)
    runtime = stages(DOCKER / IMAGE)[-1]
    entrypoint = json.loads(last(runtime, "ENTRYPOINT"))
    assert entrypoint[:1] == ["python"], entrypoint
    args = [local(a) for a in server.get("args", json.loads(last(runtime, "CMD")))]
    args = ["127.0.0.1" if a == "0.0.0.0" else a for a in args]  # loopback only in tests
    env = {k: v for k, v in env_vars(runtime).items() if k != "PATH"}
    for source in server.get("envFrom", []):
        config = find_object(objects, "ConfigMap", source["configMapRef"]["name"])
        env.update(config["data"])
    env.update({e["name"]: e["value"] for e in server.get("env", [])})
    env = {k: local(v) for k, v in env.items()}
    env["PATH"] = f"{python.parent}:/usr/bin:/bin"
    return [str(python), *entrypoint[1:], *args], env


def start(argv: list[str], env: dict, cwd: Path, log: Path) -> subprocess.Popen:
    """The container's process: its own env and working directory (not the source tree, so `python -m serving`
    imports the package installed in the image venv, as in the image)."""
    with open(log, "w") as out:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture
def pod(tmp_path, trained_repository, rendered) -> dict[str, Path]:
    """The pod's filesystem: a fresh emptyDir at /tmp, the model volume at /models, the image's MNIST cache, and
    every Secret volume of the pod with its items (random bytes, as `kubectl create secret` would hold)."""
    tmp = tmp_path / "emptydir"
    tmp.mkdir()
    models = Path(shutil.copytree(trained_repository, tmp_path / "models"))
    paths = {"/tmp": tmp, "/models": models, "/opt/mnist-data": image_venv.REPO / "data"}
    deployment, server = container(rendered["cpu"])
    paths.update(secret_volumes(deployment, server, tmp_path))
    return paths


def test_cpu_overlay_serves_from_the_image_dependency_set(rendered, image_python, pod, mnist_data):
    objects = rendered["cpu"]
    deployment, server_spec = container(objects)
    grpc_port, metrics_port = free_port(), free_port()
    argv, env = pod_command(objects, image_python, pod, {"8001": str(grpc_port), "8002": str(metrics_port)})
    log = pod["/tmp"].parent / "server.log"
    proc = start(argv, env, pod["/tmp"], log)
    url = f"127.0.0.1:{grpc_port}"
    try:
        probe = server_spec["startupProbe"]
        # (the launcher's readiness wait, around this process started the container's way)
        ChildServer("image", argv, grpc_port, log, proc=proc).wait_serving(
            probe["periodSeconds"] * probe["failureThreshold"]
        )
        with grpc.insecure_channel(url) as channel:
            live = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=server_spec["livenessProbe"]["grpc"].get("service", "")),
                timeout=5,
            )
            assert live.status == health_pb2.HealthCheckResponse.SERVING
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            x, y = mnist_data.x_test[:1000], mnist_data.y_test[:1000]
            correct = 0
            for lo in range(0, 1000, 250):
                for datatype in ("UINT8", "FP32"):
                    reply = stub.ModelInfer(infer_request(x[lo : lo + 250], "mnist", datatype=datatype), timeout=30)
                    correct += int((probabilities(reply).argmax(1) == y[lo : lo + 250]).sum())
        assert correct / 2000 > 0.9, correct
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        assert 'mnist_serving_requests_total{code="OK",model="mnist",version="1"} 8.0' in text, text[-2000:]
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert "Traceback" not in text and "rejected" not in text, text[-3000:]
    assert float(env["SERVING_DRAIN_DELAY_S"]) <= took, took


def test_gpu_overlay_refuses_to_serve_without_cuda(rendered, image_python, pod):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA: the GPU overlay would serve (make gpu-check covers it)")
    objects = rendered["gpu"]
    grpc_port, metrics_port = free_port(), free_port()
    argv, env = pod_command(objects, image_python, pod, {"8001": str(grpc_port), "8002": str(metrics_port)})
    assert "--require-gpu" in argv
    proc = subprocess.run(argv, cwd=pod["/tmp"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "--require-gpu: CUDA is not active" in proc.stderr, proc.stderr[-2000:]
