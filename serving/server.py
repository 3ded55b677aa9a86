"""The gRPC server: every service on one port, plus metrics and housekeeping.

Lifecycle (see `Server`):
  start()  listen at once with health NOT_SERVING; load and warm every model
           in a worker thread; restore snapshots; health SERVING
  run      sweep idle sessions; snapshot every --snapshot-s
  stop()   health NOT_SERVING; refuse new work (UNAVAILABLE); let queued
           steps finish; write the final snapshot; stop gRPC with a grace

Other protocols plug in through `serving.oip.add_to_server(server, registry,
sessions)` when that module exists; it returns the service names it added
(for reflection and health).
"""
from __future__ import annotations

import asyncio
import importlib
import logging
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving import bulk, metrics, native, wire
from serving.auth import AuthInterceptor, TokenTable
from serving.guard import Guarded
from serving.native import SERVICE, InferenceServicer
from serving.runtime import snapshot
from serving.runtime.registry import Registry
from serving.runtime.sessions import SessionManager
from serving.settings import Settings

log = logging.getLogger("seqserve.server")


class StartupFailed(RuntimeError):
    """The server cannot serve what the operator asked for (it exits non-zero)."""

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def tune_gc(gen0: int) -> None:
    """Keep Python's cycle collector off the step path once the models are loaded.

    Loading leaves ~170k long-lived objects (ONNX, Numba, the models); every
    full collection walks all of them, and with 256 busy streams the default
    thresholds ran one every ~20k steps: 640 ms of collection per 100k steps,
    ~6 us a step. gc.freeze() moves what exists now out of every future pass
    and a larger young generation makes passes rarer: 46 ms per 100k steps
    (measured with gc.callbacks in a live server, 256 streams). Reference
    counting still frees everything that is not a cycle at once; cycles wait
    a little longer.
    """
    import gc

    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0, gen1, gen2)
    log.info("garbage collector: %d objects frozen, young generation %d", gc.get_freeze_count(), gen0)


def model_health_name(model: str) -> str:
    """Health service name of one model: `seqserve.v1.Inference/NAME`."""
    return f"{SERVICE}/{model}"


def server_credentials(s: Settings) -> grpc.ServerCredentials:
    """TLS from --tls-cert/--tls-key; client certificates required with --tls-client-ca."""
    def read(path):
        with open(path, "rb") as f:
            return f.read()

    ca = read(s.tls_client_ca) if s.tls_client_ca else None
    return grpc.ssl_server_credentials([(read(s.tls_key), read(s.tls_cert))],
                                       root_certificates=ca, require_client_auth=ca is not None)


def _plugins() -> list:
    """Optional protocol modules that add themselves to the server."""
    found = []
    for name in ("serving.oip",):
        try:
            found.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
    return found


