"""A per-connection TCP load balancer on loopback: what kube-proxy does for a ClusterIP Service.

Each new client connection goes to the next backend in turn and stays there for its whole life; a backend that
refuses the connection is skipped. Backends can be changed while it runs (endpoints coming and going). It runs
in a process of its own, so relaying bytes never waits for the test's clients (kube-proxy relays in the kernel:
a GOAWAY must not sit in a busy test process while the client keeps sending).
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections import Counter
from multiprocessing.connection import Connection


class Balancer:
    def __init__(self, backends: list[int]) -> None:
        self._backends = list(backends)
        self._conn: Connection | None = None
        self._proc: multiprocessing.process.BaseProcess | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_backends(self, backends: list[int]) -> None:
        """New connections go to these (open connections stay where they are, as with kube-proxy)."""
        self._ask("set", list(backends))

    @property
    def connections(self) -> Counter[int]:
        """Backend port -> connections sent there so far."""
        return Counter(self._ask("counts", None))

    def _ask(self, command: str, argument):
        self._conn.send((command, argument))
        return self._conn.recv()

    def __enter__(self) -> Balancer:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, self._backends), name="balancer", daemon=True)
        self._proc.start()
        self.port = self._conn.recv()
        return self

    def __exit__(self, *exc) -> None:
        self._conn.send(("stop", None))
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()


def _serve(conn: Connection, backends: list[int]) -> None:
    asyncio.run(_main(conn, backends))


async def _main(conn: Connection, backends: list[int]) -> None:
    state = {"backends": backends, "turn": 0}
    counts: Counter[int] = Counter()
    stopped = asyncio.Event()

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        current = state["backends"]
        for _ in range(len(current)):
            port = current[state["turn"] % len(current)]
            state["turn"] += 1
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                continue
            counts[port] += 1
            await asyncio.gather(_pipe(client_reader, writer), _pipe(reader, client_writer))
            return
        client_writer.close()

    def on_command() -> None:
        command, argument = conn.recv()
        if command == "set":
            state["backends"] = argument
            conn.send(None)
        elif command == "counts":
            conn.send(dict(counts))
        else:
            stopped.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    asyncio.get_running_loop().add_reader(conn.fileno(), on_command)
    conn.send(server.sockets[0].getsockname()[1])
    await stopped.wait()
    server.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()
