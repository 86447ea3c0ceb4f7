"""The process: entry point, logging, malloc arenas, the metrics endpoint, exit codes, one process or workers.

`python -m serving` comes here. One process runs the server (serving.server) itself; with `--workers N` this
process prepares what the workers share (port, metrics directory, receipt key), serves the merged /metrics, and
supervises N spawned processes (serving.workers), each of which enters at `worker_main`. Exit codes: 0 after a
clean drain, 1 on a start-up fault (one `start-up failed: ...` line), 2 for bad flags (argparse).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import sys

from serving import workers
from serving.config import Settings, parse_args
from serving.errors import StartupError

log = logging.getLogger(__name__)

_M_ARENA_MAX = -8  # glibc malloc.h
LOG_FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"


def main(argv: list[str] | None = None) -> int:
    """`python -m serving [flags]`: the exit code."""
    return run(parse_args(argv))


def run(settings: Settings) -> int:
    """Serve in this process, or as `settings.workers` processes on one port; the exit code."""
    configure_process(settings)
    if settings.workers > 1:
        shared = workers.prepare(settings)  # before the metrics endpoint: it reads the workers' metrics directory
        if not start_metrics(settings):
            return 1
        return workers.supervise(settings, shared, worker_main)
    if not start_metrics(settings):
        return 1
    return serve_here(settings)


def worker_main(settings: Settings, readiness: workers.Readiness) -> None:
    """Entry point of a spawned worker process: ready only when every worker is (`readiness`)."""
    configure_process(settings)
    raise SystemExit(serve_here(settings, readiness))


def configure_process(settings: Settings) -> None:
    """Logging and malloc arenas, before any thread starts."""
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    limit_malloc_arenas(settings.malloc_arena_max)


def start_metrics(settings: Settings) -> bool:
    """The /metrics endpoint (unless port 0); False, with the one error line, when its port cannot be had."""
    if not settings.metrics_port:
        return True
    from serving.metrics import start_metrics_server

    try:
        start_metrics_server(settings.metrics_port, settings.host)
    except OSError as exc:
        log.error("cannot serve metrics on %s:%d: %s", settings.host, settings.metrics_port, exc)
        return False
    return True


def serve_here(settings: Settings, readiness: workers.Readiness | None = None) -> int:
    """Run the server in this process until it has drained: 0, or 1 after a start-up fault. A worker waits for
    every worker's load (`readiness`) before it says SERVING."""
    # Imported here, not at the top: the server imports prometheus_client, which must see a worker's
    # PROMETHEUS_MULTIPROC_DIR (set by workers.prepare) when it is first imported.
    from serving.server import serve

    try:
        with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
            runner.run(serve(settings, readiness))
    except StartupError as exc:
        log.error("start-up failed: %s", exc)
        return 1
    return 0


def loop_factory(name: str):
    """The event loop's constructor: uvloop's (the default) or asyncio's own.

    NOTE: grpc.aio's completion queue and every task step run on the loop, and uvloop's are cheaper: with the
    runs of small requests on the loop, 0.83x the CPU per request against 0.88x on asyncio's loop, and 0.90x on
    the no-compute server (bench/README.md, "Request path")."""
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def limit_malloc_arenas(arenas: int) -> None:
    """Cap glibc's malloc arenas (before threads start) unless MALLOC_ARENA_MAX is set; 0 leaves the default.

    NOTE: gRPC, onnxruntime and the batcher allocate request-sized buffers from several threads; each thread's
    arena keeps what it freed, so a burst of large requests is held several times over (measured in
    docs/reliability.md). Unlike a fixed MALLOC_MMAP_THRESHOLD_, this costs no measurable throughput."""
    if not arenas or "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): nothing to tune
        return
    libc.mallopt(_M_ARENA_MAX, arenas)
