"""Which ModelInfer calls are read and which are refused unread: the per-process byte budget."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from serving.admission import Admission
from serving.config import Settings
from serving.dataplane import DataPlane
from serving.errors import InvalidInput, Overloaded
from serving.protos import grpc_service_pb2 as pb
from serving.state import ServerState
from serving.wire import InferRequest

MB = 1 << 20


def test_one_request_alone_is_always_admitted_even_over_the_budget():
    a = Admission(budget=1 * MB)
    a.typical = 100 * MB
    a.before_read()
    a.after_read(50 * MB)
    a.hold(50 * MB)
    assert a.held == 50 * MB and a.reading == 0
    with pytest.raises(Overloaded, match="50 MiB of requests in flight"):
        a.before_read()
    a.release(50 * MB)
    a.before_read()  # nothing held: admitted again


def test_calls_are_refused_unread_once_held_plus_typical_reads_pass_the_budget():
    a = Admission(budget=16 * MB)
    a.typical = 4 * MB
    for _ in range(4):  # 4 x 4 MB being read: 16 MB, still within
        a.before_read()
    with pytest.raises(Overloaded, match=r"\+4 being read"):
        a.before_read()
    assert a.reading == 4
    a.after_read(4 * MB)
    a.hold(4 * MB)  # read and held: 4 MB + 3 reading x 4 MB = 16 MB
    with pytest.raises(Overloaded):
        a.before_read()
    a.read_failed()  # one read cancelled: room for one more
    a.before_read()


def test_small_requests_keep_many_reads_open():
    """Batch-1 clients (3 KB requests) at high concurrency are not refused by a budget meant for megabytes."""
    a = Admission(budget=16 * MB)
    a.typical = 3_200
    for _ in range(1000):
        a.before_read()
    assert a.reading == 1000


def test_the_typical_size_follows_the_traffic():
    a = Admission(budget=16 * MB)
    for _ in range(20):
        a.before_read()
        a.after_read(3 * MB)
    assert 2.9 * MB < a.typical <= 3 * MB
    for _ in range(20):
        a.before_read()
        a.after_read(3_000)
    assert a.typical < 0.05 * MB


def test_hold_refuses_what_does_not_fit_and_release_frees_it():
    a = Admission(budget=10 * MB)
    a.hold(6 * MB)
    with pytest.raises(Overloaded):
        a.hold(5 * MB)
    a.hold(4 * MB)
    a.release(6 * MB)
    a.release(4 * MB)
    assert a.held == 0


def plane() -> DataPlane:
    return DataPlane(None, Settings(model_repository="unused"), ServerState(), None)


async def test_a_read_that_fails_or_is_cancelled_gives_its_place_back():
    s = plane()

    async def cancelled():
        raise asyncio.CancelledError

    async def eof():
        return grpc.aio.EOF

    async def message():
        return InferRequest.of(pb.ModelInferRequest(model_name="mnist", raw_input_contents=[bytes(784)]))

    with pytest.raises(asyncio.CancelledError):
        await s.read_admitted(cancelled, grpc.aio.EOF)
    assert s.admission.reading == 0
    with pytest.raises(InvalidInput, match="without a request message"):
        await s.read_admitted(eof, grpc.aio.EOF)
    assert s.admission.reading == 0
    received = await s.read_admitted(message, grpc.aio.EOF)
    assert received.message.model_name == "mnist" and s.admission.reading == 0
    assert s.admission.typical > 0


async def test_wait_for_room_returns_once_something_is_released():
    a = Admission(budget=8 * MB)
    a.typical = 4 * MB
    a.hold(8 * MB)
    waiter = asyncio.create_task(a.wait_for_room())
    await asyncio.sleep(0.01)
    assert not waiter.done() and a.reading == 0
    a.release(4 * MB)  # 4 MB held + one typical 4 MB read fits
    await asyncio.wait_for(waiter, 1)
    assert a.reading == 1
    a.read_failed()
    waiter = asyncio.create_task(a.wait_for_room())  # room now: returns at once
    await asyncio.wait_for(waiter, 1)
    assert a.reading == 1
