"""Prometheus metrics (served on --metrics-port).

Metric objects live at module level: one process, one set, whichever server
instances it starts (tests start several). Gauges that describe live state
(sessions, snapshot age) are read at scrape time from the attached server.
"""
from __future__ import annotations

import time
import weakref

import bisect
import threading

from prometheus_client import REGISTRY, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily


class FastCounter:
    """A labelled counter whose inc() is one add.

    prometheus_client's Counter takes a lock per increment (~0.7 us here, on
    every unary Step). Increments come from the event loop thread; the scrape
    thread reads the values. Exposed as NAME_total, labels sorted, as before.
    """

    def __init__(self, name: str, doc: str, labels):
        self.name, self.doc, self.labelnames = name, doc, list(labels)
        self.children: dict[tuple, "_Count"] = {}
        self._lock = threading.Lock()  # only for creating children

    def labels(self, *values: str) -> "_Count":
        child = self.children.get(values)
        if child is None:
            with self._lock:
                child = self.children.setdefault(values, _Count())
        return child

    def collect(self):
        fam = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        for values, child in list(self.children.items()):
            fam.add_metric(list(values), child.value)
        yield fam


class _Count:
    __slots__ = ("value",)

    def __init__(self):
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


REQUESTS = FastCounter("seqserve_requests", "RPCs (stream: steps) by method and status code",
                       ["method", "code"])
REGISTRY.register(REQUESTS)


class FastHistogram:
    """A labelled histogram whose observe() is a bisect and two adds.

    prometheus_client's Histogram takes a lock per observation (~3 us here);
    on a ~50 us step path that is worth avoiding. Observations come from the
    event loop thread; the scrape thread reads a consistent-enough copy.
    """

    def __init__(self, name: str, doc: str, label: str, buckets):
        self.name, self.doc, self.label = name, doc, label
        self.bounds = list(buckets)
        self.children: dict[str, "_Child"] = {}
        self._lock = threading.Lock()  # only for creating children

    def labels(self, value: str) -> "_Child":
        child = self.children.get(value)
        if child is None:
            with self._lock:
                child = self.children.setdefault(value, _Child(self.bounds))
        return child

    def collect(self):
        fam = HistogramMetricFamily(self.name, self.doc, labels=[self.label])
        for value, child in list(self.children.items()):
            counts, total = list(child.counts), child.sum
            cumulative, buckets = 0, []
            for bound, n in zip(self.bounds + [float("inf")], counts):
                cumulative += n
                buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
            fam.add_metric([value], buckets, total)
        yield fam


class _Child:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


STEP_LATENCY = FastHistogram(
    "seqserve_step_latency_seconds", "Server-side time per step request, arrival to reply",
    "method", (25e-6, 50e-6, 100e-6, 200e-6, 400e-6, 800e-6, 1.6e-3, 3.2e-3, 6.4e-3, 12.8e-3,
               25.6e-3, 51.2e-3, 0.1, 0.2, 0.5, 1.0))
BATCH_SIZE = FastHistogram("seqserve_batch_size", "Sessions per cell.step call", "model",
                           (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096))
REGISTRY.register(STEP_LATENCY)
REGISTRY.register(BATCH_SIZE)
EVICTIONS = Counter("seqserve_session_evictions_total", "Sessions freed for being idle", ["model"])

_requests: dict = {}
_latency: dict = {}


def observe_request(method: str, code: str) -> None:
    request_counter(method, code).inc()


def request_counter(method: str, code: str) -> "_Count":
    """The requests counter child of (method, code): `.inc()` on the hot path."""
    child = _requests.get((method, code))
    if child is None:
        child = _requests[(method, code)] = REQUESTS.labels(method, code)
    return child


def latency(method: str):
    """A bound histogram child: `.observe(seconds)` on the hot path."""
    child = _latency.get(method)
    if child is None:
        child = _latency[method] = STEP_LATENCY.labels(method)
    return child


class SessionObserver:
    """What the SessionManager reports: batch sizes and evictions."""

    def __init__(self):
        self._batch = {}

    def batch(self, model: str, size: int) -> None:
        self.batch_child(model).observe(size)

    def batch_child(self, model: str):
        """The model's batch-size histogram child (`.observe(size)`)."""
        child = self._batch.get(model)
        if child is None:
            child = self._batch[model] = BATCH_SIZE.labels(model)
        return child

    def evicted(self, model: str, n: int) -> None:
        EVICTIONS.labels(model).inc(n)


class _LiveCollector:
    """Live sessions per model and snapshot age, read at scrape time."""

    def __init__(self):
        self.server = None

    def collect(self):
        server = self.server() if self.server is not None else None
        live = GaugeMetricFamily("seqserve_live_sessions", "Live sessions", labels=["model"])
        age = GaugeMetricFamily("seqserve_snapshot_age_seconds",
                                "Seconds since the last session snapshot (-1: none yet)")
        if server is not None and server.sessions is not None:
            for name, ms in list(server.sessions.models.items()):
                live.add_metric([name], len(ms.table))
            last = server.last_snapshot
            age.add_metric([], time.time() - last if last else -1.0)
        yield live
        yield age


_COLLECTOR = _LiveCollector()
REGISTRY.register(_COLLECTOR)


def attach(server) -> None:
    """Report this server's live state (the last attached wins)."""
    _COLLECTOR.server = weakref.ref(server)


def start_http(port: int, host: str):
    """Serve /metrics; returns the HTTP server (call .shutdown() to stop) or None."""
    if not port:
        return None
    from prometheus_client import start_http_server

    httpd, _thread = start_http_server(port, addr=host)
    return httpd
