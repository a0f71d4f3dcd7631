"""Serving and calling Cleave's gRPC services the one way: bad bytes refused, internal APIs guarded.

* :func:`add_service` registers a servicer for a service descriptor (instead of the generated
  ``add_*_to_server``). Every method deserializes leniently: bytes that are not a valid message
  get ``INVALID_ARGUMENT`` with one line of log, not gRPC's ``UNKNOWN`` and a traceback. With a
  ``token``, every call must carry ``authorization: Bearer <token>`` in its metadata, or it is
  refused with ``UNAUTHENTICATED`` before the servicer runs.
* :func:`internal_channel` opens the channel a router (or a tool) uses to call worker APIs; it
  adds the token to every call.

The token is the deployment's shared secret for internal APIs (``CLEAVE_INTERNAL_TOKEN``,
see ``common.environment``): ``make run`` generates one per run, the Helm chart keeps it
in a Secret. Health and the public ``cleave.v1.Inference`` API take no token.
"""
from __future__ import annotations

import hmac
import logging

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError

log = logging.getLogger(__name__)

AUTH_KEY = "authorization"
CALLER_KEY = "cleave-caller"  # a router's identity on internal calls (per-caller reservation bounds)


class Undecodable:
    """What a lenient deserializer hands the handler for bytes that are not a valid message."""

    def __init__(self, type_name: str, error: Exception) -> None:
        self.message = f"the request is not a valid {type_name} message ({error})"


def _lenient(cls):
    def deserialize(data: bytes):
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError) as exc:
            return Undecodable(cls.DESCRIPTOR.full_name, exc)
    return deserialize


def _refusal(request, context, token: str | None, method: str) -> tuple[grpc.StatusCode, str] | None:
    if isinstance(request, Undecodable):
        log.info("%s: refused undecodable request from %s", method, context.peer())
        return grpc.StatusCode.INVALID_ARGUMENT, request.message
    if token:
        given = dict(context.invocation_metadata() or ()).get(AUTH_KEY, "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            log.warning("%s: refused a call without the internal token from %s", method, context.peer())
            return (grpc.StatusCode.UNAUTHENTICATED,
                    f"{method} is an internal API: the call needs the deployment's token "
                    f"(metadata '{AUTH_KEY}: Bearer <CLEAVE_INTERNAL_TOKEN>')")
    return None


def _guard(impl, method: str, streaming: bool, token: str | None):
    if streaming:
        async def stream_handler(request, context):
            refused = _refusal(request, context, token, method)
            if refused:
                await context.abort(*refused)
            async for item in impl(request, context):
                yield item
        return stream_handler

    async def unary_handler(request, context):
        refused = _refusal(request, context, token, method)
        if refused:
            await context.abort(*refused)
        return await impl(request, context)
    return unary_handler


_FACTORIES = {(False, False): grpc.unary_unary_rpc_method_handler,
              (False, True): grpc.unary_stream_rpc_method_handler}


def add_service(server: grpc.aio.Server, servicer, service: ServiceDescriptor, token: str | None = None) -> None:
    """Register ``servicer``'s methods for ``service`` on ``server`` (unary and server-streaming
    methods; raises ValueError for client-streaming ones, which Cleave has none of)."""
    handlers = {}
    for method in service.methods:
        kind = (method.client_streaming, method.server_streaming)
        if kind not in _FACTORIES:
            raise ValueError(f"{service.full_name}.{method.name}: client streaming is not supported")
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        impl = getattr(servicer, method.name)
        handlers[method.name] = _FACTORIES[kind](
            _guard(impl, f"{service.full_name}/{method.name}", method.server_streaming, token),
            request_deserializer=_lenient(request_cls),
            response_serializer=response_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


class _MetadataCall:
    """A multi-callable whose calls carry ``pairs`` besides the caller's own metadata."""

    def __init__(self, inner, pairs: tuple) -> None:
        self._inner, self._pairs = inner, pairs

    def __call__(self, request, *, metadata=None, **kwargs):
        return self._inner(request, metadata=(*(metadata or ()), *self._pairs), **kwargs)


class _MetadataChannel:
    """An asyncio channel whose calls all carry ``pairs`` (unary-request calls: the only kind the
    internal APIs have; client-streaming ones are refused); every other attribute is the
    wrapped channel's. Not a grpc.aio client interceptor: a stream interceptor runs an extra
    task and async generator per response message, a cost on every token a router relays."""

    def __init__(self, channel: grpc.aio.Channel, pairs: tuple) -> None:
        self._channel, self._pairs = channel, pairs

    def unary_unary(self, *args, **kwargs):
        return _MetadataCall(self._channel.unary_unary(*args, **kwargs), self._pairs)

    def unary_stream(self, *args, **kwargs):
        return _MetadataCall(self._channel.unary_stream(*args, **kwargs), self._pairs)

    def stream_unary(self, *args, **kwargs):
        raise NotImplementedError("internal APIs have no client-streaming methods (the token would not be sent)")

    stream_stream = stream_unary

    def __getattr__(self, name):
        return getattr(self._channel, name)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self._channel.close()


def internal_channel(address: str, token: str | None, options=(), caller: str = "") -> grpc.aio.Channel:
    """An asyncio channel to a worker API that sends ``token`` (none: no token) and the
    ``caller`` identity (``CALLER_KEY``; workers count reservations per caller) with every call."""
    pairs = token_metadata(token) + (((CALLER_KEY, caller),) if caller else ())
    channel = grpc.aio.insecure_channel(address, options=list(options))
    return _MetadataChannel(channel, pairs) if pairs else channel


def caller_of(context) -> str:
    """Who made a call: the identity it presents (``CALLER_KEY``), else ``host:<peer host>``."""
    given = dict(context.invocation_metadata() or ()).get(CALLER_KEY, "")
    return given[:128] if given else f"host:{context.peer().rpartition(':')[0]}"


class _SyncToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._pair = (AUTH_KEY, f"Bearer {token}")

    def _details(self, details):  # grpc's sync call details are a namedtuple
        return details._replace(metadata=[*(details.metadata or ()), self._pair])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)


def internal_sync_channel(address: str, token: str | None, options=()) -> grpc.Channel:
    """A blocking channel to a worker API that sends ``token`` with every call (tools, benches)."""
    channel = grpc.insecure_channel(address, options=list(options))
    return grpc.intercept_channel(channel, _SyncToken(token)) if token else channel


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Metadata for a synchronous call to an internal API (``stub.Method(req, metadata=...)``)."""
    return ((AUTH_KEY, f"Bearer {token}"),) if token else ()
