"""ModelStreamInfer: Triton's bidirectional stream over the data plane, with its bounds (in-flight window, reading
stopped while the process has no room, reading stopped on drain)."""

from __future__ import annotations

import asyncio
import logging

import grpc

from serving import wire
from serving.dataplane import DataPlane
from serving.errors import status_of
from serving.protos import grpc_service_pb2 as pb

log = logging.getLogger(__name__)


class InferStream:
    """One ModelStreamInfer call: reads requests while at most `stream_max_in_flight` are unanswered (then
    stops reading, so HTTP/2 flow control slows the client), answers each as it completes, a bad request
    with `error_message`; on drain stops reading and answers what it accepted."""

    def __init__(self, plane: DataPlane, requests, deadline: float | None) -> None:
        self.plane, self.requests, self.deadline = plane, requests, deadline
        self.window = asyncio.Semaphore(plane.settings.stream_max_in_flight)
        self.answers: asyncio.Queue[bytes | pb.ModelStreamInferResponse | None] = asyncio.Queue()
        self.tasks: set[asyncio.Task] = set()
        self.reading = True
        self.cut_by_drain = False  # the drain stopped the reading: the stream ends UNAVAILABLE

    async def responses(self):
        reader = asyncio.create_task(self._read())
        watcher = asyncio.create_task(self._stop_reading_on_drain(reader))
        try:
            while (answer := await self.answers.get()) is not None:
                yield answer
        finally:
            watcher.cancel()
            reader.cancel()
            for task in self.tasks:
                task.cancel()

    async def _stop_reading_on_drain(self, reader: asyncio.Task) -> None:
        await self.plane.state.refusing_started.wait()
        if self.reading:  # a client that already closed its side just gets its answers and OK
            self.cut_by_drain = True
            reader.cancel()

    async def _read(self) -> None:
        admission = self.plane.admission
        requests = aiter(self.requests)
        try:
            while True:
                await self.window.acquire()
                # NOTE: a stream is never refused for memory: it stops reading (HTTP/2 flow control slows the
                # client) until the process has room for a typical request.
                await admission.wait_for_room()
                request = await admission.read(lambda: anext(requests, None))
                if request is None:  # the client closed its side
                    break
                task = asyncio.create_task(self._answer(request))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        except asyncio.CancelledError:
            pass  # drain or the call ended: accept nothing more, answer what was accepted
        self.reading = False
        while self.tasks:
            await asyncio.wait(list(self.tasks))
        self.answers.put_nowait(None)

    async def _answer(self, received: wire.InferRequest) -> None:
        request = received.message
        try:
            response = wire.stream_response(await self.plane.infer(received, self.deadline, stream=True))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            code, message = status_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("unexpected failure in ModelStreamInfer")
            response = pb.ModelStreamInferResponse(
                error_message=f"{code.name}: {message}",
                infer_response=pb.ModelInferResponse(
                    model_name=request.model_name, model_version=request.model_version, id=request.id
                ),
            )
        finally:
            self.window.release()
        self.answers.put_nowait(response)
