"""The Open Inference Protocol messages, in a private descriptor pool.

Why not `protos.inference.grpc_service_pb2`: protoc's Python code registers
every message in protobuf's process-wide default pool under its full name
(`inference.ModelInferRequest`, ...), and so does tritonclient's own
generated code. The published protocol fixes those names, so the two cannot
both load in one process: whichever comes second fails with "duplicate
symbol". A process that hosts the seqserve server and also uses tritonclient
(our tests, a gateway in front of Triton) is ordinary, so the server takes
its message classes from this private pool instead. They are wire-identical
(same descriptor, built from the same .proto by protos.inference.generate).

The generated grpc_service_pb2(_grpc) modules stay for Python clients that
want typed stubs and do not import tritonclient.
"""
from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from protos.inference.grpc_service_descriptor import FILE_DESCRIPTOR

PACKAGE = "inference"
SERVICE = "inference.GRPCInferenceService"

POOL = descriptor_pool.DescriptorPool()
POOL.Add(descriptor_pb2.FileDescriptorProto.FromString(FILE_DESCRIPTOR))


def _message(name: str):
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


ServerLiveRequest = _message("ServerLiveRequest")
ServerLiveResponse = _message("ServerLiveResponse")
ServerReadyRequest = _message("ServerReadyRequest")
ServerReadyResponse = _message("ServerReadyResponse")
ModelReadyRequest = _message("ModelReadyRequest")
ModelReadyResponse = _message("ModelReadyResponse")
ServerMetadataRequest = _message("ServerMetadataRequest")
ServerMetadataResponse = _message("ServerMetadataResponse")
ModelMetadataRequest = _message("ModelMetadataRequest")
ModelMetadataResponse = _message("ModelMetadataResponse")
InferParameter = _message("InferParameter")
InferTensorContents = _message("InferTensorContents")
ModelInferRequest = _message("ModelInferRequest")
ModelInferResponse = _message("ModelInferResponse")
ModelStreamInferResponse = _message("ModelStreamInferResponse")

# method name -> (request class, response class, client streams, server streams)
METHODS = {
    method.name: (
        message_factory.GetMessageClass(method.input_type),
        message_factory.GetMessageClass(method.output_type),
        method.client_streaming,
        method.server_streaming,
    )
    for method in POOL.FindServiceByName(SERVICE).methods
}


class ReflectionPool:
    """This file's private pool in front of protobuf's default pool.

    gRPC server reflection looks every symbol up in ONE pool; pass this one
    (`reflection.enable_server_reflection(names, server, pool=ReflectionPool())`)
    and `grpcurl describe inference.GRPCInferenceService` works while every
    other service still resolves from the default pool. It answers exactly
    the lookups grpc_reflection makes.
    """

    def __init__(self, fallback=None):
        self._pools = (POOL, fallback or descriptor_pool.Default())

    def _first(self, method: str, *args):
        for pool in self._pools:
            try:
                return getattr(pool, method)(*args)
            except KeyError:
                continue
        raise KeyError(args[0] if args else method)

    def FindFileByName(self, name):
        return self._first("FindFileByName", name)

    def FindFileContainingSymbol(self, symbol):
        return self._first("FindFileContainingSymbol", symbol)

    def FindMessageTypeByName(self, name):
        return self._first("FindMessageTypeByName", name)

    def FindExtensionByNumber(self, message_descriptor, number):
        return message_descriptor.file.pool.FindExtensionByNumber(message_descriptor, number)

    def FindAllExtensions(self, message_descriptor):
        return message_descriptor.file.pool.FindAllExtensions(message_descriptor)
