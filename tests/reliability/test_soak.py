"""Soak (short version of `make soak`): mixed load with zero errors and bounded RSS growth."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from rel_harness import report
from server_process import ROOT

DURATION_S = 12
MAX_RSS_GROWTH_MB = 64


@pytest.mark.slow
def test_short_soak_has_no_errors_and_bounded_memory(trained_repository, tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "soak.py"), "--model-repository", str(trained_repository),
         "--duration-s", str(DURATION_S), "--concurrency", "8", "--sample-interval-s", "0.5",
         "--max-rss-growth-mb", str(MAX_RSS_GROWTH_MB), "--log", str(tmp_path / "server.log"), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.exists(), proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    report("soak_short", result)
    assert result["errors"] == 0, result["error_examples"]
    assert result["server_exit_code"] == 0
    assert result["requests"] > 1000  # the load really ran; every kind of request in the mix was sent
    assert set(result["mix"]) == {"small", "medium", "large", "labelled", "feedback", "invalid", "unknown_model",
                                  "metadata"}  # fmt: skip
    assert result["rss_growth_mb"] <= MAX_RSS_GROWTH_MB, result
    assert proc.returncode == 0, proc.stdout + proc.stderr
