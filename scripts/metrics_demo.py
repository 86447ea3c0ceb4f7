"""Metrics demo: the server, a real Prometheus scraping it every second, labelled traffic, PromQL answers.

    python scripts/metrics_demo.py [--seconds 8] [--json out.json]      (or: make metrics-demo)

Starts `python -m serving` (canary on, an accuracy window larger than the traffic) and `prometheus` on
127.0.0.1, streams the MNIST test set with ground truth (the `labels`/`label` request parameters on half
the requests, Feedback RPCs on the other half), waits for the scrape, asks Prometheus's HTTP API for
latency quantiles, throughput and the four accuracies, prints them beside what the client measured,
and stops both processes. Everything lives in a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from bench.common import ChildServer, find_model, free_port, serving_cmd  # noqa: E402
from serving.client import feedback_request, infer_request, probabilities, receipt_of  # noqa: E402
from serving.protos import feedback_pb2_grpc  # noqa: E402
from serving.protos import grpc_service_pb2_grpc as pb_grpc  # noqa: E402

RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
JOB = "mnist-serving"  # the job name deploy/prometheus/rules.yml expects
MODEL = "mnist"
SCRAPE_S = 1
DURATION = "mnist_serving_request_duration_seconds"


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait(what: str, check, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Poll `check()` until it returns something truthy; fail with the process log if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log else ""
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{tail}")
        try:
            result = check()
        except (OSError, grpc.RpcError, ValueError):
            result = None
        if result:
            return result
        time.sleep(0.1)
    tail = log.read_text()[-3000:] if log else ""
    raise TimeoutError(f"{what}: not within {timeout:.0f}s\n{tail}")


class Prometheus:
    """A Prometheus server scraping one target every SCRAPE_S seconds; PromQL over its HTTP API."""

    def __init__(self, binary: str, workdir: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.rules = _usable_rules()
        config = {
            "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
            "rule_files": [str(self.rules)] if self.rules else [],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
        }
        config_path = workdir / "prometheus.yml"
        config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        self.log = workdir / "prometheus.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [
                    binary, f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
                ],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.started = time.time()
        _wait("prometheus ready", self._ready, 20, self.proc, self.log)

    def _ready(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
            return r.status == 200

    def query(self, expr: str, at: float | None = None) -> list[tuple[dict, float]]:
        """An instant query: [(labels, value)] (a scalar answer comes back as one unlabelled pair)."""
        params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}", timeout=10) as r:
            body = json.load(r)
        if body["status"] != "success":
            raise RuntimeError(f"PromQL {expr!r}: {body}")
        data = body["data"]
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        return [(item["metric"], float(item["value"][1])) for item in data["result"]]

    def value(self, expr: str, at: float | None = None) -> float | None:
        """The single value of a query, or None when the answer is empty."""
        result = self.query(expr, at)
        if len(result) > 1:
            raise RuntimeError(f"PromQL {expr!r} gave {len(result)} series, expected one: {result}")
        return result[0][1] if result else None

    def since_start(self) -> str:
        """A range selector covering everything this Prometheus ever scraped."""
        return f"{math.ceil(time.time() - self.started) + 5}s"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _usable_rules() -> Path | None:
    """deploy/prometheus/rules.yml if it exists and promtool accepts it (it is edited elsewhere)."""
    if not RULES.is_file():
        return None
    promtool = shutil.which("promtool")
    if promtool is not None:
        check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
        if check.returncode != 0:
            sys.stderr.write(f"warning: {RULES} does not pass promtool, running without rules:\n{check.stdout}\n")
            return None
    return RULES


class Server:
    """`python -m serving` on loopback: the default ports 8001/8002 if free, else free ones."""

    def __init__(self, args, workdir: Path) -> None:
        defaults = _port_free(8001) and _port_free(8002)
        self.grpc_port, self.metrics_port = (8001, 8002) if defaults else (free_port(), free_port())
        self.url = f"127.0.0.1:{self.grpc_port}"
        self.log = workdir / "server.log"
        extra = [
            "--data-dir", str(args.data_dir), "--canary-interval-s", str(SCRAPE_S),
            "--canary-images", str(args.canary_images),
            # The window holds every labelled answer of the demo, so it must equal the counters' ratio.
            "--accuracy-window", str(args.max_images), "--feedback-capacity", "100000",
        ]  # fmt: skip
        cmd = serving_cmd(args.model_repository, self.grpc_port, self.metrics_port, *extra)
        self.child = ChildServer("serving", cmd, self.grpc_port, self.log, metrics_port=self.metrics_port).start()
        self.proc = self.child.proc
        try:
            self.child.wait_serving(60)
        except BaseException:
            self.child.stop()
            raise

    def stop(self) -> int | None:
        """SIGTERM (a drain), SIGKILL for what is left after 30 s; the server's exit code."""
        self.child.stop(grace=30.0)
        return self.proc.returncode


