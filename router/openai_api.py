"""The OpenAI-compatible HTTP front door (FastAPI on uvicorn), beside the gRPC one.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming as server-sent
events ending in ``data: [DONE]``, or one JSON body), ``GET /v1/models``, ``GET /health``
(200 while each pool has a worker, else 503) and ``GET /metrics`` (Prometheus text,
``common.prom.RouterMetrics``).

Each completion request becomes one ``cleave.v1.GenerateRequest``
(``router.openai_protocol``) run by :meth:`router.core.RouterCore.generate`, the same
lifecycle as gRPC. An ``X-Request-Id`` header sets the request id (the Redis key
``<prefix>req:<id>``; checked like gRPC's ``request_id``); responses carry it back in
``X-Request-Id`` and in their ``id`` (``cmpl-<id>`` / ``chatcmpl-<id>``). Errors raised before the first token are an HTTP status with OpenAI's error
body (``common.errors.http_status_of``); an error after the stream began is sent as one
``data: {"error": ...}`` event followed by ``data: [DONE]``. A client that disconnects
(before or after the first token) closes the core's generator: the request is recorded
``cancelled`` and its KV blocks are freed. No route answers a ``text/plain`` 500: an
unexpected exception becomes OpenAI's error body (:class:`InternalErrors`).

Deadlines: an ``X-Request-Timeout: <seconds>`` header gives the request a deadline (504
``timeout_error`` when it passes); without it only the operator's ``--request-timeout`` (off
by default) bounds a request, which otherwise runs until it finishes, its client disconnects
or it reaches ``max_tokens``.

Lifecycle: :func:`start_http` binds the port and serves from a task in the router's event
loop; :meth:`HttpServer.stop` ends it.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import uuid

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.errors import CleaveError, InvalidRequest, NotFound, http_status_of
from common.prom import CONTENT_TYPE
from router.openai_protocol import ChatRequest, CompletionRequest, chat_request, completion_request
from router.openai_shape import Shaper, error_body
from router.readahead import Readahead

log = logging.getLogger(__name__)

_DISCONNECT_POLL_S = 0.05


TIMEOUT_HEADER = "x-request-timeout"  # seconds: the client's deadline for this request


def _error_response(exc: BaseException) -> JSONResponse:
    status, kind, message = http_status_of(exc)
    if status >= 500 and not isinstance(exc, CleaveError):
        log.error("HTTP request failed: %s", message, exc_info=exc)
    return JSONResponse(error_body(message, kind), status_code=status)


class InternalErrors:
    """ASGI middleware: any exception a route lets escape becomes OpenAI's error body (``500``,
    ``internal_error``, naming the request id) instead of a ``text/plain`` 500; its traceback is
    logged once and it is counted (``cleave_http_internal_errors_total``). A response already
    started (a stream) is left to end as it was."""

    def __init__(self, app, count) -> None:
        self.app, self.count = app, count

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            headers = dict(scope.get("headers") or ())
            rid = headers.get(b"x-request-id", b"").decode("latin-1") or uuid.uuid4().hex
            log.error("internal error on %s %s (request %s)", scope.get("method"), scope.get("path"), rid,
                      exc_info=exc)
            self.count()
            if started:
                return
            body = error_body(f"internal error on request {rid}: {type(exc).__name__}; the server "
                              f"logged the details", "internal_error")
            await JSONResponse(body, status_code=500, headers={"X-Request-Id": rid})(scope, receive, send)


def client_timeout(request: Request) -> float | None:
    """The client's deadline from the ``X-Request-Timeout`` header (seconds > 0), None when absent.
    Raises InvalidRequest for any other value."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise InvalidRequest(f"the X-Request-Timeout header must be a number of seconds > 0, got {raw[:32]!r}")
    return value


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def _until_disconnect(request: Request, coro):
    """Await ``coro``; cancel it (raising CancelledError) if the client disconnects first."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                raise asyncio.CancelledError("client disconnected")
    finally:
        if not task.done():
            task.cancel()


def build_app(core) -> FastAPI:
    """The FastAPI app over ``core`` (a ``router.core.RouterCore``)."""
    app = FastAPI(title="Cleave", summary="OpenAI-compatible API of a Cleave router", docs_url=None,
                  redoc_url=None)
    created = int(time.time())
    app.add_middleware(InternalErrors, count=core.prom.internal_error)

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"invalid request body: {first.get('msg', 'malformed')}" + (f" at {where}" if where else "")
        core.refused(InvalidRequest(message))
        return JSONResponse(error_body(message, "invalid_request_error", where), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {exc.detail}", kind),
                            status_code=exc.status_code)

    def check_model(name: str | None) -> None:
        if name and name != core.model_id:
            raise NotFound(f"the model {name!r} does not exist; this server serves {core.model_id!r} "
                           f"(see GET /v1/models)")

    async def run(request: Request, body, chat: bool):
        try:
            check_model(body.model)
            req = chat_request(body) if chat else completion_request(body)
            req.request_id = request.headers.get("x-request-id", "")  # optional; validated by the core
            timeout = client_timeout(request)
        except CleaveError as exc:  # refused before the core: counted here, once
            core.refused(exc)
            return _error_response(exc)
        pump = Readahead(core.generate(req, timeout, fill_max_tokens=chat), core.cfg.stream_buffer)
        try:
            first = await _until_disconnect(request, pump.next())
            if first is None:
                raise CleaveError("the request ended without output")
        except Exception as exc:  # CleaveError as the core raises them; anything else is a 500
            await pump.close()
            return _error_response(exc)
        except asyncio.CancelledError:
            await pump.close()
            return Response(status_code=499)
        try:
            echo = ""
            if not chat and body.echo:
                echo = body.prompt if req.WhichOneof("input") == "prompt" else \
                    await asyncio.to_thread(core.codec.decode, list(req.token_ids.ids))
            shaper = Shaper(chat, core.model_id, first.request_id, core.codec,
                            logprobs=req.sampling.logprobs or req.sampling.prompt_logprobs, echo=echo)
        except BaseException:   # the request must not outlive its response
            await pump.close()
            raise
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_events(pump, first, shaper, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Request-Id": first.request_id})
        try:
            return JSONResponse(await _until_disconnect(request, _whole(pump, first, shaper)),
                                headers={"X-Request-Id": first.request_id})
        except Exception as exc:
            return _error_response(exc)
        except asyncio.CancelledError:
            return Response(status_code=499)
        finally:
            await pump.close()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await run(request, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await run(request, body, chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": core.model_id, "object": "model", "created": created,
                                            "owned_by": "cleave", "max_model_len": core.model.max_position}]}

    @app.get("/health")
    async def health():
        pools = {p: len(core.directory.registered(p)) for p in ("prefill", "decode")}
        ok = all(pools.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "instances": pools},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(core.prom.exposition(), media_type=CONTENT_TYPE)

    return app


async def _whole(pump: Readahead, first, shaper: Shaper) -> dict:
    messages = [first]
    while (msg := await pump.next()) is not None:
        messages.append(msg)
    return shaper.whole(messages)


async def _events(pump: Readahead, first, shaper: Shaper, include_usage: bool):
    """SSE bytes of one streamed request. Cancellation (client gone) closes the pump."""
    try:
        if shaper.chat:
            yield _sse(shaper.chunk(None, role=True))
        msg, lead = first, True
        while msg is not None:
            chunk = shaper.chunk(msg, first=lead)
            lead = False
            if chunk is not None:
                yield _sse(chunk)
            if msg.finish_reason and include_usage:
                yield _sse(shaper.usage_chunk(msg))
            msg = await pump.next()
    except Exception as exc:
        status, kind, message = http_status_of(exc)
        yield _sse(error_body(message, kind, code=str(status)))
    finally:
        await pump.close()
    yield b"data: [DONE]\n\n"


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers: the router process owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    """uvicorn serving :func:`build_app` from a task of the running event loop."""

    def __init__(self, core, host: str, port: int) -> None:
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as exc:
            self._sock.close()
            raise RuntimeError(f"could not bind the HTTP API to {host}:{port} ({exc}); pick another "
                               f"--http-port") from None
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(build_app(core), log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5)
        self._server = _Server(config)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[self._sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._task, 10)
        self._sock.close()


async def start_http(core, host: str, port: int) -> HttpServer:
    """Bind ``host:port`` (0 = a free port) and serve the OpenAI API; returns the server
    (its ``port`` is the bound one). Raises RuntimeError when the port is taken."""
    server = HttpServer(core, host, port)
    await server.start()
    log.info("OpenAI-compatible API on http://%s:%d/v1", host, server.port)
    return server
