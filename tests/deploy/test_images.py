"""The images, built from the real Dockerfiles (deploy/docker/images.sh, buildah) and run as the manifests run them.

Each serving image runs with the CPU overlay's rendered args, ConfigMap and Secret volumes, the image's own
ENTRYPOINT, ENV, USER and WORKDIR (read from the built image, not from the Dockerfile's text), the model repository
mounted read-only at /models and a fresh emptyDir at /tmp; it must say SERVING through grpc.health.v1, answer
tritonclient on 1,000 real test images, serve /metrics and drain on SIGTERM with exit 0. The model-baked image
serves with no mount; the training image trains one short epoch and exports a model that the CPU image serves.

Containers run with buildah's chroot isolation on the host network (the OCI runtime cannot start containers on
these machines): the server binds 127.0.0.1 on free ports in place of 0.0.0.0:8001/8002.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
from k8s_check import REPO, find_object, secret_volumes

from bench.common import ChildServer, free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("buildah") is None or shutil.which("debootstrap") is None,
        reason="buildah and debootstrap are not installed (make test installs them from Debian's archive)",
    ),
]
TAG = "0.1.0"
CPU, MODEL, TRAINING = f"mnist-serving:{TAG}-cpu", f"mnist-serving:{TAG}-cpu-model", f"mnist-training:{TAG}"
GPU_REHEARSAL = f"mnist-serving:{TAG}-gpu-rehearsal"  # serving.Dockerfile's steps on the CPU stand-in base
BUILD_TIMEOUT_S = 1800
UID = 10001  # the Dockerfiles' USER


@pytest.fixture(scope="module")
def images(trained_repository, tmp_path_factory) -> dict[str, dict]:
    """Build the CPU, model-baked (with the session's trained model) and training images, and the GPU image's
    steps on the stand-in base; their configs."""
    log = tmp_path_factory.mktemp("images") / "build.log"
    with open(log, "w") as out:
        done = subprocess.run(
            ["bash", "deploy/docker/images.sh", "cpu", "model", "training", "gpu-rehearsal"],
            cwd=REPO, env={**os.environ, "REPO": str(trained_repository)}, stdout=out, stderr=subprocess.STDOUT,
            timeout=BUILD_TIMEOUT_S,
        )  # fmt: skip
    assert done.returncode == 0, log.read_text()[-5000:]
    return {name: inspect(name) for name in (CPU, MODEL, TRAINING, GPU_REHEARSAL)}


def inspect(image: str) -> dict:
    out = subprocess.run(["buildah", "inspect", "--type", "image", image], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


class Container:
    """`buildah run` of an image's ENTRYPOINT with `args`: a working container that is removed afterwards."""

    def __init__(self, image: str, config: dict, args: list[str], env: dict, mounts: dict[Path, str], log: Path):
        self.log = log
        self.name = subprocess.run(
            ["buildah", "from", "--pull-never", "-q", image], capture_output=True, text=True, check=True
        ).stdout.strip()
        oci = config["OCIv1"]["config"]
        volumes = [f"--volume={src}:{dst}" for src, dst in mounts.items()]
        envs = [f"--env={k}={v}" for k, v in env.items()]
        cmd = ["buildah", "run", "--isolation", "chroot", "--network", "host", *volumes, *envs, self.name, "--"]
        with open(log, "w") as out:
            self.proc = subprocess.Popen([*cmd, *oci["Entrypoint"], *args], stdout=out, stderr=subprocess.STDOUT)

    def process(self, timeout: float = 60) -> psutil.Process:
        """The container's main process (the image's ENTRYPOINT), as the kubelet would signal it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                if child.name().startswith("python") and "serving" in " ".join(child.cmdline()):
                    return child
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            time.sleep(0.1)
        raise TimeoutError(self.log.read_text()[-3000:])

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def remove(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        subprocess.run(["buildah", "rm", self.name], capture_output=True, timeout=120)


def pod_spec(rendered) -> tuple[dict, dict, list[dict]]:
    """The CPU overlay's Deployment, its server container and the ConfigMaps it reads."""
    objects = rendered["cpu"]
    deployment = find_object(objects, "Deployment", "mnist-serving")
    (server,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "server"]
    return deployment, server, objects


def run_as_the_pod(rendered, image: str, config: dict, tmp_path: Path, repository: Path | None) -> tuple:
    """Start `image` with the CPU overlay's args and env, its Secret volumes, an emptyDir at /tmp and (unless None)
    `repository` mounted read-only at /models; the container, its gRPC and metrics ports and the Deployment."""
    deployment, server, objects = pod_spec(rendered)
    grpc_port, metrics_port = free_port(), free_port()
    ports = {"8001": str(grpc_port), "8002": str(metrics_port), "0.0.0.0": "127.0.0.1"}  # loopback only in tests
    args = [ports.get(a, a) for a in server["args"]]
    env = {}
    for source in server.get("envFrom", []):
        env.update(find_object(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in server.get("env", [])})
    emptydir = tmp_path / "emptydir"
    emptydir.mkdir()
    os.chown(emptydir, UID, UID)
    mounts: dict[Path, str] = {emptydir: "/tmp"}
    if repository is not None:
        mounts[repository] = "/models:ro"
    for mount_path, directory in secret_volumes(deployment, server, tmp_path).items():
        mounts[directory] = f"{mount_path}:ro"
    container = Container(image, config, args, env, mounts, tmp_path / "container.log")
    return container, grpc_port, metrics_port, deployment


def accuracy_with_tritonclient(url: str, mnist_data, n: int = 1000) -> float:
    import tritonclient.grpc as tc

    from serving.contract import INPUT_NAME, OUTPUT_NAME

    client = tc.InferenceServerClient(url)
    x = mnist_data.x_test[:n].reshape(n, 784).astype(np.float32) / np.float32(255.0)
    correct = 0
    for lo in range(0, n, 250):
        batch = x[lo : lo + 250]
        inp = tc.InferInput(INPUT_NAME, list(batch.shape), "FP32")
        inp.set_data_from_numpy(batch)
        result = client.infer("mnist", [inp], outputs=[tc.InferRequestedOutput(OUTPUT_NAME)], client_timeout=30)
        correct += int((result.as_numpy(OUTPUT_NAME).argmax(1) == mnist_data.y_test[lo : lo + 250]).sum())
    client.close()
    return correct / n


def serve_and_drain(rendered, image: str, config: dict, tmp_path: Path, repository: Path | None, mnist_data) -> dict:
    """Run the image as the pod runs it, call it, scrape it, SIGTERM it; what was seen."""
    container, grpc_port, metrics_port, deployment = run_as_the_pod(rendered, image, config, tmp_path, repository)
    try:
        main = container.process()
        ChildServer("image", [], grpc_port, container.log, proc=container.proc).wait_serving(120)
        accuracy = accuracy_with_tritonclient(f"127.0.0.1:{grpc_port}", mnist_data)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        uid = main.uids().effective
        main.send_signal(signal.SIGTERM)  # what the kubelet sends the container's process
        code = container.wait(deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])
    finally:
        container.remove()
    return {"accuracy": accuracy, "metrics": metrics, "uid": uid, "code": code, "log": container.log.read_text()}