@dataclass
class Traffic:
    """What the client sent and knows."""

    requests: int = 0
    images: int = 0
    labelled_by_parameter: int = 0
    labelled_by_feedback: int = 0
    correct: int = 0
    seconds: float = 0.0
    ended_at: float = 0.0  # time.time() when the last answer arrived
    version: str = ""  # the model version that answered
    latencies_s: list[float] = field(default_factory=list)

    @property
    def labelled(self) -> int:
        return self.labelled_by_parameter + self.labelled_by_feedback


def send_traffic(url: str, x: np.ndarray, y: np.ndarray, seconds: float, sizes: list[int], max_images: int) -> Traffic:
    """Cycle through (x, y) in batches of `sizes` for `seconds`; every image's label reaches the server."""
    t = Traffic()
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(url, options=options) as channel:
        infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        feedback = feedback_pb2_grpc.FeedbackServiceStub(channel).SendFeedback
        offset, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            n = sizes[t.requests % len(sizes)]
            if t.images + n > max_images:
                break
            if offset + n > len(x):
                offset = 0
            images, labels = x[offset : offset + n], y[offset : offset + n]
            offset += n
            by_parameter = t.requests % 2 == 0
            request = infer_request(images, MODEL)
            if by_parameter and n == 1:
                request.parameters["label"].int64_param = int(labels[0])
            elif by_parameter:
                request.parameters["labels"].string_param = ",".join(map(str, labels.tolist()))
            t0 = time.perf_counter()
            response = infer(request, timeout=30)
            t.latencies_s.append(time.perf_counter() - t0)
            t.version = response.model_version
            t.correct += int((probabilities(response).argmax(axis=1) == labels).sum())
            if by_parameter:
                t.labelled_by_parameter += n
            else:
                reply = feedback(feedback_request(receipt_of(response), labels), timeout=30)
                if reply.matched != n:
                    raise RuntimeError(f"feedback for request {t.requests} matched {reply.matched} of {n} images")
                t.labelled_by_feedback += n
            t.requests += 1
            t.images += n
        t.seconds = time.perf_counter() - started
        t.ended_at = time.time()
    return t


