"""Memory under a burst: many clients sending 1024-image FP32 requests to one server process it starts.

    python scripts/memory_burst.py [--clients 16,64,128,256 --channels 8,64] [--server-arg=--max-inflight-bytes=8388608]

Reports the server's peak RSS (sampled every 20 ms), the status codes (only OK and RESOURCE_EXHAUSTED are
allowed; every request sent must come back: one left unanswered counts under the code its call ended with), and
images/s of the accepted requests, first with a few clients (the unloaded throughput) and then in the burst.
Extra environment for the server (allocator settings): --server-env MALLOC_ARENA_MAX=2. Exit 1 if any request
got another code or no answer.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import ChildServer, start_serving  # noqa: E402
from bench.loadgen import LoadGenerator, Step  # noqa: E402

BATCH = 1024
ALLOWED = {"OK", "RESOURCE_EXHAUSTED"}


class PeakRss:
    """The peak RSS of one process, sampled every `interval` seconds by a thread while the with block runs."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.proc, self.interval, self.peak = psutil.Process(pid), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()


def phase(gen: LoadGenerator, server: ChildServer, clients: int, channels: int, seconds: float, stream: bool) -> dict:
    """Closed-loop clients over `channels` connections for `seconds`; codes, accepted images/s, peak RSS.
    `stream`: each client sends over its own ModelStreamInfer stream, one request at a time (a refusal is the
    answer's error_message, whose "CODE: ..." prefix is counted)."""
    step = Step(
        concurrency=clients, channels=channels, batch=BATCH, dtype="FP32", duration=seconds, warmup=0, timeout=60,
        stream=stream, window=1 if stream else 0,
    )  # fmt: skip
    with PeakRss(server.proc.pid) as rss:
        result = gen.run(step)
    codes = ({"OK": result["ok"]} if result["ok"] else {}) | result["errors"]
    return {
        "clients": clients,
        "sent": result["requests"],
        "codes": codes,
        "ok_images_per_s": round(result["img_per_s"]),
        "rss_peak_mib": round(rss.peak / 2**20),
        "rss_after_mib": round(rss.proc.memory_info().rss / 2**20),
    }


def burst(args, clients: int, channels: int, images: np.ndarray, labels: np.ndarray) -> dict:
    """One server start: the baseline phase, then `clients` callers over `channels` connections."""
    env = dict(kv.split("=", 1) for kv in args.server_env)
    extra = [a for arg in args.server_arg for a in arg.split("=", 1)]
    # --metrics-port 0 (a later flag wins): no /metrics endpoint, the server as the documented figures measured it.
    flags = ["--metrics-port", "0", "--max-batch-size", str(BATCH), *extra]
    try:
        server = start_serving(args.model_repository, args.log, *flags, env=env)
    except (RuntimeError, TimeoutError) as exc:
        raise SystemExit(str(exc)) from None
    try:
        idle = round(psutil.Process(server.proc.pid).memory_info().rss / 2**20)
        with LoadGenerator(server.target, images, labels) as gen:
            base = phase(gen, server, args.baseline_clients, 1, args.seconds / 2, args.stream)
            peak = phase(gen, server, clients, channels, args.seconds, args.stream)
            after = phase(gen, server, args.baseline_clients, 1, args.seconds / 2, args.stream)  # still answers
    finally:
        server.stop(grace=30)
    return {"server_args": extra, "server_env": env, "stream": args.stream, "channels": channels,
            "rss_idle_mib": idle, "baseline": base, "burst": peak, "after": after}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=ROOT / "build" / "model_repository")
    parser.add_argument("--clients", default="64", help="concurrent callers, comma-separated: a server start each")
    parser.add_argument("--channels", default="8", help="client connections (callers share them), comma-separated")
    parser.add_argument("--baseline-clients", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--stream", action="store_true", help="ModelStreamInfer instead of unary ModelInfer")
    parser.add_argument("--server-arg", action="append", default=[], help="extra server flag (repeatable)")
    parser.add_argument("--server-env", action="append", default=[], help="NAME=VALUE for the server")
    parser.add_argument("--log", type=Path, default=ROOT / "build" / "memory_burst.log")
    args = parser.parse_args(argv)
    images = np.random.default_rng(0).integers(0, 256, (BATCH, 784), dtype=np.uint8)
    labels = np.zeros(BATCH, dtype=np.int64)  # random images: the answers' accuracy means nothing here
    failed = False
    for channels in (int(c) for c in args.channels.split(",")):
        for clients in (int(c) for c in args.clients.split(",")):
            result = burst(args, clients, channels, images, labels)
            sys.stdout.write(json.dumps(result) + "\n")
            sys.stdout.flush()
            phases = (result["baseline"], result["burst"], result["after"])
            failed |= any(set(p["codes"]) - ALLOWED for p in phases) or not result["after"]["codes"].get("OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
