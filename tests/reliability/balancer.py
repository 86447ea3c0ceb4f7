"""A per-connection TCP load balancer on loopback: what kube-proxy does for a ClusterIP Service.

Each new client connection goes to the next backend in turn and stays there for its whole life; a backend that
refuses the connection is skipped. Backends can be added and removed while it runs (endpoints coming and going).
It runs its own event loop on a thread, so it never competes with the test's loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter


class Balancer:
    def __init__(self, backends: list[int]) -> None:
        self._backends = list(backends)
        self._turn = 0
        self.connections: Counter[int] = Counter()  # backend port -> connections sent there
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="balancer", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_backends(self, backends: list[int]) -> None:
        """New connections go to these (open connections stay where they are, as with kube-proxy)."""
        self._loop.call_soon_threadsafe(setattr, self, "_backends", list(backends))

    def __enter__(self) -> Balancer:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop
        ).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        async def close():
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        backends = self._backends
        for _ in range(len(backends)):
            port = backends[self._turn % len(backends)]
            self._turn += 1
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                continue
            self.connections[port] += 1
            try:
                await asyncio.gather(_pipe(client_reader, writer), _pipe(reader, client_writer))
            except asyncio.CancelledError:  # the balancer is closing
                pass
            return
        client_writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (OSError, asyncio.CancelledError):
        pass
    finally:
        writer.close()
