"""Request bytes in flight per process: which ModelInfer calls to read, and which to refuse unread.

Memory under a burst of large requests is set by how many of them are read at once: a call whose message
gRPC reads is received in full (gRPC's buffers, then Python's bytes), while a call refused before its
message is read costs at most its HTTP/2 window in gRPC's buffers (--stream-window-bytes; the server never
copies it). The size of a request is only known once it is read, so a call is refused unread when the bytes
already held, plus a typical request (a moving average of recent sizes) for each call being read and for this one, would
pass the budget; a call read in spite of that (sizes vary) is refused when its real size does not fit. One
request alone is always admitted. A ModelStreamInfer stream is not refused but waits (`wait_for_room`): it
stops reading, and HTTP/2 flow control slows its client. Measured in docs/reliability.md ("Memory under
overload").
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from serving.errors import Overloaded

# Weight of the newest size in the moving average: a client switching to larger requests is followed within a
# few calls, and one odd request does not move it far.
_NEW_SIZE_WEIGHT = 0.2


class Admission:
    """Counts what one process holds; `budget` is `--max-inflight-bytes`. Single-threaded (the event loop)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.held = 0  # serialized bytes of the requests read and admitted, until answered
        self.reading = 0  # calls admitted unread, whose message is being read
        self.typical = 0.0  # moving average of request sizes
        self._freed = asyncio.Event()  # set whenever held or reading goes down

    def _full(self) -> bool:
        return bool(self.held or self.reading) and self.held + (self.reading + 1) * self.typical > self.budget

    def before_read(self) -> None:
        """Admit a call before its message is read (then `after_read` or `read_failed`), or raise Overloaded."""
        if self._full():
            raise Overloaded(self._message())
        self.reading += 1

    async def wait_for_room(self) -> None:
        """Wait until a read would be admitted, then count it as being read (then `after_read` or `read_failed`)."""
        while self._full():
            self._freed.clear()
            await self._freed.wait()
        self.reading += 1

    async def read(self, receive: Callable[[], Awaitable], end: object = None):
        """For a call counted as being read: await `receive()` and record the request's size; None when it
        returns `end` (the client sent nothing more). A failure or cancellation gives the place back."""
        try:
            received = await receive()
        except BaseException:
            self.read_failed()
            raise
        if received is end:
            self.read_failed()
            return None
        self.after_read(received.nbytes)
        return received

    def after_read(self, size: int) -> None:
        self.reading -= 1
        self.typical += _NEW_SIZE_WEIGHT * (size - self.typical)
        self._notify()

    def read_failed(self) -> None:
        self.reading -= 1
        self._notify()

    def hold(self, size: int) -> None:
        """Hold a request's `size` bytes until `release`, or raise Overloaded when they do not fit."""
        if self.held and self.held + size > self.budget:
            raise Overloaded(self._message())
        self.held += size

    def release(self, size: int) -> None:
        self.held -= size
        self._notify()

    def _notify(self) -> None:
        self._freed.set()

    def _message(self) -> str:
        return (
            f"server memory bound: {self.held >> 20} MiB of requests in flight (+{self.reading} being read), "
            f"limit {self.budget >> 20} MiB; retry later"
        )
