"""Cleave's exception hierarchy and its one mapping to gRPC status codes.

Services raise these; the gRPC layer turns them into a status with the message as written,
so every message must say what was wrong and what to do about it. Errors fail the request,
never the process.
"""
from __future__ import annotations

import grpc


class CleaveError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidRequest(CleaveError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Exhausted(CleaveError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(CleaveError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(CleaveError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(CleaveError):
    code = grpc.StatusCode.CANCELLED


class NotFound(CleaveError):
    code = grpc.StatusCode.NOT_FOUND


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client sees for ``exc``."""
    if isinstance(exc, CleaveError):
        return exc.code, str(exc)
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), exc.details() or exc.code().name
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """Abort the RPC behind ``context`` with the status for ``exc`` (raises, as grpc does)."""
    code, message = status_of(exc)
    await context.abort(code, message)
