"""Triton's perf_analyzer: a reproducible install, real MNIST input data in its JSON format, runs parsed.

The C++ binary ships inside the `tritonclient` 2.41.1 wheel (later wheels no longer carry it); it links
`libcudart.so.12` (from the `nvidia-cuda-runtime-cu12` wheel, even on a CPU machine) and Debian's `libb64-0d`.
Both wheel versions are pinned in pyproject.toml (extra `perf`, never installed into the project's venv:
`install` downloads the two wheels and unpacks only the binary and the library into build/perf_analyzer/).

    python -m bench.perf_analyzer install
    python -m bench.perf_analyzer data --out build/perf_analyzer/mnist_fp32.json
    python -m bench.perf_analyzer run --target 127.0.0.1:8001 --concurrency 1,8,32 [--streaming] [--batch 256]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.common import MODEL_NAME, REPO_ROOT, load_test_set

INSTALL_DIR = REPO_ROOT / "build" / "perf_analyzer"
BINARY = INSTALL_DIR / "bin" / "perf_analyzer"
LIB_DIR = INSTALL_DIR / "lib"
DATA_FILE = INSTALL_DIR / "mnist_fp32.json"
_WHEEL_BINARY = "tritonclient-{version}.data/data/bin/perf_analyzer"
_WHEEL_CUDART = "nvidia/cuda_runtime/lib/libcudart.so.12"


def pins() -> dict[str, str]:
    """{package: version} of the `perf` extra in pyproject.toml (the only place versions live)."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return dict(spec.split("==", 1) for spec in project["optional-dependencies"]["perf"])


