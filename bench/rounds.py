"""Measuring in interleaved rounds: every server started once and kept running, then measured in turn, round after
round (A, B, C, A, B, C, ...), so that a ratio compares figures taken on the same minutes of a noisy machine.

One measurement is a load-generator step (`run_steps`: req/s, latency, server CPU per request from the process
tree's CPU time, images per run from the server's /metrics), a perf_analyzer run (`perf_run`), or an in-process
onnxruntime step (`Entrant.inprocess`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

from bench import metrics_text
from bench import perf_analyzer as pa
from bench.common import ChildServer
from bench.loadgen import LoadGenerator, Step

log = logging.getLogger("bench")

# Above this much CPU used by other processes during a measurement, its figure is flagged as noisy.
NOISY_OTHER_CPU_PCT = 25.0


def machine_busy_seconds() -> float:
    busy = psutil.cpu_times()
    return busy.user + busy.system + busy.nice + getattr(busy, "irq", 0) + getattr(busy, "softirq", 0)


def scrape_batches(url: str | None) -> tuple[float, float] | None:
    """(sum, count) of the server's executed-batch-size histogram, or None."""
    snap = metrics_text.scrape(url, timeout=1.0) if url else None
    if snap is None:
        return None
    return snap.get("mnist_serving_batch_size_sum"), snap.get("mnist_serving_batch_size_count")


class WindowSampler:
    """Samples server and whole-machine CPU at the start and end of a step's measured window."""

    def __init__(self, server: ChildServer, metrics_url: str | None) -> None:
        self.server, self.metrics_url = server, metrics_url
        self.marks: list[tuple] = []
        self._thread: threading.Thread | None = None

    def _snap(self) -> tuple:
        return time.perf_counter(), self.server.cpu_seconds(), machine_busy_seconds(), scrape_batches(self.metrics_url)

    def arm(self, t_start: float, t_end: float) -> None:
        def run():
            for t in (t_start, t_end):
                time.sleep(max(0.0, t - time.time()))
                self.marks.append(self._snap())

        self.marks = []
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def result(self, client_cpu_pct: float) -> dict:
        if self._thread is not None:
            self._thread.join(5)
        if len(self.marks) != 2:
            return {}
        (t0, s0, b0, m0), (t1, s1, b1, m1) = self.marks
        wall = t1 - t0
        server, machine = 100 * (s1 - s0) / wall, 100 * (b1 - b0) / wall
        out = {
            "server_cpu_pct": round(server, 1),
            "machine_cpu_pct": round(machine, 1),
            # CPU used by neither the server nor the load generator: other work on the machine (noise).
            "other_cpu_pct": round(max(0.0, machine - server - client_cpu_pct), 1),
        }
        if m0 and m1 and m1[1] > m0[1]:
            out["server_mean_batch_images"] = round((m1[0] - m0[0]) / (m1[1] - m0[1]), 2)
            out["server_runs_per_s"] = round((m1[1] - m0[1]) / wall, 1)
        return out


def run_step(gen: LoadGenerator, server: ChildServer, step: Step, metrics_url: str | None, retries: int) -> dict:
    """One step; a step disturbed by other processes' CPU use is rerun up to `retries` times and the least
    disturbed attempt is kept."""
    attempts = []
    for _ in range(retries + 1):
        if not server.alive():
            raise RuntimeError(f"{server.name} died:\n{server.log_tail()}")
        log.info("step %s %s", server.name, step.label())
        sampler = WindowSampler(server, metrics_url)
        r = gen.run(step, on_window=sampler.arm)
        r.update(sampler.result(r["client_cpu_pct"]))
        if r.get("server_cpu_pct") is not None and r["req_per_s"]:
            # The cost figure: CPU seconds of the server's process tree per answered request.
            r["server_cpu_us_per_req"] = round(r["server_cpu_pct"] / 100 / r["req_per_s"] * 1e6, 1)
        attempts.append(r)
        if (r.get("other_cpu_pct") or 0) <= NOISY_OTHER_CPU_PCT:
            break
        log.info("%s %s: other processes used %s%% CPU; again", server.name, r["label"], r["other_cpu_pct"])
    r = min(attempts, key=lambda a: a.get("other_cpu_pct") or 0)
    r["server"], r["attempts"] = server.name, len(attempts)
    _log_step(server.name, r)
    return r


def _log_step(name: str, r: dict) -> None:
    log.info(
        "%-12s %-32s %8.0f req/s %9.0f img/s p99 %s ms errors %s cpu client %.0f%% server %s%% (%s us/req, "
        "%s img/run) other %s%%",
        name, r["label"], r["req_per_s"], r["img_per_s"], r["latency_ms"]["p99"], r["errors"] or 0,
        r["client_cpu_pct"], r.get("server_cpu_pct"), r.get("server_cpu_us_per_req"),
        r.get("server_mean_batch_images"), r.get("other_cpu_pct"),
    )  # fmt: skip