def ask_prometheus(prom: Prometheus, traffic: Traffic) -> tuple[dict, dict]:
    """The PromQL questions and Prometheus's answers (after it has scraped the end of the traffic)."""
    everything = prom.since_start()
    # rate() over a short window ending with the traffic: the server's own images/s while it was loaded.
    window = f"{max(2, min(5, math.floor(traffic.seconds)))}s"
    mv = f'model="{MODEL}",version="{traffic.version}"'
    labelled = f'mnist_serving_feedback_total{{{mv},outcome=~"correct|incorrect"}}'
    questions = {
        "p50_s": f"histogram_quantile(0.50, sum by (le) (rate({DURATION}_bucket[{everything}])))",
        "p99_s": f"histogram_quantile(0.99, sum by (le) (rate({DURATION}_bucket[{everything}])))",
        "queue_p99_s": "histogram_quantile(0.99, sum by (le) "
        f"(rate(mnist_serving_queue_duration_seconds_bucket[{everything}])))",
        "compute_p50_s": "histogram_quantile(0.50, sum by (le) "
        f"(rate(mnist_serving_compute_duration_seconds_bucket[{everything}])))",
        "images_per_s": f"sum(rate(mnist_serving_images_total[{window}]))",
        "requests_per_s": f'sum(rate(mnist_serving_requests_total{{code="OK"}}[{window}]))',
        "online_accuracy_gauge": f"mnist_serving_online_accuracy{{{mv}}}",
        "online_accuracy_counters": f'sum(mnist_serving_feedback_total{{{mv},outcome="correct"}}) / sum({labelled})',
        "offline_accuracy": f"mnist_serving_offline_accuracy{{{mv}}}",
        "canary_accuracy": f"mnist_serving_canary_accuracy{{{mv}}}",
        "requests_ok": 'sum(mnist_serving_requests_total{code="OK"})',
        "requests_failed": 'sum(mnist_serving_requests_total{code!="OK"}) or vector(0)',
        "feedback_not_scored": 'sum(mnist_serving_feedback_total{outcome!~"correct|incorrect"}) or vector(0)',
        "firing_alerts": 'count(ALERTS{alertstate="firing"}) or vector(0)',
    }
    at_end = {"images_per_s", "requests_per_s"}
    answers = {name: prom.value(expr, traffic.ended_at if name in at_end else None) for name, expr in questions.items()}
    buckets = prom.query(f"sum by (le) ({DURATION}_bucket)")
    answers["duration_buckets"] = {labels["le"]: value for labels, value in buckets}
    answers["provider"] = [labels.get("provider") for labels, _ in prom.query("mnist_serving_execution_provider_info")]
    return questions, answers


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None or math.isnan(seconds) else f"{seconds * 1e3:.3f} ms"


