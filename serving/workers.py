"""Several server processes on one port (SO_REUSEPORT) so Python uses every core: what they share, and their
supervision. The process entry and the /metrics endpoint that merges them are serving.lifecycle's."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from multiprocessing.context import SpawnContext
from pathlib import Path

from serving.config import Settings

log = logging.getLogger(__name__)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def prepare(settings: Settings) -> Settings:
    """What the workers share, set up before any starts: one port, one metrics directory (in this process's
    environment, which spawned workers inherit), one receipt key. Returns the workers' settings."""
    port = settings.grpc_port or _free_port(settings.host)
    prom_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="mnist-serving-prom-")
    Path(prom_dir).mkdir(parents=True, exist_ok=True)
    for stale in Path(prom_dir).glob("*.db"):  # a previous run's values must not leak into this one
        stale.unlink()
    # Children are spawned (fresh interpreters), so they create their metrics in multiprocess mode.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = prom_dir
    shared = settings.model_copy(update={"grpc_port": port})
    if settings.receipt_key_file is None:
        # One random key for all workers, so a receipt from one verifies in the others.
        fd, key_path = tempfile.mkstemp(prefix="mnist-serving-receipt-key-")
        os.write(fd, os.urandom(32))
        os.close(fd)
        shared.receipt_key_file = Path(key_path)
        log.warning(
            "no --receipt-key-file: the workers share a random receipt key made now; receipts verify only in "
            "this server (not in other replicas, not after a restart)"
        )
    return shared


class Readiness:
    """The server's readiness across its workers: each worker counts itself in once it has loaded what it serves,
    and none says SERVING (health, ServerReady, ModelReady) before all have. A probe opens a new connection, which
    the kernel hands to any worker (SO_REUSEPORT): one worker's readiness is not the server's.

    Workers are not restarted (a worker that exits takes the server down, see `supervise`), so the count only grows.
    """

    def __init__(self, ctx: SpawnContext, workers: int) -> None:
        self.workers = workers
        self._loaded = ctx.Value("i", 0)  # shared memory, inherited by the spawned workers

    def loaded(self) -> None:
        """This worker has loaded its models."""
        with self._loaded.get_lock():
            self._loaded.value += 1

    def all_loaded(self) -> bool:
        return self._loaded.value >= self.workers


def supervise(settings: Settings, shared: Settings, target: Callable[[Settings, Readiness], None]) -> int:
    """Start `settings.workers` processes running target(shared, readiness), forward SIGTERM/SIGINT, reap; the exit
    code (1 when a worker failed, and then the others are stopped)."""
    ctx = multiprocessing.get_context("spawn")
    readiness = Readiness(ctx, settings.workers)
    children = [
        ctx.Process(target=target, args=(shared, readiness), name=f"worker-{i}") for i in range(settings.workers)
    ]
    stopping = False

    def forward(signum, _frame):
        # The same signal: SIGTERM drains with the drain delay, SIGINT (Ctrl-C) without it.
        nonlocal stopping
        stopping = True
        for child in children:
            if child.is_alive():
                os.kill(child.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        child.start()
    log.info("%d workers on %s:%d (pids %s)", len(children), settings.host, shared.grpc_port, [c.pid for c in children])

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
        shared.receipt_key_file.unlink(missing_ok=True)
    return exit_code
