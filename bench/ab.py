"""Interleaved A/B rounds: several servers measured on the same minutes (A, B, C, A, B, C, ...).

    python -m bench.ab --server new=serving --server base=tree:/tmp/base --server triton=triton --rounds 3

The machine moves by +-30 % between runs an hour apart, so a ratio is only worth something when both of its
figures come from the same minutes: every server is started once and kept running, and each round measures each
server in turn on the same steps. Reported per server and step: the median and range over the rounds of req/s,
server CPU per request (the process tree's CPU time / answered requests) and p99; and each server's ratio to the
first one, as the median and range of the per-round ratios.

A server is NAME=SPEC:
  serving[:FLAGS]        `python -m serving` from this checkout (FLAGS: extra flags, shell-quoted; words NAME=VALUE
                         set the server's environment, e.g. OTEL_TRACES_EXPORTER=otlp with --otlp-receiver)
  tree:PATH[:FLAGS]      the same from another checkout, e.g. `git worktree add /tmp/base HEAD~1`
  nocompute              bench/nocompute_server.py as a user would write it (the stock limit)
  nocompute-tuned        the same with the transport choices this server makes (the tuned limit)
  triton|mlserver|kserve a peer (`make peers`)
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from bench import peers
from bench.common import (
    REPO_ROOT,
    ChildServer,
    find_model,
    free_port,
    install_sigterm_exit,
    load_test_set,
    python_cmd,
    serving_cmd,
)
from bench.loadgen import LoadGenerator, Step
from bench.rounds import run_steps

log = logging.getLogger("bench.ab")
FIGURES = ("req_per_s", "server_cpu_us_per_req", "p99_ms", "img_per_s")


@dataclass
class Contender:
    name: str
    cmd: list[str]
    cwd: Path
    metrics_port: int
    port: int
    env: dict[str, str] | None = None


def split_env(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """NAME=VALUE words (environment) apart from the flags."""
    env = dict(w.split("=", 1) for w in words if re.fullmatch(r"[A-Z][A-Z0-9_]*=.*", w))
    return env, [w for w in words if not re.fullmatch(r"[A-Z][A-Z0-9_]*=.*", w)]


def contender(name: str, spec: str, repository: Path, workdir: Path) -> Contender:
    """The command (and checkout) that SPEC names, on free loopback ports."""
    port, mport = free_port(), free_port()
    kind, _, rest = spec.partition(":")
    if kind in ("serving", "tree"):
        root, _, flags = rest.partition(":") if kind == "tree" else (str(REPO_ROOT), "", rest)
        env, words = split_env(shlex.split(flags))
        cmd = serving_cmd(repository, port, mport, "--log-level", "WARNING", *words)
        return Contender(name, cmd, Path(root).resolve(), mport, port, env)
    if kind in ("nocompute", "nocompute-tuned"):
        tuned = ["--tuned"] if kind == "nocompute-tuned" else []
        return Contender(
            name, python_cmd("-m", "bench.nocompute_server", "--port", str(port), *tuned), REPO_ROOT, 0, port
        )
    if kind in peers.PEERS:
        why = peers.missing(kind)
        if why:
            raise SystemExit(f"{name}: {why}")
        return Contender(name, peers.command(kind, find_model(repository), port, workdir / name), REPO_ROOT, 0, port)
    raise SystemExit(f"{name}: unknown server spec {spec!r}")


def summarize(rounds: dict[str, list[dict]], first: str) -> dict:
    """Per server: median and range of each figure over the rounds, and of the per-round ratio to `first`."""
    out = {}
    for name, results in rounds.items():
        row = {}
        for fig in FIGURES:
            values = [r[fig] for r in results if r.get(fig) is not None]
            if values:
                row[fig] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
            base = [r.get(fig) for r in rounds[first]]
            ratios = [v / b for v, b in zip([r.get(fig) for r in results], base, strict=False) if v and b]
            if ratios and name != first:
                row[f"{fig}_ratio"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
        out[name] = row
    return out


def _wait_port(child: ChildServer, timeout: float = 30.0) -> None:
    """Until the child accepts TCP connections on its port."""
    import socket
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", child.port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or not child.alive():
                raise RuntimeError(f"{child.name} did not start:\n{child.log_tail()}") from None
            time.sleep(0.1)


def _flat(r: dict) -> dict:
    return {**r, "p99_ms": r["latency_ms"]["p99"]}


def print_summary(step: str, summary: dict, first: str) -> None:
    print(f"\n{step} (median [min-max] of the rounds; ratios to {first} per round)")
    print(f"{'server':<16} {'req/s':>22} {'CPU us/req':>22} {'p99 ms':>20} {'req/s ratio':>20} {'CPU ratio':>20}")

    def cell(d: dict | None, fmt: str) -> str:
        return "-" if not d else f"{d['median']:{fmt}} [{d['min']:{fmt}}-{d['max']:{fmt}}]"

    for name, row in summary.items():
        print(
            f"{name:<16} {cell(row.get('req_per_s'), ',.0f'):>22} {cell(row.get('server_cpu_us_per_req'), '.0f'):>22}"
            f" {cell(row.get('p99_ms'), '.2f'):>20} {cell(row.get('req_per_s_ratio'), '.2f'):>20}"
            f" {cell(row.get('server_cpu_us_per_req_ratio'), '.2f'):>20}"
        )


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.ab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--server", action="append", required=True, help="NAME=SPEC (see above); the first is the base")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", default="32", help="closed-loop steps, comma-separated")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="FP32", choices=("FP32", "UINT8"))
    p.add_argument("--stream", action="store_true", help="ModelStreamInfer instead of unary")
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--client-procs", type=int, default=1)
    p.add_argument("--model-repository", type=Path, default=REPO_ROOT / "model_repository")
    p.add_argument("--data-dir", type=Path, default=REPO_ROOT / "data")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "ab")
    p.add_argument(
        "--otlp-receiver",
        action="store_true",
        help="run an OTLP trace receiver (bench.otlp_receiver, counting only) and point every server at it",
    )
    return p.parse_args(argv)


def _children(args, contenders: list[Contender]) -> tuple[list[ChildServer], ChildServer | None]:
    """A ChildServer per contender and, with --otlp-receiver, the receiver they are all pointed at."""
    receiver = None
    if args.otlp_receiver:
        port = free_port()
        cmd = python_cmd("-m", "bench.otlp_receiver", "--port", str(port), "--count-only")
        receiver = ChildServer("otlp-receiver", cmd, port, args.out / "logs" / "otlp-receiver.log")
        for c in contenders:
            c.env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", **(c.env or {})}
    log_dir = args.out / "logs"
    children = [
        ChildServer(c.name, c.cmd, c.port, log_dir / f"{c.name}.log", metrics_port=c.metrics_port, cwd=c.cwd, env=c.env)
        for c in contenders
    ]
    return children, receiver


def _measure(args, children: list[ChildServer], steps: list[Step], images, labels) -> dict:
    """Rounds of every step on every server in turn: {step label: {server: [result per round]}}."""
    results: dict[str, dict[str, list[dict]]] = {s.label(): {c.name: [] for c in children} for s in steps}
    with LoadGenerator("127.0.0.1:1", images, labels, args.client_procs) as gen:
        for rnd in range(args.rounds):
            for child in children:
                url = f"http://127.0.0.1:{child.metrics_port}/metrics" if child.metrics_port else None
                log.info("round %d/%d: %s", rnd + 1, args.rounds, child.name)
                for r in run_steps(gen, child, steps, url, retries=1):
                    results[r["label"]][child.name].append(_flat(r))
    return results


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    install_sigterm_exit()
    images, labels = load_test_set(args.data_dir)
    named = [s.split("=", 1) for s in args.server]
    contenders = [contender(n, spec, args.model_repository.resolve(), args.out / "work") for n, spec in named]
    steps = [
        Step(concurrency=int(c), batch=args.batch, dtype=args.dtype, stream=args.stream, duration=args.duration,
             warmup=args.warmup)
        for c in args.concurrency.split(",")
    ]  # fmt: skip
    children, receiver = _children(args, contenders)
    try:
        if receiver is not None:
            _wait_port(receiver.start())
        for child in children:  # all started first, kept running: idle ones cost (nearly) nothing
            child.start().wait_ready()
        results = _measure(args, children, steps, images, labels)
    finally:
        for child in [*children, receiver]:  # the servers first: they flush their spans to the receiver
            if child is not None:
                child.stop()
    report = {"servers": dict(named), "rounds": args.rounds, "steps": {}}
    for label, rounds in results.items():
        summary = summarize(rounds, children[0].name)
        print_summary(label, summary, children[0].name)
        report["steps"][label] = {"summary": summary, "rounds": rounds}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
