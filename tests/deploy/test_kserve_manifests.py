"""deploy/kserve/: valid against KServe's own CRDs, routed as KServe routes gRPC, and a server started exactly as the
runtime's container starts serves what the storage initializer leaves in /mnt/models."""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
from pathlib import Path

import k8s_check
import pytest
import tritonclient.grpc as tc
import yaml
from k8s_check import KSERVE_CRDS, CheckError, find_object
from server_process import start_server

from serving.config import Settings, parse_args
from serving.server import LIVENESS

MNT_MODELS = "/mnt/models"
# The vendored CRDs, unchanged from kserve/kserve at aaac4e294dae2c7b1aa1886447793f3aa1c30912 (their README).
CRD_SHA256 = {
    "serving.kserve.io_servingruntimes.yaml": "5a262831474e7bd23e7c4f76556d84e1a11fb3ad74a78a6d18cfc71fd8fca7a2",
    "serving.kserve.io_clusterservingruntimes.yaml": "f721d19516670d4a81181e231b1e58cbc32c36435969182ae457fad537151cc8",
    "serving.kserve.io_inferenceservices.yaml": "57c3bf13f77de94678bf2ae3748056ec071ad2b9e88d6a28f44fb4710758fcff",
}


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return k8s_check.kserve_objects()


def runtime(objects: list[dict], kind: str = "ServingRuntime") -> dict:
    return find_object(objects, kind, "mnist-serving")


def predictor(objects: list[dict]) -> dict:
    (container,) = runtime(objects)["spec"]["containers"]
    return container


def container_settings(container: dict, monkeypatch, name: str = "mnist") -> Settings:
    """What the server runs with in the predictor pod: the container's env, then its args ({{.Name}} filled in)."""
    for key in [k for k in os.environ if k.startswith("SERVING_")]:
        monkeypatch.delenv(key)
    for env in container.get("env", []):
        monkeypatch.setenv(env["name"], env["value"])
    return parse_args([a.replace("{{.Name}}", name) for a in container["args"]])


def test_the_vendored_crds_are_kserves_unchanged():
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in KSERVE_CRDS.glob("*.yaml")} == CRD_SHA256


def test_every_manifest_passes_kserves_crd_schemas(objects):
    assert sorted(k8s_check.object_name(o) for o in objects) == [
        "ClusterServingRuntime/mnist-serving", "InferenceService/mnist", "ServingRuntime/mnist-serving",
    ]  # fmt: skip
    for obj in objects:
        k8s_check.validate_object(obj)


@pytest.mark.parametrize(
    ("path", "value", "fragment"),
    [
        (("spec", "protocolVersion"), "grpc-v2", "Additional properties"),  # a field the runtime spec lacks
        (("spec", "supportedModelFormats", 0, "autoSelect"), "yes", "is not of type 'boolean'"),
        (("spec", "containers", 0, "ports", 0, "containerPort"), "8001", "is not of type 'integer'"),
        (("spec", "containers", 0, "startupProbe", "grpc", "sevice"), "", "containers"),  # caught as a Pod
    ],
)
def test_strict_validation_rejects_unknown_and_mistyped_fields(objects, path, value, fragment):
    broken = copy.deepcopy(runtime(objects))
    target = broken
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(CheckError, match=fragment):
        k8s_check.validate_object(broken)


def test_the_cluster_runtime_is_the_same_runtime(objects):
    assert runtime(objects, "ClusterServingRuntime")["spec"] == runtime(objects)["spec"]


def test_kserve_routes_it_as_grpc_v2_to_this_server(objects, monkeypatch):
    spec = runtime(objects)["spec"]
    container = predictor(objects)
    settings = container_settings(container, monkeypatch)
    assert [f["name"] for f in spec["supportedModelFormats"]] == ["onnx"]
    assert spec["protocolVersions"] == ["grpc-v2"]
    assert container["name"] == "kserve-container"
    # One port (Knative allows one), named h2c so both modes route it as HTTP/2 cleartext, the server's gRPC port.
    assert container["ports"] == [{"name": "h2c", "containerPort": settings.grpc_port, "protocol": "TCP"}]
    assert settings.host == "0.0.0.0"
    assert str(settings.model_repository) == MNT_MODELS and settings.model_name == "mnist"
    assert spec["annotations"] == {
        "prometheus.kserve.io/port": str(settings.metrics_port),
        "prometheus.kserve.io/path": "/metrics",
    }
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["grpc"] == {"port": settings.grpc_port}, probe
    assert container["livenessProbe"]["grpc"] == {"port": settings.grpc_port, "service": LIVENESS}


def test_resources_are_the_measured_pod_shape(objects):
    base = yaml.safe_load((k8s_check.K8S / "base" / "deployment.yaml").read_text())
    (server,) = base["spec"]["template"]["spec"]["containers"]
    assert predictor(objects)["resources"] == server["resources"]


def test_the_inference_service_uses_the_runtime_over_grpc(objects):
    isvc = find_object(objects, "InferenceService", "mnist")
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime(objects)["metadata"]["name"]
    assert model["modelFormat"]["name"] in [f["name"] for f in runtime(objects)["spec"]["supportedModelFormats"]]
    assert model["protocolVersion"] in runtime(objects)["spec"]["protocolVersions"]
    assert model["storageUri"]


# ---------------------------------------------------------------- the runtime's container, started for real


def _lay_out(kind: str, version_dir: Path, mnt: Path) -> None:
    """What the storage initializer leaves in /mnt/models for a storageUri holding one model's version folders,
    one bare model, or a whole repository."""
    if kind == "version folders":
        shutil.copytree(version_dir, mnt / "1")
    elif kind == "one model file":
        shutil.copytree(version_dir, mnt)
    else:
        shutil.copytree(version_dir, mnt / "digits" / "1")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("layout", "served_as"), [("version folders", "mnist"), ("one model file", "mnist"), ("repository", "digits")]
)
def test_the_runtime_container_serves_what_the_storage_initializer_left(
    objects, layout, served_as, trained_repository, tmp_path, mnist_data
):
    """The container's args and env as written, except: /mnt/models is a tmp dir (the only change in the args),
    SERVING_HOST is left out (loopback, not 0.0.0.0) and the launcher's free ports win over SERVING_*_PORT."""
    container = predictor(objects)
    mnt = tmp_path / "mnt" / "models"
    _lay_out(layout, trained_repository / "mnist" / "1", mnt)
    args = [a.replace(MNT_MODELS, str(mnt)).replace("{{.Name}}", "mnist") for a in container["args"]]
    env = {e["name"]: e["value"] for e in container["env"] if e["name"] != "SERVING_HOST"}
    server = start_server(mnt, tmp_path, *args, env=env)
    client = tc.InferenceServerClient(server.url)
    try:
        images = mnist_data.x_test[:64].reshape(64, 784)
        tensor = tc.InferInput("input", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        result = client.infer(served_as, [tensor])
        ready = client.is_model_ready(served_as)
        index = client.get_model_repository_index(as_json=True)
    finally:
        client.close()
        code = server.stop()
    assert code == 0, server.log()
    assert ready
    accuracy = (result.as_numpy("probabilities").argmax(axis=1) == mnist_data.y_test[:64]).mean()
    assert accuracy > 0.85, accuracy
    assert result.get_response().model_version == "1"
    assert index["models"] == [{"name": served_as, "version": "1", "state": "READY"}]
