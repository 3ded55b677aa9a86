"""Domain errors and the one place where they become gRPC statuses.

Runtime code raises these without importing grpc: each carries the NAME of
its status code. The decorators `unary` and `stream` wrap servicer methods:
a ServingError becomes `context.abort(code, message)`; anything unexpected
becomes INTERNAL with a log line, so no request can kill the server.
"""
from __future__ import annotations

import functools
import logging

log = logging.getLogger("seqserve.errors")


class ServingError(Exception):
    """An error meant for the caller; `code` is a grpc.StatusCode name."""

    code = "UNKNOWN"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class InvalidArgument(ServingError):
    code = "INVALID_ARGUMENT"


class NotFound(ServingError):
    code = "NOT_FOUND"


class FailedPrecondition(ServingError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(ServingError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(ServingError):
    code = "UNAVAILABLE"


class Aborted(ServingError):
    code = "ABORTED"


class PositionMismatch(Aborted):
    """A step that carried the session position it expected, and it was wrong.

    `position` is the session's actual position (steps taken), so a client
    can resynchronise; it also travels in trailing metadata
    (POSITION_METADATA) and in StepResponse.position inside streams.
    """

    def __init__(self, message: str, position: int):
        super().__init__(message)
        self.position = int(position)


class DeadlineExceeded(ServingError):
    code = "DEADLINE_EXCEEDED"


class Unauthenticated(ServingError):
    code = "UNAUTHENTICATED"


class Internal(ServingError):
    code = "INTERNAL"


POSITION_METADATA = "seqserve-position"


def trailing(exc: BaseException) -> tuple:
    """Trailing metadata for an error: the actual position of a mismatched step."""
    pos = getattr(exc, "position", None)
    return ((POSITION_METADATA, str(pos)),) if pos is not None else ()


def status_code(code: str):
    """grpc.StatusCode for a code name (grpc imported here, not at module top)."""
    import grpc

    return grpc.StatusCode[code]


def status_number(code: str) -> int:
    """The wire number of a status code name (OK=0, INVALID_ARGUMENT=3, ...)."""
    return status_code(code).value[0]


def classify(exc: BaseException, where: str) -> tuple[str, str]:
    """(code name, message) for any exception; logs the unexpected ones."""
    if isinstance(exc, ServingError):
        return exc.code, exc.message
    if type(exc).__name__ == "DecodeError":  # a stream message that is not the message type
        return "INVALID_ARGUMENT", f"{where}: a request message could not be parsed ({exc})"
    log.exception("unexpected error in %s", where, exc_info=exc)
    return "INTERNAL", f"internal error in {where}: {type(exc).__name__}: {exc}"


_metrics = None


def _observe(method: str, code: str) -> None:
    # imported on first use: runtime code imports this module without metrics
    global _metrics
    if _metrics is None:
        from serving import metrics as _m

        _metrics = _m
    _metrics.observe_request(method, code)


def unary(method: str):
    """Decorator for unary-unary async servicer methods."""

    def wrap(fn):
        from grpc.aio import AbortError

        @functools.wraps(fn)
        async def handler(self, request, context):
            try:
                reply = await fn(self, request, context)
            except AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - the point of this decorator
                code, message = classify(exc, method)
                _observe(method, code)
                await context.abort(status_code(code), message, trailing(exc))
            _observe(method, "OK")
            return reply

        return handler

    return wrap


def stream(method: str):
    """Decorator for stream-stream async generator servicer methods.

    Errors the generator raises end the stream with their status; per-message
    errors that must not end it are the servicer's own business.
    """

    def wrap(fn):
        from grpc.aio import AbortError

        @functools.wraps(fn)
        async def handler(self, request_iterator, context):
            try:
                async for reply in fn(self, request_iterator, context):
                    yield reply
            except AbortError:
                raise
            except Exception as exc:  # noqa: BLE001
                await end_stream(context, exc, method)
            _observe(method, "OK")

        return handler

    return wrap


async def end_stream(context, exc: BaseException, method: str) -> None:
    """End a stream with exc's status (what @stream does; for generators that
    handle their errors inline to save the decorator's layer per message)."""
    code, message = classify(exc, method)
    _observe(method, code)
    await context.abort(status_code(code), message)


def stream_ok(method: str) -> None:
    """Count a stream that ended normally (what @stream does after the last reply)."""
    _observe(method, "OK")
