"""Bearer-token authentication: tokens name tenants; sessions are per tenant.

`--auth-tokens FILE` is a JSON object {"TOKEN": "TENANT", ...}. Clients send
`authorization: Bearer TOKEN` metadata. The file is re-read when its
modification time changes (checked at most once a second), so tokens can be
added or revoked without a restart; a file that fails to parse on reload is
logged and the previous table kept.

The interceptor wraps every method handler except the open ones (health,
reflection, and OIP's ServerLive/ServerReady, which orchestrators probe
without credentials): the wrapper checks the token (UNAUTHENTICATED if
missing or unknown) and puts the tenant in a context variable that
`tenant_of(context)` reads, so both protocols see the same tenant. Without
--auth-tokens there is no interceptor and every caller is tenant "".
"""
from __future__ import annotations

import contextvars
import inspect
import json
import logging
import os
import time

import grpc


log = logging.getLogger("seqserve.auth")

HEADER = "authorization"
OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
)
_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("seqserve_tenant", default="")
_DENIED = "missing or unknown bearer token: send metadata 'authorization: Bearer TOKEN'"


def tenant_of(context) -> str:
    """The caller's tenant ("" when authentication is off)."""
    return _tenant.get()


def _read(path: str) -> dict[str, str]:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not all(
            isinstance(k, str) and k and isinstance(v, str) and v for k, v in data.items()):
        raise ValueError(f"{path}: must be a JSON object of non-empty \"TOKEN\": \"TENANT\" strings")
    return dict(data)


class TokenTable:
    """Tokens -> tenants from a file, re-read when the file changes."""

    def __init__(self, path: str, check_every_s: float = 1.0):
        self.path = path
        self.check_every_s = check_every_s
        self.tokens = _read(path)  # a bad file at start is the operator's error: raise
        self.mtime = os.stat(path).st_mtime_ns
        self.next_check = time.monotonic() + check_every_s
        log.info("auth: %d tokens, %d tenants from %s", len(self.tokens),
                 len(set(self.tokens.values())), path)

    def tenant(self, token: str | None) -> str | None:
        now = time.monotonic()
        if now >= self.next_check:
            self.next_check = now + self.check_every_s
            self._maybe_reload()
        return self.tokens.get(token) if token else None

    def _maybe_reload(self) -> None:
        try:
            mtime = os.stat(self.path).st_mtime_ns
            if mtime == self.mtime:
                return
            self.tokens = _read(self.path)
            self.mtime = mtime
            log.info("auth: reloaded %d tokens from %s", len(self.tokens), self.path)
        except Exception as exc:  # noqa: BLE001 - keep serving with the last good table
            log.error("auth: cannot reload %s, keeping the previous tokens: %s", self.path, exc)


def token_of(metadata) -> str | None:
    for key, value in metadata or ():
        if key == HEADER:
            scheme, _, token = str(value).partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, table: TokenTable):
        self.table = table

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        return _wrap(handler, self.table)


def _wrap(handler, table: TokenTable):
    """The same handler, run only for a known token, with the tenant set."""

    async def admit(context) -> None:
        tenant = table.tenant(token_of(context.invocation_metadata()))
        if tenant is None:
            from serving import metrics

            metrics.observe_request("auth", "UNAUTHENTICATED")
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)
        _tenant.set(tenant)

    def unary_response(fn):
        async def run(request, context):
            await admit(context)
            return await fn(request, context)
        return run

    def streaming_response(fn):
        if inspect.isasyncgenfunction(fn):
            async def gen(request, context):
                await admit(context)
                async for reply in fn(request, context):
                    yield reply
            return gen

        async def run(request, context):  # a handler that writes with context.write
            await admit(context)
            return await fn(request, context)
        return run

    kw = dict(request_deserializer=handler.request_deserializer,
              response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary_response(handler.unary_unary), **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming_response(handler.unary_stream), **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary_response(handler.stream_unary), **kw)
    return grpc.stream_stream_rpc_method_handler(streaming_response(handler.stream_stream), **kw)


def check_token_file(path: str) -> None:
    """Raise ValueError naming the problem if the token file is unusable."""
    try:
        _read(path)
    except OSError as exc:
        raise ValueError(f"--auth-tokens {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"--auth-tokens {path}: not JSON ({exc})") from None
