"""`python -m bench` (make bench): this server against the no-compute references, the peers and in-process
onnxruntime, in interleaved rounds (every figure the median and range of `--rounds`), the ratios and the goals.

Every server is started once and kept running; each round measures each of them in turn (A, B, C, A, B, C, ...):
the machine moves by +-30 % in an hour, so a ratio is only worth something when both its figures come from the same
minutes (bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from bench import inprocess, peers, summary
from bench import perf_analyzer as pa
from bench.ab import contender
from bench.common import (
    REPO_ROOT,
    ChildServer,
    find_model,
    free_port,
    install_sigterm_exit,
    load_test_set,
    machine_info,
    python_cmd,
)
from bench.loadgen import LoadGenerator, Step
from bench.report import plot, print_report
from bench.rounds import NOISY_OTHER_CPU_PCT, Entrant, run_rounds

log = logging.getLogger("bench")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="short steps, c=1,32, fewer configurations (~3 min)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; every figure is their median")
    p.add_argument("--concurrency", default=None, help="closed-loop sweep (default 1,8,32,64; quick 1,32)")
    p.add_argument("--duration", type=float, default=None, help="measured seconds per step (default 3; quick 1)")
    p.add_argument("--warmup", type=float, default=None, help="warm-up seconds per step (default 0.5; quick 0.3)")
    p.add_argument("--workers", default=None, help="real-server worker counts to try (default 1,2; quick 2)")
    p.add_argument("--client-procs", type=int, default=1, help="load-generator processes (sharing the cores)")
    p.add_argument("--intra-op-threads", type=int, default=0, help="server and in-process (0: ORT default)")
    p.add_argument("--max-batch-size", type=int, default=1024)
    p.add_argument("--max-queue-delay-us", type=int, default=0)
    p.add_argument("--big-batch", type=int, default=256, help="images per request of the big-batch steps")
    p.add_argument("--big-batch-concurrency", type=int, default=2)
    p.add_argument("--naive", action=argparse.BooleanOptionalAction, default=None, help="also sweep the naive server")
    p.add_argument("--open-loop", type=float, default=None, help="open-loop step at this fraction of peak (0: off)")
    p.add_argument("--server-args", default="", help="extra flags for python -m serving")
    p.add_argument("--model-repository", type=Path, default=REPO_ROOT / "model_repository")
    p.add_argument("--data-dir", type=Path, default=REPO_ROOT / "data")
    p.add_argument("--results-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--stream-concurrency", default=None, help="ModelStreamInfer closed-loop steps (default 16,32)")
    p.add_argument("--perf-analyzer", action=argparse.BooleanOptionalAction, default=True, help="perf_analyzer runs")
    p.add_argument("--peers", default=None, help="peers (default triton,mlserver,kserve where installed; '' none)")
    p.add_argument("--pa-window-ms", type=int, default=None, help="perf_analyzer window (default 1500; quick 500)")
    p.add_argument("--retries", type=int, default=None, help="rerun a disturbed step (default 1; quick 0)")
    return p


def _args(argv: list[str] | None) -> argparse.Namespace:
    a = _parser().parse_args(argv)
    q = a.quick
    for name in ("model_repository", "data_dir", "results_dir"):  # child servers run from the repository root
        setattr(a, name, getattr(a, name).resolve())
    a.concurrency = [int(c) for c in (a.concurrency or ("1,32" if q else "1,8,32,64")).split(",")]
    a.duration = a.duration or (1.0 if q else 3.0)
    a.warmup = a.warmup if a.warmup is not None else (0.3 if q else 0.5)
    a.workers = [int(w) for w in (a.workers or ("2" if q else "1,2")).split(",")]
    a.stream_concurrency = [int(c) for c in (a.stream_concurrency or ("16" if q else "16,32")).split(",") if c]
    a.pa_window_ms = a.pa_window_ms or (500 if q else 1500)
    a.peers = [p for p in (",".join(peers.PEERS) if a.peers is None else a.peers).split(",") if p]
    a.naive = (not q) if a.naive is None else a.naive
    a.retries = (0 if q else 1) if a.retries is None else a.retries
    a.open_loop = (0.0 if q else 0.5) if a.open_loop is None else a.open_loop
    return a


def _steps(args, concurrency: list[int], stream: list[int] = (), big: bool = False) -> list[Step]:
    """Batch-1 FP32 closed-loop steps, streaming steps, and the big-batch steps (UINT8 and FP32)."""
    at = {"duration": args.duration, "warmup": args.warmup}
    steps = [Step(concurrency=c, **at) for c in concurrency] + [Step(concurrency=c, stream=True, **at) for c in stream]
    if big:
        steps += [Step(concurrency=args.big_batch_concurrency, batch=args.big_batch, dtype=d, **at)
                  for d in ("UINT8", "FP32")]  # fmt: skip
    return steps


def _server(name: str, spec: str, args, logs: Path) -> ChildServer:
    c = contender(name, spec, args.model_repository, logs / f"{name}-work")
    return ChildServer(name, c.cmd, c.port, logs / f"{name}.log", metrics_port=c.metrics_port, cwd=c.cwd, env=c.env)


def references(args, logs: Path) -> list[Entrant]:
    """The stock and tuned no-compute servers (with perf_analyzer), the peers where installed, the naive server."""
    out = []
    nc_pa = [pa.PaStep(1), pa.PaStep(16), pa.PaStep(16, streaming=True)]
    for name in ("nocompute", "nocompute-tuned"):
        steps = _steps(args, args.concurrency, args.stream_concurrency)
        out.append(Entrant(name, _server(name, name, args, logs), steps, nc_pa))
    for name in args.peers:
        why = peers.missing(name)
        if why:
            log.warning("peer %s skipped: %s", name, why)
            continue
        out.append(Entrant(name, _server(name, name, args, logs), _steps(args, args.concurrency), info={"peer": True}))
    if args.naive:
        port = free_port()
        cmd = python_cmd("-m", "bench.naive_server", "--port", str(port), "--model-repository",
                         str(args.model_repository), "--intra-op-threads", str(args.intra_op_threads))  # fmt: skip
        out.append(
            Entrant("naive", ChildServer("naive", cmd, port, logs / "naive.log"), _steps(args, args.concurrency))
        )
    return out


def real_servers(args, logs: Path) -> list[Entrant]:
    """`python -m serving` with each worker count: every step, the open loop and perf_analyzer."""
    pa_steps = [pa.PaStep(c) for c in sorted({*args.concurrency, 16})]
    pa_steps += [pa.PaStep(16, streaming=True), pa.PaStep(args.big_batch_concurrency, batch=args.big_batch)]
    out = []
    for w in args.workers:
        flags = ["--workers", str(w), "--max-batch-size", str(args.max_batch_size), "--max-queue-delay-us",
                 str(args.max_queue_delay_us), "--intra-op-threads", str(args.intra_op_threads),
                 *shlex.split(args.server_args)]  # fmt: skip
        name = f"real-w{w}"
        server = _server(name, "serving:" + shlex.join(flags), args, logs)
        steps = _steps(args, args.concurrency, args.stream_concurrency, big=True)
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        out.append(Entrant(name, server, steps, pa_steps, url, info={"workers": w}, open_fraction=args.open_loop))
    return out


def in_process(args, model_path: Path, images, labels) -> Entrant:
    """onnxruntime in this process through the server's own OnnxModel: batch 1 and the big batch, FP32 and UINT8,
    with the server's intra-op threads and (when that differs) onnxruntime's default; the ratios use the faster."""
    models = {t: inprocess.load_model(model_path, "cpu", t) for t in dict.fromkeys((args.intra_op_threads, 0))}

    def measure_all() -> list[dict]:
        out = []
        for threads, model in models.items():
            for b in (1, args.big_batch):
                for d in ("FP32", "UINT8"):
                    out.append(_in_process_step(model, images, labels, b, d, threads, args))
        return out

    return Entrant("inprocess", inprocess=measure_all, info={"what": "the server's OnnxModel, no gRPC"})


def _in_process_step(model, images, labels, batch: int, dtype: str, threads: int, args) -> dict:
    attempts = []
    for _ in range(args.retries + 1):
        log.info("in-process step batch %d %s", batch, dtype)
        attempts.append(inprocess.measure(model, images, labels, batch, dtype, min(args.duration, 2.0), warmup=0.2))
        if attempts[-1]["other_cpu_pct"] <= NOISY_OTHER_CPU_PCT:
            break
    r = min(attempts, key=lambda a: a["other_cpu_pct"])
    return {**r, "intra_op_threads": threads, "label": f"batch {batch} {dtype} threads {threads}"}


def start_all(entrants: list[Entrant]) -> None:
    """Every server started, then every one ready (all kept running: an idle one costs nearly nothing)."""
    servers = [e.server for e in entrants if e.server is not None]
    for server in servers:
        server.start()
        log.info("started %s", server.name)
    for server in servers:
        server.wait_ready()


def build_report(rounds, entrants: list[Entrant], args, info: dict) -> dict:
    servers = {}
    for e in entrants:
        if e.server is not None:
            row = {"cmd": e.server.cmd, **e.info, "steps": summary.rows(rounds.steps.get(e.name, {}))}
            row["perf_analyzer"] = summary.rows(rounds.perf.get(e.name, {}))
            servers[e.name] = row
    c = 32 if 32 in args.concurrency else max(args.concurrency)
    best = summary.best_real(rounds, c)
    return {
        "machine": info, "servers": servers, "inprocess": summary.rows(rounds.steps.get("inprocess", {})),
        "best_real": best, "ratios": summary.ratio_rows(rounds, args.concurrency),
        "big_batch": [{k: v for k, v in b.items() if k != "sources"} for b in summary.big_batch_rows(rounds, args)],
        "goals": summary.goals(rounds, best, args),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "server_pids": {e.name: e.server.pids for e in entrants if e.server is not None},
    }  # fmt: skip


def write(report: dict, args, stamp: str) -> None:
    args.results_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, default=str)
    (args.results_dir / f"{stamp}.json").write_text(text)
    (args.results_dir / "latest.json").write_text(text)
    if not args.no_plot:
        log.info("writing the plot")
        plot(report, args.results_dir / f"{stamp}.png")
        (args.results_dir / "latest.png").write_bytes((args.results_dir / f"{stamp}.png").read_bytes())
    print(f"\nresults: {args.results_dir / (stamp + '.json')} (and latest.json, latest.png)")


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    install_sigterm_exit()
    t_begin, stamp = time.perf_counter(), datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    logs = args.results_dir / "logs" / stamp
    model_path = find_model(args.model_repository)
    images, labels = load_test_set(args.data_dir)
    info = {**machine_info(), "loadavg_at_start": os.getloadavg()}
    log.info("machine: %s", info)
    pa_why_not = pa.missing() if args.perf_analyzer else "--no-perf-analyzer"
    if pa_why_not is not None:
        log.warning("perf_analyzer runs skipped: %s", pa_why_not)
    pa_data = pa.write_input_data(logs / "perf_analyzer_mnist_fp32.json", images) if pa_why_not is None else None
    entrants = references(args, logs) + real_servers(args, logs) + [in_process(args, model_path, images, labels)]
    try:
        start_all(entrants)
        with LoadGenerator("127.0.0.1:1", images, labels, args.client_procs) as gen:
            rounds = run_rounds(gen, entrants, args, pa_data)
    finally:
        for e in entrants:
            if e.server is not None:
                e.server.stop()
    report = build_report(rounds, entrants, args, info)
    report.update(timestamp=stamp, model=str(model_path), runtime_s=round(time.perf_counter() - t_begin, 1))
    print_report(report)
    write(report, args, stamp)
    errors = sum(sum(r["errors"].values()) for s in report["servers"].values() for r in s["steps"])
    return 1 if errors else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: child servers stopped", file=sys.stderr)
        sys.exit(130)
