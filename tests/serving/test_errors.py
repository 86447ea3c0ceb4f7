"""serving/errors.py: the one mapping to gRPC codes, on a real grpc.aio server on loopback."""

from __future__ import annotations

import logging

import grpc
import pytest

from serving.errors import INTERNAL_MESSAGE, InvalidInput, ModelNotFound, Overloaded, grpc_errors
from serving.protos import grpc_service_pb2 as pb
from serving.protos import grpc_service_pb2_grpc as pb_grpc

SECRET = "db password is hunter2"  # in an unexpected exception: must reach the log, never the client


class Faulty(pb_grpc.GRPCInferenceServiceServicer):
    """ModelInfer raises whatever the request's model_name names."""

    @grpc_errors
    async def ModelInfer(self, request, context):
        if request.model_name == "bug":
            return {}["missing " + SECRET]  # a KeyError nobody planned for
        if request.model_name == "bad":
            raise InvalidInput("input 'x' is bad")
        if request.model_name == "gone":
            raise ModelNotFound("unknown model 'gone'")
        if request.model_name == "busy":
            raise Overloaded("queue full")
        if request.model_name == "abort":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "handler's own abort")
        return pb.ModelInferResponse(model_name=request.model_name)


@pytest.fixture(scope="module")
async def stub():
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Faulty(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)
    await server.stop(0)


async def _call(stub, name: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ModelInfer(pb.ModelInferRequest(model_name=name), timeout=10)
    return err.value


async def test_an_unexpected_exception_is_internal_with_a_generic_message_and_a_logged_traceback(stub, caplog):
    caplog.set_level(logging.ERROR, logger="serving.errors")
    err = await _call(stub, "bug")
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details() == INTERNAL_MESSAGE
    assert SECRET not in err.details() and "KeyError" not in err.details()
    [record] = [r for r in caplog.records if r.name == "serving.errors"]
    assert record.levelno == logging.ERROR and record.getMessage() == "unexpected failure in ModelInfer"
    assert record.exc_info is not None and record.exc_info[0] is KeyError
    assert SECRET in caplog.text and "Traceback" in caplog.text  # the details are in the log


@pytest.mark.parametrize(
    ("name", "code", "details"),
    [
        ("bad", grpc.StatusCode.INVALID_ARGUMENT, "input 'x' is bad"),
        ("gone", grpc.StatusCode.NOT_FOUND, "unknown model 'gone'"),
        ("busy", grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full"),
        ("abort", grpc.StatusCode.PERMISSION_DENIED, "handler's own abort"),  # passed through, not INTERNAL
    ],
)
async def test_domain_errors_keep_their_code_and_message_and_log_nothing(stub, caplog, name, code, details):
    caplog.set_level(logging.DEBUG, logger="serving.errors")
    err = await _call(stub, name)
    assert (err.code(), err.details()) == (code, details)
    assert not [r for r in caplog.records if r.name == "serving.errors"]


async def test_a_good_call_is_untouched(stub):
    reply = await stub.ModelInfer(pb.ModelInferRequest(model_name="ok"), timeout=10)
    assert reply.model_name == "ok"
