"""protos/inference: the committed code is fresh and the wire matches tritonclient's."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tritonclient.grpc.service_pb2 as triton_pb

from protos.inference import generate
from protos.inference import messages as pb

ROOT = Path(generate.__file__).resolve().parents[2]


def test_generated_code_is_fresh(tmp_path):
    written = generate.generate(tmp_path)
    assert len(written) == len(generate.GENERATED)
    for path in written:
        committed = ROOT / "protos" / "inference" / path.name
        assert committed.read_text() == path.read_text(), (
            f"{committed} is stale: run `python -m protos.inference.generate`"
        )


def test_generated_stubs_import_with_absolute_paths():
    # its own process: the generated module claims `inference.*` in protobuf's
    # default pool, which tritonclient (imported here) also claims
    code = ("import protos.inference.grpc_service_pb2_grpc as g, protos.inference.grpc_service_pb2 as p;"
            "print(g.GRPCInferenceServiceStub.__name__, p.DESCRIPTOR.package)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["GRPCInferenceServiceStub", "inference"]


def _fields(descriptor):
    return {f.name: (f.number, f.type, f.is_repeated,
                     f.message_type.full_name if f.message_type else None)
            for f in descriptor.fields}


MESSAGES = [
    "ServerLiveRequest", "ServerLiveResponse", "ServerReadyRequest", "ServerReadyResponse",
    "ModelReadyRequest", "ModelReadyResponse", "ServerMetadataRequest", "ServerMetadataResponse",
    "ModelMetadataRequest", "ModelMetadataResponse", "ModelMetadataResponse.TensorMetadata",
    "InferParameter", "InferTensorContents", "ModelInferRequest",
    "ModelInferRequest.InferInputTensor", "ModelInferRequest.InferRequestedOutputTensor",
    "ModelInferResponse", "ModelInferResponse.InferOutputTensor", "ModelStreamInferResponse",
]


@pytest.mark.parametrize("name", MESSAGES)
def test_message_matches_tritonclient(name):
    ours = pb.POOL.FindMessageTypeByName(f"inference.{name}")
    theirs = triton_pb.DESCRIPTOR.pool.FindMessageTypeByName(f"inference.{name}")
    assert _fields(ours) == _fields(theirs)


def test_service_methods_match_tritonclient():
    ours = pb.POOL.FindServiceByName(pb.SERVICE)
    theirs = triton_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in ours.methods:
        other = theirs.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == (
            other.input_type.full_name, other.output_type.full_name)
        assert (method.client_streaming, method.server_streaming) == (
            other.client_streaming, other.server_streaming)
    assert set(pb.METHODS) == {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
                               "ModelMetadata", "ModelInfer", "ModelStreamInfer"}


def test_reflection_pool_describes_oip_and_everything_else():
    """grpc reflection over messages.ReflectionPool: the OIP file from the private
    pool, other services (health here) from the default pool."""
    from concurrent import futures

    import grpc
    from google.protobuf import descriptor_pb2
    from grpc_health.v1 import health
    from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(2))
    reflection.enable_server_reflection([pb.SERVICE, health.SERVICE_NAME], server,
                                        pool=pb.ReflectionPool())
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            asks = [reflection_pb2.ServerReflectionRequest(file_containing_symbol=s)
                    for s in (pb.SERVICE, health.SERVICE_NAME, "inference.NoSuchThing")]
            replies = list(stub.ServerReflectionInfo(iter(asks)))
    finally:
        server.stop(0)
    files = [descriptor_pb2.FileDescriptorProto.FromString(r.file_descriptor_response.file_descriptor_proto[0])
             for r in replies[:2]]
    assert files[0].name == "protos/inference/grpc_service.proto"
    assert {m.name for m in files[0].service[0].method} == set(pb.METHODS)
    assert files[1].service[0].name == "Health"
    assert replies[2].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
