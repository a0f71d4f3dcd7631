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


class NoKVRoom(Exhausted):
    """A decode instance has too few free KV blocks for a reservation now."""


class CallerLimit(Exhausted):
    """A caller already holds as many unstarted reservations as it may (per-caller bound)."""


class Unavailable(CleaveError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(CleaveError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(CleaveError):
    code = grpc.StatusCode.CANCELLED


class NotFound(CleaveError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(CleaveError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class RequestFault(CleaveError):
    """A failure caused by this request alone and deterministic (e.g. its sampling produced no
    valid distribution, or its row of a batched step failed while the others succeeded):
    running it on another worker would fail the same way, so the router does not retry it.
    Workers mark it with the trailing metadata ``FAULT_KEY: request``."""

    code = grpc.StatusCode.INTERNAL


FAULT_KEY = "cleave-fault"
# on every status a Cleave servicer sends, valued with the error's class name: a call that
# fails without it never reached a live worker process (``router.workers.unreachable``)
ANSWERED_KEY = "cleave-answered"

_BY_CODE = {cls.code: cls for cls in (InvalidRequest, Exhausted, Unavailable, DeadlineExceeded,
                                      Cancelled, NotFound, FailedPrecondition)}


def error_for(code: grpc.StatusCode, message: str) -> CleaveError:
    """The CleaveError a front door raises for a worker's status ``code`` (INTERNAL otherwise)."""
    return _BY_CODE.get(code, CleaveError)(message)


def _trailer(exc: grpc.aio.AioRpcError, key: str) -> str | None:
    """The value of trailing-metadata ``key`` on a failed call (None when absent or unreadable)."""
    try:
        metadata = exc.trailing_metadata() or ()
    except Exception:
        return None
    return next((v for k, v in metadata if k == key), None)


def is_request_fault(exc: grpc.aio.AioRpcError) -> bool:
    """Whether a worker said that this failure is the request's own (see RequestFault)."""
    return _trailer(exc, FAULT_KEY) == "request"


def answered_as(exc: grpc.aio.AioRpcError) -> str | None:
    """The class name of the error a Cleave servicer answered with (None: no servicer answered)."""
    return _trailer(exc, ANSWERED_KEY)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client sees for ``exc``."""
    if isinstance(exc, CleaveError):
        return exc.code, str(exc)
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), exc.details() or exc.code().name
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def status_marks(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """The trailing metadata a Cleave servicer sends with the status for ``exc``."""
    return ((ANSWERED_KEY, type(exc).__name__),) + (((FAULT_KEY, "request"),) if isinstance(exc, RequestFault) else ())


def answered_error(code: grpc.StatusCode, message: str, error_type: str,
                   request_fault: bool = False) -> grpc.aio.AioRpcError:
    """The ``AioRpcError`` a call raises for a status a Cleave servicer sent (``status_marks``),
    for a status that reached the caller another way (in a stream's message, or made by the
    caller for a worker that answered): ``answered_as`` and ``is_request_fault`` read it alike."""
    marks = ((ANSWERED_KEY, error_type),) + (((FAULT_KEY, "request"),) if request_fault else ())
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*marks), message)


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """Abort the RPC behind ``context`` with the status for ``exc`` (raises, as grpc does)."""
    code, message = status_of(exc)
    await context.abort(code, message, trailing_metadata=status_marks(exc))


# the same classes as HTTP statuses and OpenAI error types (router.openai_api); 499 is the
# de-facto "client closed request"
_HTTP = {grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
         grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
         grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
         grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
         grpc.StatusCode.CANCELLED: (499, "cancelled_error"),
         grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
         grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error")}


def http_status_of(exc: BaseException) -> tuple[int, str, str]:
    """(HTTP status, OpenAI error type, message) a client of the HTTP API sees for ``exc``:
    the gRPC status of :func:`status_of` mapped to HTTP (500 ``internal_error`` otherwise)."""
    code, message = status_of(exc)
    status, kind = _HTTP.get(code, (500, "internal_error"))
    return status, kind, message
