"""Soak test: a bounded mixed load against a server it starts; reports RSS growth, errors and latency drift.

    python scripts/soak.py --duration-s 180 --concurrency 16      (make soak; ARGS="--duration-s 600")

Exit 0 when there were no errors (wrong status codes, wrong answers, a failed drain) and the server's RSS grew
less than --max-rss-growth-mb between the end of the first window (warm-up) and the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import metrics_text  # noqa: E402
from bench.common import ChildServer, find_model, start_serving  # noqa: E402
from serving.client import feedback_request, infer_request, probabilities, receipt_of  # noqa: E402
from serving.protos import feedback_pb2_grpc  # noqa: E402
from serving.protos import grpc_service_pb2 as pb  # noqa: E402
from serving.protos import grpc_service_pb2_grpc as pb_grpc  # noqa: E402
from training.data import load_mnist, to_model_input  # noqa: E402

OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
# (kind, weight): what one client iteration sends.
MIX = (("small", 55), ("medium", 20), ("large", 4), ("labelled", 8), ("feedback", 5), ("invalid", 4),
       ("unknown_model", 2), ("metadata", 2))  # fmt: skip


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Soak:
    """Clients looping a weighted mix of requests; every answer is checked against in-process onnxruntime."""

    def __init__(self, url: str, images: np.ndarray, labels: np.ndarray, expected: np.ndarray, seed: int) -> None:
        self.url, self.images, self.labels, self.expected = url, images, labels, expected
        self.rng = random.Random(seed)
        self.latencies: list[tuple[float, float]] = []  # (time sent, seconds) of successful inferences
        self.counts: Counter = Counter()
        self.errors: Counter = Counter()
        self.examples: list[str] = []

    def _error(self, kind: str, what: str) -> None:
        self.errors[kind] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{kind}: {what}")

    async def client(self, stub, feedback, stop: float) -> None:
        kinds, weights = zip(*MIX, strict=True)
        while time.monotonic() < stop:
            kind = self.rng.choices(kinds, weights)[0]
            self.counts[kind] += 1
            try:
                await getattr(self, f"_{kind}")(stub, feedback)
            except grpc.aio.AioRpcError as err:
                self._error(kind, f"{err.code().name}: {err.details()}")

    async def _infer(self, stub, n: int, datatype: str = "UINT8", labelled=False):
        lo = self.rng.randrange(0, len(self.images) - n)
        request = infer_request(self.images[lo : lo + n], "mnist", datatype=datatype)
        if labelled:
            request.parameters["labels"].string_param = ",".join(map(str, self.labels[lo : lo + n]))
        sent = time.monotonic()
        reply = await stub.ModelInfer(request, timeout=30)
        self.latencies.append((sent, time.monotonic() - sent))
        probs = probabilities(reply)
        if probs.shape != (n, 10) or not np.allclose(probs, self.expected[lo : lo + n], atol=1e-4):
            self._error("wrong_answer", f"{n} images from {lo}")
        return lo, receipt_of(reply)

    async def _small(self, stub, _):
        await self._infer(stub, self.rng.randint(1, 8))

    async def _medium(self, stub, _):
        await self._infer(stub, self.rng.randint(32, 256), datatype=self.rng.choice(["UINT8", "FP32"]))

    async def _large(self, stub, _):
        await self._infer(stub, 1024)

    async def _labelled(self, stub, _):
        await self._infer(stub, self.rng.randint(1, 16), labelled=True)

    async def _feedback(self, stub, feedback):
        n = self.rng.randint(1, 8)
        lo, receipt = await self._infer(stub, n)
        reply = await feedback.SendFeedback(feedback_request(receipt, self.labels[lo : lo + n]), timeout=30)
        if reply.matched != n:
            self._error("feedback", f"matched {reply.matched} of {n}")

    async def _expect(self, call, code: grpc.StatusCode, kind: str) -> None:
        try:
            await call
        except grpc.aio.AioRpcError as err:
            if err.code() != code:
                self._error(kind, f"{err.code().name} instead of {code.name}")
            return
        self._error(kind, f"OK instead of {code.name}")

    async def _invalid(self, stub, _):
        request = infer_request(self.images[:2], "mnist")
        request.inputs[0].shape[1] = 783
        await self._expect(stub.ModelInfer(request, timeout=30), grpc.StatusCode.INVALID_ARGUMENT, "invalid")

    async def _unknown_model(self, stub, _):
        request = infer_request(self.images[:1], "no-such-model")
        await self._expect(stub.ModelInfer(request, timeout=30), grpc.StatusCode.NOT_FOUND, "unknown_model")

    async def _metadata(self, stub, _):
        await stub.ModelMetadata(pb.ModelMetadataRequest(name="mnist"), timeout=30)
        await stub.ModelStatistics(pb.ModelStatisticsRequest(name="mnist"), timeout=30)

    async def run(self, concurrency: int, duration: float) -> None:
        stop = time.monotonic() + duration
        async with grpc.aio.insecure_channel(self.url, options=OPTIONS) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            feedback = feedback_pb2_grpc.FeedbackServiceStub(ch)
            await asyncio.gather(*[self.client(stub, feedback, stop) for _ in range(concurrency)])


async def _sample(pid: int, interval: float, stop: float, samples: list[tuple[float, int, float]]) -> None:
    """(time, RSS bytes, CPU seconds used so far) of the server process, every `interval`."""
    proc = psutil.Process(pid)

    def take():
        cpu = proc.cpu_times()
        samples.append((time.monotonic(), proc.memory_info().rss, cpu.user + cpu.system))

    while time.monotonic() < stop:
        take()
        await asyncio.sleep(interval)
    take()


def _cpu_per_inference(samples, latencies, lo: float, hi: float) -> float | None:
    """Server CPU milliseconds per successful inference in [lo, hi): a drift signal that VM noise disturbs less."""
    inside = [(t, cpu) for t, _, cpu in samples if lo <= t <= hi]
    count = sum(lo <= t < hi for t, _ in latencies)
    if len(inside) < 2 or not count:
        return None
    return round((inside[-1][1] - inside[0][1]) * 1e3 / count, 3)


def _percentiles(latencies: list[tuple[float, float]], lo: float, hi: float) -> dict:
    window = [s for t, s in latencies if lo <= t < hi]
    if not window:
        return {"requests": 0, "p50_ms": None, "p99_ms": None}
    p50, p99 = np.percentile(window, [50, 99])
    return {"requests": len(window), "p50_ms": round(p50 * 1e3, 2), "p99_ms": round(p99 * 1e3, 2)}


def start_server(repository: Path, log_path: Path, extra: list[str]) -> ChildServer:
    try:
        return start_serving(repository, log_path, *extra)
    except (RuntimeError, TimeoutError) as exc:
        raise SystemExit(str(exc)) from None


def soak(args: argparse.Namespace) -> dict:
    data = load_mnist(args.data_dir)
    images, labels = data.x_test.reshape(-1, 784), data.y_test
    import onnxruntime as ort

    session = ort.InferenceSession(str(find_model(args.model_repository)), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: to_model_input(images)})[0]

    log_path = Path(args.log)
    server = start_server(args.model_repository, log_path, args.server_args.split())
    pid = server.proc.pid
    _say(f"soak: server pid {pid} on {server.target}; {args.concurrency} clients for {args.duration_s:.0f} s")
    load = Soak(server.target, images, labels, expected, args.seed)
    samples: list[tuple[float, int, float]] = []
    started = time.monotonic()

    async def main():
        await asyncio.gather(
            load.run(args.concurrency, args.duration_s),
            _sample(pid, args.sample_interval_s, started + args.duration_s, samples),
        )

    try:
        asyncio.run(main())
        snap = metrics_text.scrape(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10)
        internal = snap.series("mnist_serving_requests_total", code="INTERNAL") if snap else [({}, float("nan"))]
    finally:
        server.stop(grace=60)  # SIGTERM: the drain; a server still there after 60 s is killed (a failed drain)
    exit_code = server.proc.returncode
    if exit_code != 0:
        load._error("drain", f"server exit code {exit_code}")
    for labels, value in internal:
        if not value == 0:  # NaN: /metrics could not be read
            load._error("internal", f"mnist_serving_requests_total{labels} {value}")
    return _result(args, load, samples, started, exit_code)


def _result(args: argparse.Namespace, load: Soak, samples: list, started: float, exit_code: int) -> dict:
    """The soak's figures: errors, memory (start, after warm-up, end, growth) and first vs last window."""
    window = min(60.0, args.duration_s / 3)  # "first minute vs last minute", shorter for short soaks
    end = started + args.duration_s
    first, last = (
        _percentiles(load.latencies, started, started + window),
        _percentiles(load.latencies, end - window, end),
    )
    warm = next((rss for t, rss, _ in samples if t >= started + window), samples[-1][1])
    rss = [r for _, r, _ in samples]
    return {
        "duration_s": args.duration_s,
        "concurrency": args.concurrency,
        "requests": sum(load.counts.values()),
        "mix": dict(load.counts),
        "errors": sum(load.errors.values()),
        "error_kinds": dict(load.errors),
        "error_examples": load.examples,
        "rss_start_mb": round(rss[0] / 2**20, 1),
        "rss_after_warmup_mb": round(warm / 2**20, 1),
        "rss_end_mb": round(rss[-1] / 2**20, 1),
        "rss_max_mb": round(max(rss) / 2**20, 1),
        "rss_growth_mb": round((rss[-1] - warm) / 2**20, 1),
        "window_s": window,
        "latency_first_window": first,
        "latency_last_window": last,
        "p99_drift": round(last["p99_ms"] / first["p99_ms"], 2) if first["p99_ms"] and last["p99_ms"] else None,
        "server_cpu_ms_per_inference_first": _cpu_per_inference(samples, load.latencies, started, started + window),
        "server_cpu_ms_per_inference_last": _cpu_per_inference(samples, load.latencies, end - window, end),
        "server_exit_code": exit_code,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--duration-s", type=float, default=180.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--sample-interval-s", type=float, default=1.0, help="RSS sampling period")
    parser.add_argument("--max-rss-growth-mb", type=float, default=64.0, help="fail above this growth after warm-up")
    parser.add_argument("--server-args", default="", help="extra server flags, e.g. '--max-queue-delay-us 500'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log", default="build/soak-server.log", help="where the server's log goes")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)

    result = soak(args)
    text = json.dumps(result, indent=2)
    _say(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    ok = result["errors"] == 0 and result["rss_growth_mb"] <= args.max_rss_growth_mb
    _say(
        f"soak {'PASSED' if ok else 'FAILED'}: {result['requests']} requests, {result['errors']} errors, "
        f"RSS {result['rss_after_warmup_mb']} -> {result['rss_end_mb']} MB (growth {result['rss_growth_mb']} MB, "
        f"limit {args.max_rss_growth_mb}), p99 {result['latency_first_window']['p99_ms']} -> "
        f"{result['latency_last_window']['p99_ms']} ms, server CPU/inference "
        f"{result['server_cpu_ms_per_inference_first']} -> {result['server_cpu_ms_per_inference_last']} ms"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
