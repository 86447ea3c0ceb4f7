"""Domain errors and the one place that maps them (and everything unexpected) to gRPC status codes."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

log = logging.getLogger(__name__)


class ServingError(Exception):
    """Base class: an error the client should see, with the status code it should see."""

    code = grpc.StatusCode.INTERNAL


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
    code = grpc.StatusCode.UNAVAILABLE


class Overloaded(ServingError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServingError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class StartupError(Exception):
    """The server cannot start (bad repository, port in use, GPU required but absent): exit non-zero."""


INTERNAL_MESSAGE = "internal error while serving the request; the server logged the details"


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for an exception."""
    if isinstance(exc, ServingError):
        return exc.code, str(exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


R = TypeVar("R")


def grpc_errors(handler: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Decorate an async RPC handler so domain errors become their status and the rest INTERNAL."""

    @functools.wraps(handler)
    async def wrapper(self, request, context: grpc.aio.ServicerContext) -> R:
        try:
            return await handler(self, request, context)
        except ServingError as exc:
            await context.abort(exc.code, str(exc))
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("unexpected failure in %s", handler.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)

    return wrapper