def test_the_cpu_image_serves_as_the_manifests_run_it(images, rendered, tmp_path, trained_repository, mnist_data):
    seen = serve_and_drain(rendered, CPU, images[CPU], tmp_path, trained_repository, mnist_data)
    assert seen["code"] == 0, seen["log"][-3000:]
    assert seen["accuracy"] > 0.85, seen["accuracy"]
    assert 'mnist_serving_requests_total{code="OK",model="mnist",version="1"} 4.0' in seen["metrics"]
    assert seen["uid"] == UID  # the Dockerfile's USER, not root
    assert "drained:" in seen["log"] and "Traceback" not in seen["log"], seen["log"][-3000:]
    assert "on CPUExecutionProvider" in seen["log"], seen["log"][-3000:]


def test_the_model_image_serves_with_no_mount(images, rendered, tmp_path, mnist_data):
    seen = serve_and_drain(rendered, MODEL, images[MODEL], tmp_path, None, mnist_data)
    assert seen["code"] == 0 and seen["accuracy"] > 0.85, (seen["accuracy"], seen["log"][-3000:])


def test_the_serving_images_hold_no_training_code(images):
    for image in (CPU, MODEL):
        container = Container(
            image,
            {"OCIv1": {"config": {"Entrypoint": ["python", "-c"]}}},
            ["import importlib.util, sys; sys.exit(importlib.util.find_spec('training') is not None)"],
            {}, {}, Path(os.devnull),
        )  # fmt: skip
        try:
            assert container.wait(120) == 0, f"{image} can import training"
        finally:
            container.remove()


def test_the_training_image_trains_a_model_the_cpu_image_serves(images, rendered, tmp_path, mnist_data):
    models, logs = tmp_path / "models", tmp_path / "logs"
    for directory in (models, logs):
        directory.mkdir()
        os.chown(directory, UID, UID)
    config = images[TRAINING]
    args = [*config["OCIv1"]["config"]["Cmd"], "--epochs", "1"]
    trainer = Container(TRAINING, config, args, {}, {models: "/models", logs: "/logs"}, tmp_path / "training.log")
    try:
        code = trainer.wait(900)
    finally:
        trainer.remove()
    assert code == 0, trainer.log.read_text()[-3000:]
    assert list(models.glob("mnist/*/model.onnx")), trainer.log.read_text()[-3000:]
    served = tmp_path / "served"
    served.mkdir()
    seen = serve_and_drain(rendered, CPU, images[CPU], served, models, mnist_data)
    assert seen["code"] == 0 and seen["accuracy"] > 0.85, (seen["accuracy"], seen["log"][-3000:])


def test_the_gpu_image_steps_build_and_refuse_to_serve_on_cpu_under_require_gpu(images, tmp_path, trained_repository):
    """The GPU Dockerfile's steps (onnxruntime-gpu, its smoke test) on the stand-in base: no CUDA here, so the
    GPU overlay's `--device cuda --require-gpu` must refuse to start, naming the cause."""
    args = ["--host", "127.0.0.1", "--grpc-port", str(free_port()), "--metrics-port", "0", "--model-repository",
            "/models", "--device", "cuda", "--require-gpu"]  # fmt: skip
    config = images[GPU_REHEARSAL]
    container = Container(GPU_REHEARSAL, config, args, {}, {trained_repository: "/models:ro"}, tmp_path / "gpu.log")
    try:
        code = container.wait(120)
    finally:
        container.remove()
    log = container.log.read_text()
    assert code == 1, log[-3000:]
    assert "start-up failed:" in log and "libcuda.so.1" in log, log[-3000:]
