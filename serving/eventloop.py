"""Which asyncio event loop the server runs on: uvloop when installed.

grpc.aio hands every message to the event loop (a callback, a task resume, a
future), so the loop's own per-callback cost is part of every step. uvloop
(libuv, in Cython) does that bookkeeping for less than the pure-Python
asyncio loop; `seqserve bench serve` runs its echo floor on the same loop
as the server, so the comparison stays like for like.

  --loop auto      uvloop if it can be imported, else asyncio (the default)
  --loop uvloop    uvloop, or an error naming the missing package
  --loop asyncio   the standard library's loop
"""
from __future__ import annotations

import asyncio

CHOICES = ("auto", "uvloop", "asyncio")


def resolve(kind: str) -> str:
    """The loop `kind` means here: "uvloop" or "asyncio"."""
    if kind not in CHOICES:
        raise ValueError(f"--loop must be one of {', '.join(CHOICES)}, got {kind!r}")
    if kind == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if kind == "uvloop":
            raise ValueError("--loop uvloop: the uvloop package is not installed "
                             "(pip install uvloop, or use --loop asyncio)") from None
        return "asyncio"
    return "uvloop"


def run(coro, kind: str = "auto"):
    """asyncio.run(coro) on the loop `kind` resolves to."""
    if resolve(kind) == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)
