"""The Open Inference Protocol (KServe v2) servicer, with Triton's sequences.

`inference.GRPCInferenceService` on the same server and port as the native
API, so existing tritonclient / KServe tooling works unchanged:
  ModelInfer without a sequence_id      stateless: ONNX Runtime on the whole
                                        sequence, optional h0/c0 in, hn/cn out
  ModelInfer with sequence_id (+ start/end flags in parameters)
                                        one step (or chunk) of that session,
                                        through the SAME SessionManager as the
                                        native Step/StreamSteps: a session
                                        started on one protocol continues on
                                        the other
  ModelStreamInfer                      the same per message; a failed request
                                        answers error_message and the stream
                                        stays open (as Triton does)

A sequence request carries x as (1, T, F) floats or (1, T) token ids (T >= 1
steps), answers y (1, T, out) and the response parameter `sequence_position`
(steps taken so far); the state stays on the server, so h0/c0 in and hn/cn
out are refused there. As in Triton, a sequence belongs to no stream: it
lives until sequence_end, until it idles out, or until a START restarts it.

The servicer is thin: codec (serving.oip_codec) -> runtime -> codec. Message
classes come from protos.inference.messages (a private descriptor pool, so
this module can share a process with tritonclient).
"""
from __future__ import annotations

import asyncio
import logging
import time

import grpc
import numpy as np

import seqserve
from protos.inference import messages as pb
from serving import errors, metrics
from serving import oip_codec as codec
from serving.errors import FailedPrecondition, InvalidArgument, ServingError
from serving.native import deadline_of, tenant_of
from serving.runtime.sessions import session_key

log = logging.getLogger("seqserve.oip")

PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ("sequence",)
STREAM_METHOD = "oip.ModelStreamInfer"
STREAM_IN_FLIGHT = 1024
"""Requests one ModelStreamInfer stream may have in progress before we stop reading it."""


def _version(text: str) -> int | None:
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise InvalidArgument(f"model_version must be a positive integer or empty, got {text!r}")
    return int(text)


def _tagged(request, message: str) -> str:
    # Triton prefixes errors with the request id: a stream client gets only the
    # text in its callback, and this is how it tells which request failed.
    return f"[request id: {request.id}] {message}" if request.id else message


