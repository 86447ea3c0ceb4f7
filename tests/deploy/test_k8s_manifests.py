"""The rendered Kubernetes manifests are schema-valid and agree with the server's real flags and settings."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import k8s_check
import pytest
import yaml
from k8s_check import CheckError, find_object

from serving.config import Settings, parse_args

SERVING = ["cpu", "gpu"]
NAMESPACED_KINDS = {
    "ServiceAccount", "ConfigMap", "Service", "Deployment", "PodDisruptionBudget", "HorizontalPodAutoscaler",
    "ServiceMonitor", "PrometheusRule", "PersistentVolumeClaim", "Job",
}  # fmt: skip


def deployment(objects: list[dict]) -> dict:
    return find_object(objects, "Deployment", "mnist-serving")


def pod_spec(objects: list[dict]) -> dict:
    return deployment(objects)["spec"]["template"]["spec"]


def server(objects: list[dict]) -> dict:
    (container,) = [c for c in pod_spec(objects)["containers"] if c["name"] == "server"]
    return container


def container_env(objects: list[dict]) -> dict[str, str]:
    """The server container's environment as Kubernetes builds it: envFrom ConfigMaps, then env."""
    env: dict[str, str] = {}
    container = server(objects)
    for source in container.get("envFrom", []):
        env.update(find_object(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", [])})
    return env


@pytest.fixture
def effective_settings(monkeypatch):
    """Settings the server would run with in the rendered pod: its environment plus its args."""

    def resolve(objects: list[dict]) -> Settings:
        for key in [k for k in os.environ if k.startswith("SERVING_")]:
            monkeypatch.delenv(key)
        for key, value in container_env(objects).items():
            monkeypatch.setenv(key, value)
        return parse_args(server(objects)["args"])

    return resolve


def all_containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


# ---------------------------------------------------------------- schemas


@pytest.mark.parametrize("name", list(k8s_check.KUSTOMIZATIONS))
def test_every_object_passes_strict_schema_validation(rendered, name):
    kinds = set()
    for obj in rendered[name]:
        k8s_check.validate_object(obj)
        kinds.add(obj["kind"])
    if name in SERVING:
        assert kinds == {
            "ServiceAccount", "ConfigMap", "Service", "Deployment", "PodDisruptionBudget",
            "HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule",
        }  # fmt: skip
    else:
        assert kinds == {"PersistentVolumeClaim", "Job"}


def test_strict_validation_rejects_unknown_and_mistyped_fields(rendered):
    bad = copy.deepcopy(deployment(rendered["cpu"]))
    bad["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(CheckError, match="livenesProbe"):
        k8s_check.validate_object(bad)
    bad = copy.deepcopy(deployment(rendered["cpu"]))
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(CheckError):
        k8s_check.validate_object(bad)


def test_custom_resource_checks_reject_broken_objects(rendered):
    monitor = copy.deepcopy(find_object(rendered["cpu"], "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["interval"] = "often"
    with pytest.raises(CheckError, match="interval"):
        k8s_check.validate_object(monitor)
    rule = copy.deepcopy(find_object(rendered["cpu"], "PrometheusRule"))
    rule["spec"]["groups"][0]["rules"][0]["alert"] = "Both"
    with pytest.raises(CheckError, match="record or alert"):
        k8s_check.validate_object(rule)


@pytest.mark.parametrize("name", list(k8s_check.KUSTOMIZATIONS))
def test_objects_are_namespaced_together_and_images_pinned(rendered, name):
    for obj in rendered[name]:
        if obj["kind"] in NAMESPACED_KINDS:
            assert obj["metadata"].get("namespace") == "mnist", k8s_check.object_name(obj)
        spec = obj.get("spec", {}).get("template", {}).get("spec")
        for container in all_containers(spec) if spec else []:
            image = container["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"unpinned {image}"


# ---------------------------------------------------------------- the server's flags and settings


@pytest.mark.parametrize("name", SERVING)
def test_args_and_configmap_are_real_server_settings(rendered, name, effective_settings):
    objects = rendered[name]
    for key in container_env(objects):
        if key.startswith("SERVING_"):
            field = key.removeprefix("SERVING_").lower()
            assert field in Settings.model_fields, f"{key} is not a serving.config.Settings field"
    settings = effective_settings(objects)  # raises on an unknown flag or an invalid value
    assert settings.host == "0.0.0.0"
    mounts = {m["mountPath"]: m for m in server(objects)["volumeMounts"]}
    assert str(settings.model_repository) in mounts, "the model repository must be a mounted volume"
    assert mounts[str(settings.model_repository)].get("readOnly") is True


@pytest.mark.parametrize("name", SERVING)
def test_probes_and_ports_match_the_server(rendered, name, effective_settings):
    from serving.server import LIVENESS

    objects = rendered[name]
    settings = effective_settings(objects)
    container = server(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": settings.grpc_port, "metrics": settings.metrics_port}
    for probe in ("startupProbe", "readinessProbe"):
        # Service "" (no `service`) is SERVING only when the models are loaded and not draining.
        assert container[probe]["grpc"] == {"port": settings.grpc_port}, probe
    assert container["livenessProbe"]["grpc"] == {"port": settings.grpc_port, "service": LIVENESS}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "allow 2 minutes to load models"


@pytest.mark.parametrize("name", SERVING)
def test_termination_grace_covers_the_whole_drain(rendered, name, effective_settings):
    from serving.server import REFUSE_MAX_S, TRACE_FLUSH_S

    objects = rendered[name]
    settings = effective_settings(objects)
    # The server drains by itself on SIGTERM (no preStop hook, which would only add to the time).
    assert "lifecycle" not in server(objects)
    # ... and then exports the spans still queued (when tracing is on).
    drain = settings.drain_delay_s + REFUSE_MAX_S + settings.grace_period_s + TRACE_FLUSH_S
    grace = pod_spec(objects)["terminationGracePeriodSeconds"]
    assert grace > drain, (grace, drain)
    assert settings.drain_delay_s >= 5, "kube-proxy and client health checks need seconds to notice"


@pytest.mark.parametrize("name", SERVING)
def test_connections_age_so_new_pods_get_traffic(rendered, name, effective_settings):
    settings = effective_settings(objects := rendered[name])
    assert 0 < settings.max_connection_age_s <= 60, "without an age limit a scale-out never reaches old clients"
    assert settings.max_connection_age_grace_s >= 1
    assert settings.version_policy.startswith("latest:"), objects[0]["kind"]


@pytest.mark.parametrize("name", SERVING)
def test_threads_fit_the_cpu_limit(rendered, name, effective_settings):
    objects = rendered[name]
    settings = effective_settings(objects)
    cpu_limit = float(server(objects)["resources"]["limits"]["cpu"])
    assert settings.intra_op_threads >= 1, "0 lets onnxruntime size its pool by the node's cores, not the limit"
    assert settings.intra_op_threads * settings.workers <= cpu_limit


@pytest.mark.parametrize("name", SERVING)
def test_writable_paths_are_emptydirs(rendered, name, effective_settings):
    objects = rendered[name]
    spec = pod_spec(objects)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in server(objects)["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    if effective_settings(objects).workers > 1:
        prom = container_env(objects).get("PROMETHEUS_MULTIPROC_DIR")
        assert prom and prom.startswith("/tmp/"), "worker processes share metrics through a writable dir"


@pytest.mark.parametrize("name", SERVING)
def test_pods_are_locked_down(rendered, name):
    spec = pod_spec(rendered[name])
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    assert find_object(rendered[name], "ServiceAccount")["automountServiceAccountToken"] is False
    for container in all_containers(spec):
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), (container["name"], kind)


def test_image_user_matches_pod_user(rendered):
    from k8s_check import DOCKER, last, stages

    for name, dockerfile in (("cpu", "serving-cpu.Dockerfile"), ("gpu", "serving.Dockerfile")):
        user = last(stages(DOCKER / dockerfile)[-1], "USER")
        assert int(user.split(":")[0]) == pod_spec(rendered[name])["securityContext"]["runAsUser"]


# ---------------------------------------------------------------- overlays


def test_gpu_overlay_requires_a_gpu(rendered, effective_settings):
    objects = rendered["gpu"]
    settings = effective_settings(objects)
    assert settings.device == "cuda" and settings.require_gpu is True
    container = server(objects)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith("-gpu")
    spec = pod_spec(objects)
    assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    strategy = deployment(objects)["spec"]["strategy"]["rollingUpdate"]
    # No surge (no spare GPU needed), so a rollout or node drain is an outage unless another replica serves.
    assert strategy["maxSurge"] == 0 and strategy["maxUnavailable"] == 1
    assert find_object(objects, "HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 2
    # onnxruntime-gpu links CUDA 13: only nodes whose driver is >= 580.
    (term,) = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    (driver,) = [e for e in term["matchExpressions"] if e["key"] == "nvidia.com/cuda.driver-version.major"]
    assert driver["operator"] == "Gt" and int(driver["values"][0]) == 579


def test_cpu_overlay_runs_one_process_per_pod_on_cpu(rendered, effective_settings):
    objects = rendered["cpu"]
    settings = effective_settings(objects)
    assert settings.device == "cpu" and settings.require_gpu is False and settings.workers == 1
    container = server(objects)
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert container["image"].endswith("-cpu")
    assert find_object(objects, "HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 2


# ---------------------------------------------------------------- services, monitoring, scaling


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("name", SERVING)
def test_services_route_to_named_container_ports(rendered, name):
    objects = rendered[name]
    pod_labels = deployment(objects)["spec"]["template"]["metadata"]["labels"]
    container_ports = {p["name"] for p in server(objects)["ports"]}
    main = find_object(objects, "Service", "mnist-serving")
    headless = find_object(objects, "Service", "mnist-serving-headless")
    assert main["spec"]["type"] == "ClusterIP" and headless["spec"]["clusterIP"] == "None"
    for service in (main, headless):
        assert _selects(service["spec"]["selector"], pod_labels)
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports
    ports = {p["name"]: p for p in main["spec"]["ports"]}
    assert ports["grpc"]["appProtocol"] == "grpc" and ports["grpc"]["port"] == 8001
    assert ports["metrics"]["port"] == 8002
    assert [p["name"] for p in headless["spec"]["ports"]] == ["grpc"]
    assert _selects(deployment(objects)["spec"]["selector"]["matchLabels"], pod_labels)


@pytest.mark.parametrize("name", SERVING)
def test_servicemonitor_scrapes_the_metrics_port_once(rendered, name):
    objects = rendered[name]
    monitor = find_object(objects, "ServiceMonitor")
    wanted = monitor["spec"]["selector"]["matchLabels"]
    selected = [s for s in objects if s["kind"] == "Service" and _selects(wanted, s["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in selected] == ["mnist-serving"], "exactly one Service, or double scrapes"
    service_ports = {p["name"] for p in selected[0]["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert "metrics" in service_ports and monitor["spec"]["endpoints"][0]["path"] == "/metrics"


@pytest.mark.parametrize("name", SERVING)
def test_pdb_and_hpa_target_the_deployment(rendered, name):
    objects = rendered[name]
    pod_labels = deployment(objects)["spec"]["template"]["metadata"]["labels"]
    pdb = find_object(objects, "PodDisruptionBudget")
    assert _selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    hpa = find_object(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "mnist-serving"}
    assert "replicas" not in deployment(objects)["spec"], "the HPA owns the replica count"
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    kinds = {m["type"] for m in hpa["spec"]["metrics"]}
    assert kinds == {"Resource", "Pods"}
    (pods,) = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    # Queue time, not requests in flight (which a 15 s sample of millisecond calls reads as ~0).
    assert pods["metric"]["name"] == "mnist_serving_queue_duration_seconds_mean"


def test_hpa_custom_metric_is_served_by_the_adapter_rules(rendered):
    adapter = yaml.safe_load(k8s_check.ADAPTER_VALUES.read_text())["rules"]["custom"]
    exposed = {rule["name"]["as"] for rule in adapter}
    for name in SERVING:
        for metric in find_object(rendered[name], "HorizontalPodAutoscaler")["spec"]["metrics"]:
            if metric["type"] == "Pods":
                assert metric["pods"]["metric"]["name"] in exposed
    assert not k8s_check.unknown_metrics(k8s_check.adapter_exprs())


@pytest.mark.parametrize("name", SERVING)
def test_monitoring_copies_match_their_sources(rendered, name):
    objects = rendered[name]
    k8s_check.check_prometheus_rule_matches_rules_file(objects)
    dashboard = find_object(objects, "ConfigMap", "mnist-serving-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"]["mnist-serving.json"] == k8s_check.DASHBOARD.read_text()


def test_sync_check_detects_a_stale_copy(tmp_path):
    deploy = tmp_path / "deploy"
    shutil.copytree(k8s_check.DEPLOY, deploy, ignore=shutil.ignore_patterns("__pycache__"))
    sync = [sys.executable, str(deploy / "k8s" / "sync.py")]
    assert subprocess.run([*sync, "--check"]).returncode == 0
    rules = deploy / "prometheus" / "rules.yml"
    rules.write_text(rules.read_text().replace("> 0.25", "> 0.5"))
    assert subprocess.run([*sync, "--check"], capture_output=True).returncode == 1
    subprocess.run(sync, check=True)
    assert subprocess.run([*sync, "--check"]).returncode == 0
    rule = yaml.safe_load((deploy / "k8s" / "components" / "monitoring" / "prometheusrule.yaml").read_text())
    assert rule["spec"]["groups"] == yaml.safe_load(rules.read_text())["groups"]


# ---------------------------------------------------------------- model loading


def test_training_job_writes_where_the_server_reads(rendered):
    from training.train import parse_args as training_args

    job = find_object(rendered["training"], "Job")
    pvc = find_object(rendered["training"], "PersistentVolumeClaim")
    spec = job["spec"]["template"]["spec"]
    (train,) = spec["containers"]
    config = training_args(train["args"])  # the real training CLI must accept the Job's flags
    volumes = {v["name"]: v for v in spec["volumes"]}
    (store,) = [m for m in train["volumeMounts"] if "persistentVolumeClaim" in volumes[m["name"]]]
    assert volumes[store["name"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    written = Path(config.model_repository).relative_to(store["mountPath"])
    assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsUser"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    for name in SERVING:
        objects = rendered[name]
        volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
        (mount,) = [m for m in server(objects)["volumeMounts"] if m["mountPath"] == "/models"]
        assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        assert mount["subPath"] == str(written), "the server must mount the directory the Job writes"
        assert pod_spec(objects)["securityContext"]["runAsUser"] == spec["securityContext"]["runAsUser"]


def test_model_from_image_component_replaces_the_volume(tmp_path):
    if k8s_check.kubectl() is None:
        pytest.skip("kubectl is not installed (it renders the kustomizations)")
    k8s = tmp_path / "k8s"
    shutil.copytree(k8s_check.K8S, k8s)
    overlay = k8s / "overlays" / "cpu-model"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "resources: [../cpu]\ncomponents: [../../components/model-from-image]\n"
        "images: [{name: mnist-model, newName: registry.example.com/mnist/mnist-serving, newTag: 0.1.0-cpu-model}]\n"
    )
    objects = k8s_check.render(overlay)
    for obj in objects:
        k8s_check.validate_object(obj)
    spec = pod_spec(objects)
    volumes = {v["name"]: v for v in spec["volumes"]}
    (init,) = spec["initContainers"]
    (target,) = init["volumeMounts"]
    assert volumes[target["name"]] == {"name": target["name"], "emptyDir": {"sizeLimit": "256Mi"}}
    assert init["command"][-1].rstrip("/") == target["mountPath"] and init["command"][-2] == "/models/."
    (mount,) = [m for m in server(objects)["volumeMounts"] if m["mountPath"] == "/models"]
    assert mount["name"] == target["name"] and "subPath" not in mount
    assert not any("persistentVolumeClaim" in v for v in spec["volumes"])
    assert init["image"].endswith("-model")


def test_model_store_names_a_storage_class(rendered):
    (claim,) = [o for o in rendered["training"] if o["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"].get("storageClassName"), "no class: Pending on most clouds' ReadWriteOnce defaults"


@pytest.mark.parametrize("name", SERVING)
def test_every_pod_mounts_the_shared_receipt_key(rendered, name, effective_settings):
    objects = rendered[name]
    assert "mnist-serving-receipt-key/key" in k8s_check.check_receipt_key(objects)
    key_file = effective_settings(objects).receipt_key_file
    assert key_file is not None and key_file.is_absolute()


def test_receipt_key_check_rejects_a_pod_without_the_shared_key(rendered):
    def broken(change) -> list[dict]:
        objects = copy.deepcopy(rendered["cpu"])
        change(objects)
        return objects

    def no_env(objects):
        for o in objects:
            if o["kind"] == "ConfigMap" and "SERVING_RECEIPT_KEY_FILE" in o.get("data", {}):
                del o["data"]["SERVING_RECEIPT_KEY_FILE"]

    def other_dir(objects):
        server(objects).setdefault("env", []).append({"name": "SERVING_RECEIPT_KEY_FILE", "value": "/tmp/key"})

    def writable(objects):
        for m in server(objects)["volumeMounts"]:
            m.pop("readOnly", None)

    def optional(objects):
        for v in pod_spec(objects)["volumes"]:
            if "secret" in v:
                v["secret"]["optional"] = True

    def no_secret(objects):
        spec = pod_spec(objects)
        spec["volumes"] = [v if "secret" not in v else {"name": v["name"], "emptyDir": {}} for v in spec["volumes"]]

    for change in (no_env, other_dir, writable, optional, no_secret):
        with pytest.raises(CheckError):
            k8s_check.check_receipt_key(broken(change))


def test_the_commented_tracing_settings_are_a_valid_configuration():
    """serving.env and both KServe runtimes carry tracing commented out: uncommented, the server accepts them."""
    import yaml

    from serving.tracing import TracingConfig

    base = Path(__file__).resolve().parents[2] / "deploy"
    lines = (base / "k8s" / "base" / "serving.env").read_text().splitlines()
    env = dict(line.removeprefix("# ").split("=", 1) for line in lines if line.startswith("# OTEL_"))
    configs = [TracingConfig.read(env)]
    for name in ("servingruntime.yaml", "clusterservingruntime.yaml"):
        text = (base / "kserve" / name).read_text()
        text = "\n".join(
            line.replace("# - name: OTEL", "- name: OTEL").replace("#   value:", "  value:")
            for line in text.splitlines()
        )
        container = yaml.safe_load(text)["spec"]["containers"][0]
        configs.append(TracingConfig.read({e["name"]: e["value"] for e in container["env"]}))
    for config in configs:
        assert (config.exporter, config.protocol, config.sampler, config.ratio) == (
            "otlp",
            "grpc",
            "parentbased_traceidratio",
            0.01,
        )