def install(python: str = sys.executable) -> Path:
    """Download the pinned wheels (no dependencies) and unpack perf_analyzer and libcudart; idempotent."""
    versions = pins()
    stamp = INSTALL_DIR / "installed.json"
    if BINARY.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == versions:
        return BINARY
    wheels = INSTALL_DIR / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    specs = [f"{name}=={version}" for name, version in versions.items()]
    subprocess.run(
        [python, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", str(wheels), *specs],
        check=True,
    )
    BINARY.parent.mkdir(parents=True, exist_ok=True)
    LIB_DIR.mkdir(parents=True, exist_ok=True)
    for wheel in wheels.glob("*.whl"):
        with zipfile.ZipFile(wheel) as zf:
            names = set(zf.namelist())
            member = _WHEEL_BINARY.format(version=versions["tritonclient"])
            if member in names:
                BINARY.write_bytes(zf.read(member))
                BINARY.chmod(0o755)
            if _WHEEL_CUDART in names:
                (LIB_DIR / "libcudart.so.12").write_bytes(zf.read(_WHEEL_CUDART))
    shutil.rmtree(wheels, ignore_errors=True)
    if not BINARY.is_file() or not (LIB_DIR / "libcudart.so.12").is_file():
        raise RuntimeError(f"the wheels {specs} did not contain perf_analyzer and libcudart.so.12")
    stamp.write_text(json.dumps(versions))
    return BINARY


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(LIB_DIR), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def missing() -> str | None:
    """Why perf_analyzer cannot run here (None when it can)."""
    if not BINARY.is_file():
        return f"{BINARY} is not installed: run `make perf-analyzer`"
    try:
        out = subprocess.run(["ldd", str(BINARY)], env=environment(), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot inspect {BINARY}: {exc}"
    absent = [line.split()[0] for line in out.stdout.splitlines() if "not found" in line]
    if absent:
        return f"perf_analyzer needs {absent} (libb64.so.0d: apt-get install libb64-0d; run `make perf-analyzer`)"
    return None


def write_input_data(path: Path = DATA_FILE, images: np.ndarray | None = None, count: int = 256) -> Path:
    """Real MNIST test images as FP32 pixel/255 in perf_analyzer's --input-data JSON format (one image per entry)."""
    if images is None:
        images, _ = load_test_set()
    x = images[:count].reshape(-1, 784).astype(np.float32) / np.float32(255.0)
    data = {"data": [{"input": {"content": [round(float(v), 6) for v in row], "shape": [784]}} for row in x]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, separators=(",", ":")))
    return path


@dataclass(frozen=True)
class PaStep:
    concurrency: int = 1
    batch: int = 1
    streaming: bool = False

    def label(self) -> str:
        return f"{'stream' if self.streaming else 'unary'} c={self.concurrency} batch={self.batch}"

    def count_tolerance(self) -> int:
        """How far perf_analyzer's client count may be from the server's over one window: the requests in flight
        at its two edges (2 x concurrency). Streamed answers cross the edges more loosely (measured once: 12
        apart at c=4, 9,348 vs 9,336), so streams get twice that."""
        return (4 if self.streaming else 2) * self.concurrency


_FIELDS = {
    "client_requests": r"Client:\s+Request count: (\d+)",
    "infer_per_s": r"Throughput: ([\d.]+) infer/sec",
    "avg_us": r"Avg latency: (\d+) usec",
    "p50_us": r"p50 latency: (\d+) usec",
    "p90_us": r"p90 latency: (\d+) usec",
    "p99_us": r"p99 latency: (\d+) usec",
    "server_inferences": r"Server:\s+Inference count: (\d+)",
    "server_executions": r"Execution count: (\d+)",
    "server_requests": r"Successful request count: (\d+)",
    "server_avg_us": r"Avg request latency: (\d+) usec",
}


def parse(stdout: str) -> dict:
    out = {}
    for key, pattern in _FIELDS.items():
        m = re.search(pattern, stdout)
        if m:
            out[key] = float(m.group(1)) if "." in m.group(1) else int(m.group(1))
    m = re.search(r"Avg request latency: .*\((.*)\)", stdout)
    if m:
        out["server_breakdown"] = m.group(1)
    return out


def run(
    target: str,
    step: PaStep,
    data: Path = DATA_FILE,
    window_ms: int = 2000,
    stability_pct: float = 50.0,
    max_trials: int = 6,
    model: str = MODEL_NAME,
    timeout: float = 180.0,
) -> dict:
    """One perf_analyzer measurement; returns its parsed client and server figures, rc and the command."""
    cmd = [
        str(BINARY), "-m", model, "-x", "1", "-u", target, "-i", "grpc", "--input-data", str(data),
        "-b", str(step.batch), "--concurrency-range", str(step.concurrency), "-p", str(window_ms),
        "-s", f"{stability_pct:g}", "-r", str(max_trials),
    ]  # fmt: skip
    if step.streaming:
        cmd.append("--streaming")
    try:
        proc = subprocess.run(cmd, env=environment(), capture_output=True, text=True, timeout=timeout)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, stdout, stderr = 124, exc.stdout or "", f"timed out after {timeout}s"
    result = {"tool": "perf_analyzer", "label": step.label(), "step": asdict(step), "rc": rc, "cmd": cmd}
    result.update(parse(stdout if isinstance(stdout, str) else stdout.decode(errors="replace")))
    if rc != 0:
        result["error"] = ((stdout or "")[-800:] + (stderr or "")[-800:]).strip()
    return result


def format_table(results: list[dict], title: str = "") -> str:
    head = f"{'perf_analyzer step':<26}{'rc':>4}{'infer/s':>10}{'avg ms':>8}{'p50 ms':>8}{'p99 ms':>8}"
    head += f"{'client req':>12}{'server req':>12}  server breakdown (us)"
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for r in results:
        ms = [f"{r[k] / 1000:.2f}" if k in r else "-" for k in ("avg_us", "p50_us", "p99_us")]
        lines.append(
            f"{r['label']:<26}{r['rc']:>4}{r.get('infer_per_s', 0):>10.0f}"
            + "".join(f"{m:>8}" for m in ms)
            + f"{r.get('client_requests', '-'):>12}{r.get('server_requests', '-'):>12}  {r.get('server_breakdown', '')}"
        )
        if r["rc"]:
            lines.append(f"{'':<26}error: {r.get('error', '')[-300:]}")
        elif "stability_pct" in r:
            lines.append(f"{'':<26}(measured without a stability rule: no stable measurement at 100 %)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.perf_analyzer", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help="download the pinned wheels, unpack perf_analyzer into build/perf_analyzer")
    d = sub.add_parser("data", help="write real MNIST images in perf_analyzer's --input-data JSON format")
    d.add_argument("--out", type=Path, default=DATA_FILE)
    d.add_argument("--count", type=int, default=256)
    r = sub.add_parser("run", help="perf_analyzer against a running server")
    r.add_argument("--target", default="127.0.0.1:8001")
    r.add_argument("--concurrency", default="1,8,32")
    r.add_argument("--batch", type=int, default=1)
    r.add_argument("--streaming", action="store_true")
    r.add_argument("--window-ms", type=int, default=2000)
    args = p.parse_args(argv)
    if args.command == "install":
        print(install())
        reason = missing()
        if reason:
            print(reason, file=sys.stderr)
            return 1
        return 0
    if args.command == "data":
        print(write_input_data(args.out, count=args.count))
        return 0
    reason = missing()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    if not DATA_FILE.is_file():
        write_input_data()
    steps = [PaStep(int(c), args.batch, args.streaming) for c in args.concurrency.split(",")]
    results = [run(args.target, s, window_ms=args.window_ms) for s in steps]
    print(format_table(results, f"perf_analyzer against {args.target}"))
    return max(r["rc"] for r in results)


if __name__ == "__main__":
    sys.exit(main())
