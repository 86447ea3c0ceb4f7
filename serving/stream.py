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
from serving.tracing import NOT_TRACED, TRACEPARENT_PARAMETER, RequestSpan

log = logging.getLogger(__name__)


class InferStream:
    """One ModelStreamInfer call: reads requests while at most `stream_max_in_flight` are unanswered (then
    stops reading, so HTTP/2 flow control slows the client), answers each as it completes, a bad request
    with `error_message`; on drain stops reading and answers what it accepted."""

    def __init__(self, plane: DataPlane, requests, deadline: float | None, metadata=()) -> None:
        self.plane, self.requests, self.deadline = plane, requests, deadline
        self.metadata = metadata  # the call's: a message without its own traceparent continues the stream's trace
        self.window = asyncio.Semaphore(plane.stream_window)
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
        await self.plane.refusing_begun()
        if self.reading:  # a client that already closed its side just gets its answers and OK
            self.cut_by_drain = True
            reader.cancel()

    async def _read(self) -> None:
        requests = aiter(self.requests)
        try:
            while True:
                await self.window.acquire()
                request = await self.plane.read_streamed(lambda: anext(requests, None))
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
        try:
            if self.plane.tracing is None:
                response = await self._infer(received)
            else:
                traceparent = _parameter(received.message, TRACEPARENT_PARAMETER)
                with self.plane.trace("ModelStreamInfer", self.metadata, traceparent) as span:
                    response = await self._infer(received, span)
        finally:
            self.window.release()
        self.answers.put_nowait(response)

    async def _infer(self, received: wire.InferRequest, span: RequestSpan = NOT_TRACED):
        """The answer to one message, or its error as a stream answer (the stream goes on)."""
        request = received.message
        try:
            return wire.stream_response(await self.plane.infer(received, self.deadline, stream=True, span=span))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            code, message = status_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("unexpected failure in ModelStreamInfer")
            return pb.ModelStreamInferResponse(
                error_message=f"{code.name}: {message}",
                infer_response=pb.ModelInferResponse(
                    model_name=request.model_name, model_version=request.model_version, id=request.id
                ),
            )


def _parameter(request: pb.ModelInferRequest, name: str) -> str:
    """A string request parameter, "" when absent (or of another type)."""
    if name not in request.parameters:
        return ""
    return request.parameters[name].string_param
