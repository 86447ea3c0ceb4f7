"""Several server processes on one port (SO_REUSEPORT) so Python uses every core; one /metrics for all."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import socket
import tempfile
import time
from pathlib import Path

from serving.config import Settings

log = logging.getLogger(__name__)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _child(settings: Settings) -> None:
    from serving.errors import StartupError
    from serving.server import limit_malloc_arenas, serve

    limit_malloc_arenas(settings.malloc_arena_max)

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"
    )
    try:
        asyncio.run(serve(settings))
    except StartupError as exc:
        log.error("start-up failed: %s", exc)
        raise SystemExit(1) from None


def run_workers(settings: Settings) -> int:
    """Start `settings.workers` server processes, serve their merged metrics, forward SIGTERM, reap."""
    port = settings.grpc_port or _free_port(settings.host)
    prom_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="mnist-serving-prom-")
    Path(prom_dir).mkdir(parents=True, exist_ok=True)
    for stale in Path(prom_dir).glob("*.db"):  # a previous run's values must not leak into this one
        stale.unlink()
    # Children are spawned (fresh interpreters), so they create their metrics in multiprocess mode.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = prom_dir
    child_settings = settings.model_copy(update={"grpc_port": port})
    if settings.receipt_key_file is None:
        # One random key for all workers, so a receipt from one verifies in the others.
        fd, key_path = tempfile.mkstemp(prefix="mnist-serving-receipt-key-")
        os.write(fd, os.urandom(32))
        os.close(fd)
        child_settings.receipt_key_file = Path(key_path)
        log.warning(
            "no --receipt-key-file: the workers share a random receipt key made now; receipts verify only in "
            "this server (not in other replicas, not after a restart)"
        )
    ctx = multiprocessing.get_context("spawn")
    children = [ctx.Process(target=_child, args=(child_settings,), name=f"worker-{i}") for i in range(settings.workers)]

    stopping = False

    def forward(signum, _frame):
        # The same signal: SIGTERM drains with the drain delay, SIGINT (Ctrl-C) without it.
        nonlocal stopping
        stopping = True
        for child in children:
            if child.is_alive():
                os.kill(child.pid, signum)

    if settings.metrics_port:  # before any worker starts: a port in use is a start-up failure, as with one process
        from serving.metrics import start_metrics_server

        try:
            start_metrics_server(settings.metrics_port, settings.host)
        except OSError as exc:
            log.error("cannot serve metrics on %s:%d: %s", settings.host, settings.metrics_port, exc)
            return 1
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        child.start()
    log.info("%d workers on %s:%d (pids %s)", len(children), settings.host, port, [c.pid for c in children])

    from prometheus_client import multiprocess

    exit_code = 0
    while any(c.is_alive() for c in children):
        for child in children:
            if child.exitcode is not None and child.exitcode != 0 and not stopping:
                log.error("%s exited with %s; stopping the others", child.name, child.exitcode)
                exit_code = 1
                forward(signal.SIGTERM, None)
        time.sleep(0.2)
    for child in children:
        multiprocess.mark_process_dead(child.pid)
        if child.exitcode:
            exit_code = 1
    if settings.receipt_key_file is None:
        child_settings.receipt_key_file.unlink(missing_ok=True)
    return exit_code
