"""Domain errors and the one place that maps them (and everything unexpected) to gRPC status codes."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

log = logging.getLogger(__name__)


class ServingError(Exception):
    """Base class: an error the client should see, with the status code it should see."""

    code = grpc.StatusCode.INTERNAL
    # Trailing metadata sent with the status (e.g. a retry pushback for clients with a retry policy).
    trailers: tuple[tuple[str, str], ...] = ()


class InvalidInput(ServingError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidReceipt(InvalidInput):
    """A feedback receipt that cannot be scored: `outcome` names why (invalid, foreign_key, expired);
    `model` and `version` are the receipt's once its signature checked out, else empty."""

    def __init__(self, outcome: str, message: str, model: str = "", version: str = "") -> None:
        super().__init__(message)
        self.outcome, self.model, self.version = outcome, model, version


class ModelNotFound(ServingError):
    code = grpc.StatusCode.NOT_FOUND


class ModelNotReady(ServingError):
    code = grpc.StatusCode.UNAVAILABLE


class ServerDraining(ServingError):
    """The last moments of a drain: refuse, and ask retrying clients to wait until the connection is gone."""

    code = grpc.StatusCode.UNAVAILABLE
    # gRPC's server pushback (gRFC A6): a client's retry policy waits this long before its retry, by which
    # time this server has sent GOAWAY and the retry goes to a new connection (another replica).
    RETRY_PUSHBACK_MS = 1000
    trailers = (("grpc-retry-pushback-ms", str(RETRY_PUSHBACK_MS)),)


class Overloaded(ServingError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServingError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class PermissionDenied(ServingError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ModelControlOff(ServingError):
    """A load or unload while the server does not take them (model control mode none or poll)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ModelLoadFailed(ServingError):
    """A well-formed load whose model was tried and refused (unreadable, wrong accuracy): nothing changed."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class StartupError(Exception):
    """The server cannot start (bad repository, port in use, GPU required but absent): exit non-zero."""


class ModelLoadError(StartupError):
    """A model version that cannot be loaded (unreadable, not runnable on the provider, failed its accuracy check):
    a start-up fault when it happens at start, a refused load (ModelLoadFailed to the caller) later."""


INTERNAL_MESSAGE = "internal error while serving the request; the server logged the details"


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for an exception (CANCELLED: the client went away)."""
    if isinstance(exc, ServingError):
        return exc.code, str(exc)
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED, "the client went away"
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


R = TypeVar("R")


def grpc_errors(handler: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Decorate an async RPC handler so domain errors become their status and the rest INTERNAL."""

    @functools.wraps(handler)
    async def wrapper(self, request, context: grpc.aio.ServicerContext, *args) -> R:
        try:
            return await handler(self, request, context, *args)
        except ServingError as exc:
            await context.abort(exc.code, str(exc), trailing_metadata=exc.trailers)
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("unexpected failure in %s", handler.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)

    return wrapper