def run_steps(
    gen: LoadGenerator, server: ChildServer, steps: list[Step], metrics_url: str | None = None, retries: int = 0
) -> list[dict]:
    """The steps against one server, in order."""
    gen.retarget(server.target)
    return [run_step(gen, server, step, metrics_url, retries) for step in steps]


def perf_run(server: ChildServer, step: pa.PaStep, data, window_ms: int) -> dict:
    """One perf_analyzer run; one that finds no stable measurement (other work moved the figures by more than
    2x between windows) is measured again with no stability rule, and says so."""
    log.info("perf_analyzer %s %s", server.name, step.label())
    r = pa.run(server.target, step, data, window_ms=window_ms, stability_pct=100, max_trials=6)
    if r["rc"] != 0 and "stable measurement" in r.get("error", ""):
        log.info("%s perf_analyzer %s: no stable measurement; again without a stability rule", server.name, r["label"])
        r = pa.run(server.target, step, data, window_ms=window_ms, stability_pct=1e5, max_trials=3)
        r["stability_pct"] = "none (unstable at 100%)"
    r["server"] = server.name
    log.info("%-12s perf_analyzer %-22s rc %d %8.0f infer/s p99 %s us client/server requests %s/%s",
             server.name, r["label"], r["rc"], r.get("infer_per_s", 0), r.get("p99_us"),
             r.get("client_requests"), r.get("server_requests"))  # fmt: skip
    return r


@dataclass
class Entrant:
    """One contender of the rounds: a server (with its load steps and perf_analyzer steps), or in-process
    onnxruntime (`inprocess`: a function measuring one round of its steps)."""

    name: str
    server: ChildServer | None = None
    steps: list[Step] = field(default_factory=list)
    pa_steps: list[pa.PaStep] = field(default_factory=list)
    metrics_url: str | None = None
    inprocess: Callable[[], list[dict]] | None = None
    info: dict = field(default_factory=dict)  # reported as is (command, workers, peer)
    # An open-loop step at this fraction of the peak batch-1 req/s it measured in the first round (0: none).
    open_fraction: float = 0.0
    open_rate: float = 0.0

    def open_step(self, results: list[dict], duration: float, warmup: float) -> Step | None:
        if not self.open_fraction:
            return None
        if not self.open_rate:
            peak = max(r["req_per_s"] for r in results if r["step"]["batch"] == 1)
            self.open_rate = round(self.open_fraction * peak, -1) or 10.0
        return Step(mode="open", rate=self.open_rate, duration=duration, warmup=warmup)


@dataclass
class Rounds:
    """What the rounds measured: per entrant, per step label, one result per round."""

    steps: dict[str, dict[str, list[dict]]] = field(default_factory=dict)
    perf: dict[str, dict[str, list[dict]]] = field(default_factory=dict)
    workers: dict[str, int] = field(default_factory=dict)  # the real servers' --workers

    def add(self, kind: str, name: str, result: dict) -> None:
        getattr(self, kind).setdefault(name, {}).setdefault(result["label"], []).append(result)


def measure_round(gen: LoadGenerator, entrant: Entrant, rounds: Rounds, pa_data, args) -> None:
    """Every measurement of one entrant, once."""
    if entrant.inprocess is not None:
        for r in entrant.inprocess():
            rounds.add("steps", entrant.name, r)
        return
    results = run_steps(gen, entrant.server, entrant.steps, entrant.metrics_url, args.retries)
    ol = entrant.open_step(results, args.duration, args.warmup)
    if ol is not None:
        results += run_steps(gen, entrant.server, [ol], entrant.metrics_url, args.retries)
    for r in results:
        rounds.add("steps", entrant.name, r)
    for step in entrant.pa_steps if pa_data is not None else ():
        rounds.add("perf", entrant.name, perf_run(entrant.server, step, pa_data, args.pa_window_ms))


def run_rounds(gen: LoadGenerator, entrants: list[Entrant], args, pa_data) -> Rounds:
    """`args.rounds` rounds over every entrant in turn."""
    rounds = Rounds(workers={e.name: e.info["workers"] for e in entrants if "workers" in e.info})
    for n in range(args.rounds):
        for entrant in entrants:
            log.info("round %d/%d: %s", n + 1, args.rounds, entrant.name)
            measure_round(gen, entrant, rounds, pa_data, args)
    return rounds
