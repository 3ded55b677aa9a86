"""Request bytes that are not the method's message get INVALID_ARGUMENT, not UNKNOWN.

gRPC parses a unary request before any servicer code runs; when parsing
fails it answers UNKNOWN ("Unexpected DecodeError") and logs a traceback.
`Guarded(server)` is the server as handler-registering code sees it (the
native servicer and protocol plugins alike): every unary-request handler
gets a parser that never raises, and a behaviour that answers a message it
could not parse with INVALID_ARGUMENT naming the message type. For a
streaming request handled by a coroutine (OIP's ModelStreamInfer, which runs
requests as tasks) the servicer sees the stream end just before the bad
message; once it has answered what came before (its in-flight work ends
cleanly, as on a half-close), the call ends with INVALID_ARGUMENT. A
generator servicer meets the parse error in its own loop instead, where
serving.errors turns it into INVALID_ARGUMENT.
"""
from __future__ import annotations

import grpc


class _Unparsable:
    __slots__ = ("error",)

    def __init__(self, error: Exception):
        self.error = error


def _safe(parse):
    def run(data: bytes):
        try:
            return parse(data)
        except Exception as exc:  # noqa: BLE001 - answered by the behaviour below
            return _Unparsable(exc)
    return run


def _checked(fn, kind: str, what: str):
    async def unary(request, context):
        if type(request) is _Unparsable:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request is not a valid {what} message ({request.error})")
        return await fn(request, context)

    async def streaming(request, context):
        if type(request) is _Unparsable:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request is not a valid {what} message ({request.error})")
        async for reply in fn(request, context):
            yield reply

    return unary if kind == "unary_unary" else streaming


async def _until_unparsable(requests, bad: list):
    async for message in requests:
        if type(message) is _Unparsable:
            bad.append(message)
            return
        yield message


def _checked_stream(fn, what: str):
    async def abort(context, bad):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"a stream message is not a valid {what} message ({bad[0].error}); "
                            f"the messages before it were answered")

    if _is_async_gen(fn):
        async def gen(requests, context):
            bad: list = []
            async for reply in fn(_until_unparsable(requests, bad), context):
                yield reply
            if bad:
                await abort(context, bad)
        return gen

    async def run(requests, context):
        bad: list = []
        result = await fn(_until_unparsable(requests, bad), context)
        if bad:
            await abort(context, bad)
        return result
    return run


def guard(handlers: dict) -> dict:
    """The same method handlers, requests parsed without raising."""
    out = {}
    for name, h in handlers.items():
        parse = h.request_deserializer
        behaviour = h.unary_unary or h.unary_stream or h.stream_unary or h.stream_stream
        if parse is None or (
                h.response_streaming and not h.request_streaming and not _is_async_gen(behaviour)):
            # no deserializer: the servicer gets the bytes as they came (serving.wire)
            # and parses and answers bad bytes itself
            out[name] = h
            continue
        if h.request_streaming and _is_async_gen(behaviour):
            # a generator servicer (native StreamSteps) meets the parse error in its
            # own loop, after answering what came before; serving.errors makes it
            # INVALID_ARGUMENT. Left alone: no extra layer on the hot path.
            out[name] = h
            continue
        what = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
        what = what.full_name if what is not None else name
        kw = dict(request_deserializer=_safe(parse), response_serializer=h.response_serializer)
        if h.stream_stream is not None:
            out[name] = grpc.stream_stream_rpc_method_handler(
                _checked_stream(h.stream_stream, what), **kw)
        elif h.stream_unary is not None:
            out[name] = grpc.stream_unary_rpc_method_handler(
                _checked_stream(h.stream_unary, what), **kw)
        elif h.unary_unary is not None:
            out[name] = grpc.unary_unary_rpc_method_handler(
                _checked(h.unary_unary, "unary_unary", what), **kw)
        else:
            out[name] = grpc.unary_stream_rpc_method_handler(
                _checked(h.unary_stream, "unary_stream", what), **kw)
    return out


def _is_async_gen(fn) -> bool:
    import inspect

    return inspect.isasyncgenfunction(fn)


class Guarded:
    """Proxy of a grpc.aio.Server whose handler registrations go through guard()."""

    def __init__(self, server):
        self._server = server

    def __getattr__(self, name):
        return getattr(self._server, name)

    def add_generic_rpc_handlers(self, handlers) -> None:
        out = []
        for h in handlers:
            table = getattr(h, "_method_handlers", None)
            if isinstance(table, dict):
                prefix = f"/{h.service_name()}/"
                short = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in table.items()}
                h = grpc.method_handlers_generic_handler(h.service_name(), guard(short))
            out.append(h)
        self._server.add_generic_rpc_handlers(tuple(out))

    def add_registered_method_handlers(self, service, handlers) -> None:
        self._server.add_registered_method_handlers(service, guard(handlers))
