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
    assert set(report["servers"]) == {"nocompute", "real-w1"}
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
    goals = {g["goal"]: g["met"] for g in report["goals"]}
    assert len(goals) == 7
    # Without peers (--peers '') their goal has nothing to compare; every other goal is decided.
    assert [g for g, met in goals.items() if met is None] == [g for g in goals if "MLServer" in g]
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


def test_interrupt_stops_the_child_servers(trained_repository, tmp_path):
    proc = subprocess.Popen(
        _bench(trained_repository, tmp_path, "--duration", "30"),
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        servers = []
        while not servers and time.monotonic() < deadline:
            time.sleep(0.2)
            servers = [
                c for c in psutil.Process(proc.pid).children(recursive=True) if "bench.nocompute_server" in c.cmdline()
            ]
        assert servers, "the benchmark never started its no-compute server"
        time.sleep(1.0)  # into the first step
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) != 0
        gone, alive = psutil.wait_procs(servers, timeout=10)
        assert not alive
    finally:
        if proc.poll() is None:
            proc.kill()