def _frac(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def report(server: Server, prom: Prometheus, traffic: Traffic, questions: dict, answers: dict, test_accuracy) -> None:
    lat = np.array(traffic.latencies_s)
    client_p50, client_p99 = (np.percentile(lat, q, method="inverted_cdf") for q in (50, 99))
    a = answers
    images_per_s, requests_per_s = traffic.images / traffic.seconds, traffic.requests / traffic.seconds
    sent = f"{traffic.requests} sent"
    rows = [
        ("request latency p50", "p50_s", _ms(a["p50_s"]), _ms(client_p50)),
        ("request latency p99", "p99_s", _ms(a["p99_s"]), _ms(client_p99)),
        ("queue wait p99", "queue_p99_s", _ms(a["queue_p99_s"]), ""),
        ("compute p50 (per batch)", "compute_p50_s", _ms(a["compute_p50_s"]), ""),
        ("throughput, images/s", "images_per_s", f"{a['images_per_s']:,.0f}", f"{images_per_s:,.0f}"),
        ("throughput, requests/s", "requests_per_s", f"{a['requests_per_s']:,.0f}", f"{requests_per_s:,.0f}"),
        ("online accuracy (window gauge)", "online_accuracy_gauge", _frac(a["online_accuracy_gauge"]), ""),
        ("online accuracy (feedback counters)", "online_accuracy_counters", _frac(a["online_accuracy_counters"]),
         f"{traffic.correct / traffic.labelled:.4f} ({traffic.correct}/{traffic.labelled} known correct)"),
        ("offline accuracy (metadata.json)", "offline_accuracy", _frac(a["offline_accuracy"]), _frac(test_accuracy)),
        ("canary accuracy (golden set)", "canary_accuracy", _frac(a["canary_accuracy"]), ""),
        ("requests OK / failed", "requests_ok", f"{a['requests_ok']:.0f} / {a['requests_failed']:.0f}", sent),
        ("firing alerts", "firing_alerts", f"{a['firing_alerts']:.0f}", ""),
    ]  # fmt: skip
    rules = RULES.relative_to(ROOT) if prom.rules else "none"
    print(f"server   {server.url} (/metrics on :{server.metrics_port}), providers {sorted(set(a['provider']))}")
    print(f"prometheus {prom.url}, scraping every {SCRAPE_S}s, rules: {rules}")
    print(
        f"traffic  {traffic.seconds:.1f}s: {traffic.requests} requests, {traffic.images} MNIST test images, all "
        f"labelled ({traffic.labelled_by_parameter} via the labels parameter, {traffic.labelled_by_feedback} "
        "via Feedback RPCs)\n"
    )
    print(f"{'':38}{'Prometheus':>14}   client")
    for title, _, prom_value, client_value in rows:
        print(f"{title:38}{prom_value:>14}   {client_value}")
    print("\nPromQL:")
    for title, key, *_ in rows:
        print(f"  {title:38}{questions[key]}")
    print("\n(server-side latency is decode to encode inside the server; the client adds gRPC and Python time)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--seconds", type=float, default=8.0, help="how long to send traffic (default 8)")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64", help="cycled request sizes")
    parser.add_argument("--max-images", type=int, default=1_000_000, help="stop the traffic after this many")
    parser.add_argument("--canary-images", type=int, default=1000)
    parser.add_argument("--prometheus", default="prometheus", help="the Prometheus server binary")
    parser.add_argument("--json", type=Path, help="also write every number (and the client latencies) here")
    return parser


def _test_accuracy(repository: Path) -> float | None:
    """The recorded test accuracy of the version the demo's unversioned requests reach."""
    try:
        metadata = find_model(repository, MODEL).parent / "metadata.json"
        return json.loads(metadata.read_text()).get("test_accuracy")
    except FileNotFoundError:
        return None


def _demo(server: Server, prom: Prometheus, data, args, test_accuracy: float | None) -> None:
    """Traffic, then what Prometheus says of it, reported (and written to --json)."""
    # Traffic starts only once Prometheus holds the all-zero series: rate() then sees all of it.
    _wait("first scrape", lambda: prom.query(f"{DURATION}_count"), 20, prom.proc, prom.log)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    traffic = send_traffic(server.url, data.x_test, data.y_test, args.seconds, sizes, args.max_images)

    def scraped_everything() -> bool:
        labelled = prom.value('sum(mnist_serving_feedback_total{outcome=~"correct|incorrect"})')
        return (
            prom.value('sum(mnist_serving_requests_total{code="OK"})') == traffic.requests
            and labelled == traffic.labelled
            and bool(prom.query(f'mnist_serving_canary_accuracy{{version="{traffic.version}"}}'))
        )

    _wait("the scrape after the traffic", scraped_everything, 20, prom.proc, prom.log)
    questions, answers = ask_prometheus(prom, traffic)
    report(server, prom, traffic, questions, answers, test_accuracy)
    if args.json:
        result = {
            "client": asdict(traffic) | {"labelled": traffic.labelled},
            "prometheus": answers,
            "promql": questions,
            "server": {"test_accuracy": test_accuracy, "canary_images": args.canary_images},
        }
        args.json.write_text(json.dumps(result, indent=1))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.model_repository, args.data_dir = args.model_repository.resolve(), args.data_dir.resolve()
    binary = shutil.which(args.prometheus)
    if binary is None:
        sys.stderr.write("prometheus not found: `make prometheus-bin` (Debian package prometheus)\n")
        return 2
    from training.data import load_mnist

    data = load_mnist(args.data_dir)
    test_accuracy = _test_accuracy(args.model_repository)
    with tempfile.TemporaryDirectory(prefix="metrics-demo-") as tmp:
        workdir = Path(tmp)
        server = prom = None
        try:
            server = Server(args, workdir)
            prom = Prometheus(binary, workdir, f"127.0.0.1:{server.metrics_port}")
            _demo(server, prom, data, args, test_accuracy)
        finally:
            if prom is not None:
                prom.stop()
            if server is not None and server.stop() not in (0, None):
                sys.stderr.write(f"server exited with {server.proc.returncode}:\n{server.log.read_text()[-3000:]}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
