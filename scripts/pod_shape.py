"""How to spend two cores: one server with --workers 2 (one pod of 2 CPUs) or two single-process servers behind
client-side round robin (two pods of 1 CPU). Same closed-loop load on each, alternated in one run; prints
requests/s, p99 and total RSS (the figures behind the CPU overlay's shape, deploy/README.md); exit 1 if any
request failed.

    .venv/bin/python scripts/pod_shape.py --model-repository model_repository [--rounds 2 --seconds 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import launch, load_test_set  # noqa: E402
from bench.loadgen import LoadGenerator, Step  # noqa: E402

SERVER = ["-m", "serving", "--metrics-port", "0", "--intra-op-threads", "1", "--device", "cpu"]
STEPS = ((1, 1), (32, 1), (4, 256))  # (concurrency, images per request), UINT8


def rss_mib(servers) -> int:
    total = 0
    for s in servers:
        for pid in s.process_tree_pids():
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                pass
    return round(total / 2**20)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", default="model_repository")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    images, labels = load_test_set()
    logs = Path(tempfile.mkdtemp(prefix="pod-shape-"))
    base = [*SERVER, "--model-repository", args.model_repository]
    shapes = {
        "one server, --workers 2": lambda: [launch("workers2", [*base, "--workers", "2"], logs, "--grpc-port")],
        "two servers, round robin": lambda: [launch(f"single{i}", base, logs, "--grpc-port") for i in (1, 2)],
    }
    results: dict[str, list] = {name: [] for name in shapes}
    errors = 0
    with LoadGenerator("127.0.0.1:1", images[:1024], labels[:1024]) as gen:
        for _ in range(args.rounds):
            for name, start in shapes.items():
                servers = start()
                # Two servers: one address list, each connection calls both in turn (round robin).
                gen.retarget(servers[0].target if len(servers) == 1 else "ipv4:" + ",".join(s.target for s in servers))
                try:
                    row = {"rss_idle_mib": rss_mib(servers)}
                    for c, batch in STEPS:
                        r = gen.run(Step(concurrency=c, batch=batch, dtype="UINT8", duration=args.seconds, warmup=0))
                        p99 = r["latency_ms"]["p99"]
                        row[f"c{c}_b{batch}"] = {"req_s": round(r["req_per_s"]), "img_s": round(r["img_per_s"]),
                                                 "p99_ms": None if p99 is None else round(p99, 2)}  # fmt: skip
                        if r["errors"]:
                            row[f"c{c}_b{batch}"]["errors"] = r["errors"]
                            errors += sum(r["errors"].values())
                    row["rss_after_mib"] = rss_mib(servers)
                finally:
                    for s in servers:
                        s.stop()
                results[name].append(row)
                print(name, json.dumps(row), flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
