"""The process's state as the request path reads it (set by serving.server, read by the data plane)."""

from __future__ import annotations

import asyncio


class ServerState:
    """What the request path needs to know about the process: readiness and drain."""

    def __init__(self) -> None:
        self.started = False  # loaded, and with --workers every worker too: ready unless draining
        self.draining = False  # SIGTERM received: not ready (health NOT_SERVING), still answering
        # The drain's last moments: new calls get UNAVAILABLE with a retry pushback, streams stop reading.
        self.refusing_started = asyncio.Event()
        # Set once the gRPC server has begun to shut down (GOAWAY is on its way): calls held while refusing get
        # their UNAVAILABLE then, when the client's next call can no longer reach this process's gRPC queue.
        self.goaway = asyncio.Event()
        self.last_call = 0.0  # time.monotonic() of the latest ModelInfer, refused ones included

    @property
    def refusing(self) -> bool:
        return self.refusing_started.is_set()

    @refusing.setter
    def refusing(self, value: bool) -> None:
        (self.refusing_started.set if value else self.refusing_started.clear)()