class InferenceServicer:
    """GRPCInferenceService over a Registry and a SessionManager."""

    def __init__(self, registry, sessions):
        self.registry = registry
        self.sessions = sessions
        self._infer_latency = metrics.latency("oip.ModelInfer")
        self._stream_latency = metrics.latency(STREAM_METHOD)

    # ---- health and metadata ---------------------------------------------------

    @errors.unary("oip.ServerLive")
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @errors.unary("oip.ServerReady")
    async def ServerReady(self, request, context):
        # as the health service: ready once the repository is loaded, until shutdown
        return pb.ServerReadyResponse(ready=self.registry.ready and not self.sessions.closing)

    @errors.unary("oip.ModelReady")
    async def ModelReady(self, request, context):
        try:
            self.registry.get(request.name, _version(request.version))
        except ServingError:  # unknown, wrong version, still loading
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=not self.sessions.closing)

    @errors.unary("oip.ServerMetadata")
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="seqserve", version=seqserve.__version__,
                                         extensions=list(EXTENSIONS))

    @errors.unary("oip.ModelMetadata")
    async def ModelMetadata(self, request, context):
        model = self.registry.get(request.name, _version(request.version))
        inputs, outputs = codec.model_specs(model.info)
        reply = pb.ModelMetadataResponse(name=model.name, versions=[str(model.version)],
                                         platform=PLATFORM)
        for spec in inputs:
            reply.inputs.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
        for spec in outputs:
            reply.outputs.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
        return reply

    # ---- inference ----------------------------------------------------------------

    @errors.unary("oip.ModelInfer")
    async def ModelInfer(self, request, context):
        t0 = time.perf_counter()
        reply = await self._infer(request, tenant_of(context), deadline_of(context))
        self._infer_latency.observe(time.perf_counter() - t0)
        return reply

    @errors.unary(STREAM_METHOD)  # a coroutine that writes, so the unary decorator fits
    async def ModelStreamInfer(self, request_iterator, context):
        """Requests run concurrently as they arrive; replies go out as they finish.

        Each request becomes a task, created in arrival order; a task reaches
        the SessionManager (which admits steps synchronously, in call order)
        before the next task starts, so a sequence's steps keep stream order
        while steps of different sequences batch together. Tasks write their
        reply themselves (one write at a time): no queue hop on the way out.
        """
        tenant = tenant_of(context)
        slots = asyncio.Semaphore(STREAM_IN_FLIGHT)
        write = asyncio.Lock()  # gRPC takes one outstanding write per call
        tasks: set[asyncio.Task] = set()

        async def answer(request):
            t0 = time.perf_counter()
            try:
                reply = pb.ModelStreamInferResponse(infer_response=await self._infer(request, tenant))
                metrics.observe_request(STREAM_METHOD, "OK")
                self._stream_latency.observe(time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001 - one bad request never ends the stream
                code, message = errors.classify(exc, STREAM_METHOD)
                metrics.observe_request(STREAM_METHOD, code)
                reply = pb.ModelStreamInferResponse(error_message=_tagged(request, message))
                reply.infer_response.id = request.id
                reply.infer_response.model_name = request.model_name
                reply.infer_response.model_version = request.model_version
            try:
                async with write:
                    await context.write(reply)
            except Exception as exc:  # noqa: BLE001 - the client has gone; nothing to tell
                log.debug("stream reply not delivered: %s", exc)
            finally:
                slots.release()

        try:
            async for request in request_iterator:
                await slots.acquire()  # back-pressure: stop reading when full
                task = asyncio.create_task(answer(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:  # the client half-closed: finish what it sent
                await asyncio.wait(set(tasks))
        finally:
            # the client went away (or we failed): nothing of this stream runs on
            for task in list(tasks):
                task.cancel()

    async def _infer(self, request, tenant: str, deadline: float | None = None):
        """One ModelInferRequest -> ModelInferResponse (raises ServingError).

        deadline: the unary caller's (time.monotonic()); queued steps whose
        caller has gone are dropped before they run.
        """
        model = self.registry.get(request.model_name, _version(request.model_version))
        control = codec.sequence_control(request)
        response = pb.ModelInferResponse(model_name=model.name, model_version=str(model.version),
                                         id=request.id)
        if control.sequence_id is None:
            outputs, names = await self._predict(model, request)
        else:
            outputs, names = await self._step(model, request, control, response, tenant,
                                              deadline)
        return codec.encode_response(response, outputs, names)

    async def _predict(self, model, request):
        inputs = codec.model_inputs(model.name, model.info, request)
        _, specs = codec.model_specs(model.info)
        names = codec.requested_outputs(model.name, request, [s.name for s in specs])
        args = inputs["x"], inputs.get("h0"), inputs.get("c0")
        if model.ort.runs_inline(inputs["x"]):
            outputs = model.ort.predict(*args)
        else:  # big work would hold up every stream on the event loop (see OrtModel.runs_inline)
            outputs = await asyncio.to_thread(model.ort.predict, *args)
        return outputs, names

    async def _step(self, model, request, control, response, tenant, deadline=None):
        if model.cell is None:
            raise FailedPrecondition(
                f"model '{model.name}' reads sequences both ways and cannot keep a sequence; "
                f"send the whole sequence without sequence_id")
        names = codec.requested_outputs(
            model.name, request, ["y"])  # hn/cn stay on the server with the session
        step = codec.one_float_step(request, model.info)  # (1, F), already checked, or None
        checked = step is not None
        if not checked:
            step = self._sequence_input(model, request)  # (T, F) | (T,)
        sid = control.sequence_id
        if not control.start:
            ms = self.sessions.model_sessions(model.name, model.version)
            if session_key(sid, tenant) not in ms.table:
                raise InvalidArgument(
                    f"inference request for sequence {sid} to model '{model.name}' must specify "
                    f"the START flag on the first request of the sequence (set sequence_start; "
                    f"the sequence may also have ended or expired)")
        y, position = await self.sessions.step_with_position(
            model.name, model.version, sid, step, start=control.start, end=control.end,
            tenant=tenant, checked=checked, expect=_expected_position(request),
            deadline=deadline)
        response.parameters["sequence_position"].int64_param = position
        return {"y": np.asarray(y)[None]}, names  # (1, T, out)

    @staticmethod
    def _sequence_input(model, request) -> np.ndarray:
        """x of a sequence request, checked: (1, T, F) -> (T, F), (1, T) -> (T,)."""
        inputs = codec.model_inputs(model.name, model.info, request)
        extra = sorted(set(inputs) - {"x"})
        if extra:
            raise InvalidArgument(
                f"input {', '.join(extra)} is not accepted with a sequence_id: the server keeps "
                f"the sequence's state (sequence_start begins it from zeros)")
        x = inputs["x"]
        if x.shape[0] != 1:
            raise InvalidArgument(
                f"a sequence request carries one sequence: input 'x' must have batch 1 "
                f"(shape [1, time{', features' if x.ndim == 3 else ''}]), got batch {x.shape[0]}")
        return x[0]


def _expected_position(request) -> int | None:
    """The exactly-once contract's `sequence_position` request parameter: the
    number of steps the client believes the sequence has taken before this
    request (see serving/README.md, "Exactly-once steps")."""
    if "sequence_position" not in request.parameters:
        return None
    p = request.parameters["sequence_position"]
    kind = p.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidArgument(
            f"parameter sequence_position must be an integer (int64_param), got {kind or 'nothing'}")
    return int(getattr(p, kind))


def add_to_server(server, registry, sessions) -> list[str]:
    """Serve inference.GRPCInferenceService on SERVER (grpc.aio) next to the native API.

    Returns the service names added (the server lists them in health).
    """
    servicer = InferenceServicer(registry, sessions)
    handlers = {}
    for name, (request_cls, response_cls, client_streams, server_streams) in pb.METHODS.items():
        make = (grpc.stream_stream_rpc_method_handler if client_streams and server_streams
                else grpc.unary_unary_rpc_method_handler)
        handlers[name] = make(getattr(servicer, name),
                              request_deserializer=request_cls.FromString,
                              response_serializer=response_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(pb.SERVICE, handlers),))
    if hasattr(server, "add_registered_method_handlers"):  # grpcio >= 1.62: faster dispatch
        server.add_registered_method_handlers(pb.SERVICE, handlers)
    return [pb.SERVICE]


def reflection_pool():
    """The descriptor pool for server reflection when this protocol is served.

    The OIP messages live in a private pool (see protos.inference.messages), so
    reflection over the default pool lists inference.GRPCInferenceService but
    cannot describe it; this pool answers for both.
    """
    return pb.ReflectionPool()