class Server:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.registry = Registry(repo=settings.repo)
        self.sessions = SessionManager(
            self.registry, max_sessions=settings.max_sessions, idle_s=settings.session_idle_s,
            max_steps=settings.max_steps_per_request, observer=metrics.SessionObserver(),
            max_per_tenant=settings.max_sessions_per_tenant, max_queue=settings.max_queue)
        self.health = health.aio.HealthServicer()
        self.grpc: grpc.aio.Server | None = None
        self.bulk = None  # the low-priority default executor, set in start()
        self.port = 0
        self.metrics_http = None
        self.last_snapshot = 0.0
        self.services = [SERVICE]
        self._tasks: list[asyncio.Task] = []
        self._stopped = asyncio.Event()
        self.ready = asyncio.Event()
        self.fatal: str = ""  # set when loading failed in a way that must stop the server
        self.failed = asyncio.Event()

    async def start(self) -> int:
        s = self.settings
        # model loading and big Predicts run below the event loop's priority (serving/bulk.py)
        self.bulk = bulk.install(asyncio.get_running_loop(), s.bulk_nice)
        opts = [("grpc.max_receive_message_length", s.max_message_bytes),
                ("grpc.max_send_message_length", s.max_message_bytes),
                ("grpc.so_reuseport", 0)]
        interceptors = []
        if s.auth_tokens:
            interceptors.append(AuthInterceptor(TokenTable(s.auth_tokens)))
        self.grpc = grpc.aio.server(options=opts, interceptors=interceptors,
                                    maximum_concurrent_rpcs=s.max_concurrent_rpcs or None)
        guarded = Guarded(self.grpc)  # unparsable unary requests: INVALID_ARGUMENT
        self.servicer = InferenceServicer(self.registry, self.sessions, s.max_predict_inflight)
        native.add_to_server(self.servicer, guarded)
        pool = None
        for plugin in _plugins():
            added = plugin.add_to_server(guarded, self.registry, self.sessions)
            self.services.extend(added or [])
            # a plugin whose messages live in a private descriptor pool hands
            # reflection a pool that can describe every service
            if hasattr(plugin, "reflection_pool"):
                pool = plugin.reflection_pool()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            self.services + [health.SERVICE_NAME, reflection.SERVICE_NAME], self.grpc, pool=pool)
        address = f"{s.host}:{s.port}"
        if s.tls_cert:
            self.port = self.grpc.add_secure_port(address, server_credentials(s))
        else:
            self.port = self.grpc.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot bind {s.host}:{s.port}")
        for name in ["", *self.services]:
            await self.health.set(name, NOT_SERVING)
        await self.grpc.start()
        self.metrics_http = metrics.start_http(s.metrics_port, s.host)
        metrics.attach(self)
        log.info("listening on %s:%d (models loading; event loop %s; streaming hot path %s)",
                 s.host, self.port, type(asyncio.get_running_loop()).__module__.split(".")[0],
                 wire.HOTPATH)
        self._tasks.append(asyncio.create_task(self._load()))
        return self.port

    async def _load(self) -> None:
        s = self.settings
        t0 = time.perf_counter()
        await asyncio.to_thread(self.registry.load_all, pins=s.pins(), device=s.device,
                                max_steps=s.max_steps_per_request)
        self.sessions.refresh()
        refused = self._refused_models()
        if refused:
            # a model the operator explicitly asked for (--device cuda, a
            # pinned version) that did not load must not look healthy: health
            # stays NOT_SERVING and serve() exits non-zero with this message
            self.fatal = "; ".join(f"model {n!r} not served: {why}" for n, why in refused.items())
            log.error("cannot serve what was asked for: %s", self.fatal)
            self.failed.set()
            return
        for m in self.registry:
            log.info("serving %s v%d: ONNX Runtime %s, cell %s", m.name, m.version,
                     m.ort.provider, m.cell_device or "none (cannot stream)")
        if s.state_dir:
            n = snapshot.restore_all(self.sessions, s.state_dir)
            log.info("restored %d sessions from %s", n, s.state_dir)
            self.last_snapshot = time.time()
        for name in ["", *self.services]:
            await self.health.set(name, SERVING)
        for m in self.registry:
            await self.health.set(model_health_name(m.name), SERVING)
        log.info("ready: %d models in %.1f s", len(self.registry), time.perf_counter() - t0)
        if s.gc_gen0:
            tune_gc(s.gc_gen0)
        self.ready.set()
        self._tasks.append(asyncio.create_task(self._housekeeping()))

    def _refused_models(self) -> dict[str, str]:
        """Failed models the operator asked for by name or by device."""
        s = self.settings
        pins = s.pins()
        return {n: why for n, why in self.registry.failed.items()
                if s.device == "cuda" or n in pins}

    async def _housekeeping(self) -> None:
        s = self.settings
        tick = max(0.05, min(s.session_idle_s / 4, 5.0, s.snapshot_s or 5.0))
        next_snapshot = time.monotonic() + (s.snapshot_s or float("inf"))
        while True:
            await asyncio.sleep(tick)
            try:
                self.sessions.sweep()
                if s.state_dir and s.snapshot_s and time.monotonic() >= next_snapshot:
                    self.write_snapshot()
                    next_snapshot = time.monotonic() + s.snapshot_s
            except Exception:  # noqa: BLE001 - housekeeping must outlive a bad tick
                log.exception("housekeeping failed")

    def write_snapshot(self) -> int:
        n = snapshot.write_all(self.sessions, self.settings.state_dir)
        self.last_snapshot = time.time()
        return n

    async def stop(self) -> None:
        """Graceful: refuse new work, finish queued steps, snapshot, stop."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        await self.health.enter_graceful_shutdown()
        self.sessions.close()
        await self.sessions.drain()
        for t in self._tasks:
            t.cancel()
        if self.settings.state_dir and self.ready.is_set():
            n = self.write_snapshot()
            log.info("wrote %d sessions to %s", n, self.settings.state_dir)
        if self.grpc is not None:
            await self.grpc.stop(self.settings.grace_s)
        if self.metrics_http is not None:
            self.metrics_http.shutdown()
            self.metrics_http.server_close()
        log.info("stopped")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def until(self, event: asyncio.Event) -> None:
        """Wait for `event` or for loading to fail; a failure stops the server and
        raises StartupFailed with the reason."""
        waits = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(self.failed.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        if self.fatal:
            await self.stop()
            raise StartupFailed(self.fatal)


async def serve(settings: Settings, stop_signals: bool = True) -> None:
    """Run a server until SIGTERM/SIGINT, then stop it gracefully."""
    import signal

    server = Server(settings)
    await server.start()
    stop = asyncio.Event()
    if stop_signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    await server.until(stop)  # raises StartupFailed if loading failed
    log.info("signal received: shutting down")
    await server.stop()
