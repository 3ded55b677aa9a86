"""Health, reflection and the Prometheus endpoint of a real server."""
import re
import urllib.request

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serving.client import Client


def test_health_overall_service_and_per_model(server):
    stub = health_pb2_grpc.HealthStub(server.channel)
    for name in ("", "seqserve.v1.Inference", "seqserve.v1.Inference/lstm", "seqserve.v1.Inference/bi"):
        r = stub.Check(health_pb2.HealthCheckRequest(service=name))
        assert r.status == health_pb2.HealthCheckResponse.SERVING, name
    try:
        stub.Check(health_pb2.HealthCheckRequest(service="seqserve.v1.Inference/nope"))
        raise AssertionError("unknown service should be NOT_FOUND")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_service(server):
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    replies = list(stub.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="seqserve.v1.Inference"),
    ])))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"seqserve.v1.Inference", "grpc.health.v1.Health"} <= names
    from google.protobuf import descriptor_pb2

    fd = descriptor_pb2.FileDescriptorProto.FromString(
        replies[1].file_descriptor_response.file_descriptor_proto[0])
    methods = {m.name for m in fd.service[0].method}
    assert {"Predict", "Step", "StreamSteps", "Rollout", "EndSession"} <= methods


def test_not_serving_until_models_load_then_unavailable_on_shutdown(model_repo, kit):
    """While loading, health says NOT_SERVING and calls are UNAVAILABLE."""
    import asyncio
    import threading

    from serving.server import Server
    from serving.settings import Settings

    loop = asyncio.new_event_loop()
    server = Server(Settings(repo=str(model_repo), port=0, metrics_port=0))
    gate = threading.Event()
    real = server.registry.load_all

    def slow_load(**kw):
        gate.wait(30)
        real(**kw)

    server.registry.load_all = slow_load
    port = loop.run_until_complete(server.start())
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(ch)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    cl = Client(channel=ch)
    try:
        cl.step("lstm", 1, [0.0, 0.0, 0.0], start=True)
        raise AssertionError("should be UNAVAILABLE while loading")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAVAILABLE and "loading" in e.details()
    gate.set()
    asyncio.run_coroutine_threadsafe(server.ready.wait(), loop).result(300)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    cl.step("lstm", 1, [0.0, 0.0, 0.0], start=True)
    server.sessions.close()  # what stop() does first
    try:
        cl.step("lstm", 1, [0.0, 0.0, 0.0])
        raise AssertionError("should be UNAVAILABLE while shutting down")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in e.details()
    ch.close()
    asyncio.run_coroutine_threadsafe(server.stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    t.join(5)


def test_metrics_endpoint_reports_requests_latency_sessions(model_repo, kit):
    port = kit.free_port()
    running = kit.start_server(repo=str(model_repo), metrics_port=port)
    def scrape():
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()

    def count(text, code):  # metrics are per process: other tests' calls count too
        m = re.search(r'^seqserve_requests_total\{code="%s",method="Step"\} (\S+)$' % code, text, re.M)
        return float(m.group(1)) if m else 0.0

    try:
        before = scrape()
        cl = Client(running.target)
        for i in range(5):  # a start, a first plain step (parsed), three met before (bytes path)
            cl.step("gru", "m", np.zeros(3, np.float32), start=(i == 0))
        try:
            cl.step("nope", "m", np.zeros(3, np.float32))
        except grpc.RpcError:
            pass
        text = scrape()
        assert count(text, "OK") - count(before, "OK") == 5
        assert count(text, "NOT_FOUND") - count(before, "NOT_FOUND") == 1
        assert 'seqserve_step_latency_seconds_count{method="Step"}' in text
        assert 'seqserve_live_sessions{model="gru"} 1.0' in text
        assert "seqserve_batch_size_bucket" in text and "seqserve_snapshot_age_seconds" in text
        cl.close()
    finally:
        running.stop()
