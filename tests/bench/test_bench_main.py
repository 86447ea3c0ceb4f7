"""`python -m bench` end to end (quick and tiny): report, JSON, plot, and no server left behind."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest

from bench import perf_analyzer
from bench.common import REPO_ROOT

pytestmark = pytest.mark.slow


def _bench(repository, results, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "bench", "--quick", "--duration", "0.5", "--warmup", "0.1", "--workers", "1",
        "--client-procs", "1", "--peers", "", "--model-repository", str(repository), "--results-dir", str(results),
        *extra,
    ]  # fmt: skip


def test_quick_run_writes_results_and_stops_its_servers(trained_repository, tmp_path):
    done = subprocess.run(
        _bench(trained_repository, tmp_path), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "latest.json").read_text())
    assert (tmp_path / "latest.png").stat().st_size > 0
    assert set(report["servers"]) == {"nocompute", "nocompute-tuned", "real-w1"}
    assert report["config"]["rounds"] == 3
    for server in report["servers"].values():  # every figure is the median of the three interleaved rounds
        assert all(len(step["rounds"]) == 3 for step in server["steps"])
    for server in report["servers"].values():
        for step in server["steps"]:
            assert step["errors"] == {} and step["ok"] > 0
    real = report["servers"]["real-w1"]["steps"]
    assert all(s["accuracy"] > 0.9 for s in real)
    assert {(r["batch"], r["dtype"]) for r in report["inprocess"]} == {
        (1, "FP32"), (1, "UINT8"), (256, "FP32"), (256, "UINT8")
    }  # fmt: skip
    streamed = [s for s in real if s["step"]["stream"]]
    assert streamed and all(s["ok"] > 0 and s["label"].startswith("stream") for s in streamed)
    # The cost figures, for every step of every server: CPU per request; images per run where the server says.
    for server in report["servers"].values():
        assert all(s["server_cpu_us_per_req"] > 0 for s in server["steps"])
    assert all(s["server_mean_batch_images"] >= 1 for s in real)
    goals = {g["goal"]: g["met"] for g in report["goals"]}
    assert len(goals) == 9
    # Without peers (--peers '') the goals against Triton have nothing to compare; every other goal is decided.
    undecided = [g for g in goals if "Triton" in g or (perf_analyzer.missing() and "perf_analyzer" in g)]
    assert [g for g, met in goals.items() if met is None] == undecided
    assert "goals" in done.stdout
    if perf_analyzer.missing() is None:  # `make test` installs it (make perf-analyzer)
        pa_runs = report["servers"]["real-w1"]["perf_analyzer"]
        assert {r["label"] for r in pa_runs} >= {"unary c=1 batch=1", "stream c=16 batch=1", "unary c=2 batch=256"}
        assert "perf_analyzer against real-w1" in done.stdout
    for g in report["goals"]:  # each verdict follows from its own figure and target, in the stated direction
        higher = " <= " not in g["goal"]  # "at most" goals say <=; the others are "at least"
        if g["met"] is None:
            continue
        assert isinstance(g["value"], int | float) and g["value"] > 0, g
        assert g["met"] is (g["value"] >= g["target"] if higher else g["value"] <= g["target"]), g
    for pids in report["server_pids"].values():
        assert pids and not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)


# Where Ctrl-C can land: the bench logs each of these as it begins (SIGINT follows the line after `delay`).
PHASES = {
    "starting a server": ("started nocompute", 0.0),
    "a load step": ("step nocompute closed c=32", 0.5),
    "a streaming step": ("step real-w1 stream", 0.5),
    "perf_analyzer": ("perf_analyzer real-w1 unary c=32", 0.3),
    "the in-process step": ("in-process step batch 256", 0.1),
    "writing the plot": ("writing the plot", 0.0),
}


@pytest.mark.parametrize("phase", list(PHASES))
def test_interrupt_stops_the_benchmark_and_everything_it_started_within_5_s(trained_repository, tmp_path, phase):
    """Ctrl-C in any step: the benchmark exits within 5 s and leaves no server, perf_analyzer or client behind."""
    trigger, delay = PHASES[phase]
    proc = subprocess.Popen(
        _bench(trained_repository, tmp_path, "--duration", "2"),
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: set[psutil.Process] = set()
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        for line in proc.stderr:  # the bench's log, line by line as it runs
            lines.append(line)
            seen.update(psutil.Process(proc.pid).children(recursive=True))
            if trigger in line or time.monotonic() > deadline:
                break
        assert any(trigger in line for line in lines), "".join(lines[-30:])
        time.sleep(delay)
        seen.update(psutil.Process(proc.pid).children(recursive=True))
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
        took = time.monotonic() - sent
        assert proc.returncode != 0
        assert took < 5.0, f"{phase}: exited {took:.1f} s after SIGINT"
        _, alive = psutil.wait_procs(list(seen), timeout=1)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], [p.cmdline() for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
