"""The native service, seqserve.v1.Inference: thin message <-> runtime glue.

Each method converts the request, calls the registry / session manager, and
converts back; errors become statuses in serving.errors' decorators. In
StreamSteps a failed step comes back as that step's `code`/`error` and the
stream goes on, so one bad device behind a gateway does not cut the others.
"""
from __future__ import annotations

import asyncio
import json
import time
from math import isfinite

import grpc
import numpy as np
from grpc.aio import AbortError

from protos.seqserve.v1 import inference_pb2 as pb
from protos.seqserve.v1 import inference_pb2_grpc as pb_grpc
from serving import auth, errors, metrics
from serving.errors import InvalidArgument
from serving.runtime.registry import Registry
from serving.runtime.sessions import BATCH_WINDOW_S, SessionManager, queue_item
from serving.tensors import from_array, step_input, to_array
from serving.wire import (ReplyEncoder, StepIndex, parse_request, plain_steps, step_handler,
                          stream_steps_handler)

SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name

_OK = 0


def add_to_server(servicer: "InferenceServicer", server) -> None:
    """The generated registration, with StreamSteps taking bytes and both StreamSteps and
    Step answering bytes where they wrote the reply themselves (serving.wire)."""

    class _Capture:  # what the generated add_*_to_server hands a server
        def add_generic_rpc_handlers(self, handlers):
            pass

        def add_registered_method_handlers(self, service, handlers):
            self.handlers = dict(handlers)

    cap = _Capture()
    pb_grpc.add_InferenceServicer_to_server(servicer, cap)
    handlers = cap.handlers
    handlers["StreamSteps"] = stream_steps_handler(servicer.StreamSteps)
    handlers["Step"] = step_handler(servicer.Step)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def sequence_of(request):
    """The request's sequence_id (int) or sequence_key (str); None if unset."""
    which = request.WhichOneof("sequence")
    return getattr(request, which) if which else None


def tenant_of(context) -> str:
    """Tenant of the caller ("" without --auth-tokens); see serving.auth."""
    return auth.tenant_of(context)


def deadline_of(context) -> float | None:
    """The caller's deadline on time.monotonic()'s clock, or None."""
    left = context.time_remaining()
    return None if left is None else time.monotonic() + left


def expected_of(s) -> int | None:
    return s.expected_position if s.HasField("expected_position") else None


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, registry: Registry, sessions: SessionManager, max_predict_inflight=64):
        self.registry = registry
        self.sessions = sessions
        self.max_predict_inflight = max_predict_inflight
        self._predicting: dict[str, int] = {}  # model -> Predict calls running in threads
        self._step_latency = metrics.latency("Step")
        self._step_ok = metrics.request_counter("Step", "OK")
        self._stream_latency = metrics.latency("StreamSteps")
        self._replies: dict[int, ReplyEncoder] = {}  # outputs -> StreamSteps reply writer
        self._steps = StepIndex()  # plain Step requests met before, by their bytes
        self._stream_steps = StepIndex()  # plain one-step StreamSteps messages met before
        # each message's first call: recognise, and answer in C where it can (serving.wire)
        self._step_hot = plain_steps(self._steps, sessions, BATCH_WINDOW_S, queue_item, unary=True)
        self._stream_hot = plain_steps(self._stream_steps, sessions, BATCH_WINDOW_S, queue_item,
                                       unary=False)

    # ---- models ------------------------------------------------------------------

    @errors.unary("ListModels")
    async def ListModels(self, request, context):
        if not self.registry.ready:
            raise errors.Unavailable("models are still loading; retry shortly")
        out = pb.ListModelsResponse()
        for m in self.registry:
            out.models.add(name=m.name, version=m.version, available_versions=m.available_versions,
                           task=m.info.task, cell=m.info.cell, can_stream=m.cell is not None,
                           ready=True)
        return out

    @errors.unary("ModelMetadata")
    async def ModelMetadata(self, request, context):
        m = self.registry.get(request.model, request.version or None)
        i = m.info
        meta = {k: v for k, v in vars(i).items() if k not in ("vocab", "path")}
        return pb.ModelMetadataResponse(
            name=i.name, version=i.version, task=i.task, cell=i.cell, layers=i.layers,
            hidden=i.hidden, directions=i.directions, input_kind=i.input_kind,
            input_features=i.input_features, output_kind=i.output_kind, output_size=i.output_size,
            output_names=[str(n) for n in i.output_names or []],
            labels=[str(n) for n in i.labels or []], can_stream=m.cell is not None,
            accepts_text=m.tokenizer is not None, content_hash=i.content_hash,
            ort_provider=m.ort.provider, cell_device=m.cell_device,
            metadata_json=json.dumps(meta, default=str), vocab=list(i.vocab or []))

    # ---- stateless -------------------------------------------------------------------

    @errors.unary("Predict")
    async def Predict(self, request, context):
        m = self.registry.get(request.model, request.version or None)
        if request.text:
            return await self._predict_text(m, request)
        if not request.HasField("x"):
            raise InvalidArgument("Predict needs x (or text for a text model)")
        x = to_array(request.x, "x")
        h0 = to_array(request.h0, "h0") if request.HasField("h0") else None
        c0 = to_array(request.c0, "c0") if request.HasField("c0") else None
        if m.ort.runs_inline(x):
            out = m.ort.predict(x, h0, c0)
        else:  # big work: a worker thread, so every stream keeps moving
            out = await self._predict_in_thread(m, x, h0, c0, deadline_of(context))
        reply = pb.PredictResponse(model=m.name, version=m.version, y=from_array(out["y"]),
                                   hn=from_array(out["hn"]))
        if "cn" in out:
            reply.cn.CopyFrom(from_array(out["cn"]))
        return reply

    async def _predict_in_thread(self, m, x, h0, c0, deadline):
        """A big Predict in a worker thread, bounded per model (refused, not queued)."""
        busy = self._predicting.get(m.name, 0)
        if busy >= self.max_predict_inflight:
            raise errors.ResourceExhausted(
                f"model {m.name!r} has {busy} Predict calls running, the limit "
                f"(--max-predict-inflight); retry with backoff")
        if self.sessions.closing:
            raise errors.Unavailable("server is shutting down")
        if deadline is not None and time.monotonic() > deadline:
            raise errors.DeadlineExceeded("the caller's deadline passed before Predict could run")
        self._predicting[m.name] = busy + 1
        try:
            return await asyncio.to_thread(m.ort.predict, x, h0, c0)
        finally:
            self._predicting[m.name] -= 1

    async def _predict_text(self, m, request):
        if request.HasField("x"):
            raise InvalidArgument("send either x or text, not both")
        ids = [m.encode_text(t) for t in request.text]
        # rows run one by one: padding would change a row's final state
        outs = [m.ort.predict(row[None]) for row in ids]
        lengths = [len(row) for row in ids]
        T = max(lengths)
        y = np.zeros((len(ids), T, m.info.output_size), np.float32)  # (B, T, out), zero padded
        for b, o in enumerate(outs):
            y[b, : lengths[b]] = o["y"][0]
        reply = pb.PredictResponse(model=m.name, version=m.version, y=from_array(y),
                                   hn=from_array(np.concatenate([o["hn"] for o in outs], axis=1)),
                                   lengths=lengths)
        if "cn" in outs[0]:
            reply.cn.CopyFrom(from_array(np.concatenate([o["cn"] for o in outs], axis=1)))
        return reply

    # ---- sessions ----------------------------------------------------------------------

    def _step_x(self, s: pb.StepRequest):
        """(model, version, sequence, x, start, end, checked) for the session manager."""
        version = s.version or None
        m = self.registry.get(s.model, version)
        x = _one_float_step(s, m.info)
        if x is not None:
            which = s.WhichOneof("sequence")
            return m.name, version, getattr(s, which) if which else None, x, s.start, s.end, True
        if s.text:
            if s.HasField("x"):
                raise InvalidArgument("send either x or text, not both")
            x = m.encode_text(s.text)
        else:
            if not s.HasField("x"):
                raise InvalidArgument("a step needs x (or text for a text model)")
            x = step_input(s.x, m.info.input_features, m.info.input_kind == "tokens")
        return m.name, s.version or None, sequence_of(s), x, s.start, s.end, False

    async def Step(self, request, context):
        # serving.errors.unary and the guard's parse check written inline: each
        # is a coroutine layer every call would pay for. The request arrives
        # as bytes and the reply leaves as bytes (serving.wire): a plain step
        # met before is recognised without a parse (StepIndex); anything
        # else is parsed and checked.
        t0 = time.perf_counter()
        try:
            reply = None
            hit = None
            if request.__class__ is bytes:
                left = context.time_remaining()
                if left is None or left > 0:  # else the general path reports the deadline
                    tenant = tenant_of(context)
                    hit = self._step_hot(request, tenant)
            if hit.__class__ is bytes:  # a live session's next step, answered in C
                reply = hit
            elif hit is not None:  # the hot path, as in StreamSteps: a live session's next step
                res = hit  # a future: queued in C for this loop pass's batch
                if hit.__class__ is tuple:
                    ms, seq, model, vals = hit
                    res = (self.sessions.try_plain_step(ms, seq, vals, tenant)
                           if isfinite(sum(vals)) and self.sessions.models.get(model) is ms else None)
                if res is not None:
                    if res.__class__ is not tuple:  # queued for this loop pass's batch
                        res = await res
                    reply = self._encoder(res[0].shape[1]).unary_reply(*res)
            if reply is None:
                reply = await self._step_message(request, context)
        except AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            code, message = errors.classify(exc, "Step")
            metrics.observe_request("Step", code)
            await context.abort(errors.status_code(code), message, errors.trailing(exc))
        self._step_ok.inc()
        self._step_latency.observe(time.perf_counter() - t0)
        return reply

    async def _step_message(self, request, context) -> bytes:
        """The reply (bytes) to any Step request but a known plain step: parsed,
        checked, run; a request the StepIndex can learn is learned."""
        s = _parse_step(request) if request.__class__ is bytes else request
        plain = _plain_step(s, self.sessions.models)
        if plain is not None:
            left = context.time_remaining()
            if left is None or left > 0:
                ms, seq, vals = plain
                res = self.sessions.try_plain_step(ms, seq, vals, tenant_of(context))
                if res is not None:
                    if res.__class__ is not tuple:  # queued for this loop pass's batch
                        res = await res
                    if request.__class__ is bytes:
                        self._steps.learn(request, s, vals, ms, seq, s.model)
                    return self._encoder(res[0].shape[1]).unary_reply(*res)
        model, version, seq, x, start, end, checked = self._step_x(s)
        y, pos = await self.sessions.step_with_position(
            model, version, seq, x, start=start, end=end, tenant=tenant_of(context),
            checked=checked, expect=expected_of(s), deadline=deadline_of(context))
        reply = pb.StepResponse(position=pos)
        reply.y.shape[:] = y.shape
        reply.y.float_data[:] = y.ravel().tolist()
        return reply.SerializeToString()

    def _encoder(self, outputs: int) -> ReplyEncoder:
        enc = self._replies.get(outputs)
        if enc is None:
            enc = self._replies[outputs] = ReplyEncoder(outputs)
        return enc

    async def StreamSteps(self, request_iterator, context):
        # serving.errors.stream written inline: its extra async-generator layer
        # cost every message a resume and a yield. Requests arrive as bytes and
        # replies leave as bytes (serving.wire: no serializer calls). A plain
        # step met before is recognised without a parse and answered here in
        # a few lines; every other message goes through _stream_message.
        try:
            tenant = tenant_of(context)
            try_plain = self.sessions.try_plain_step
            models = self.sessions.models
            latency = self._stream_latency
            hot = self._stream_hot
            async for raw in request_iterator:
                t0 = time.perf_counter()
                hit = hot(raw, tenant) if raw.__class__ is bytes else None
                if hit.__class__ is bytes:  # a live session's next step, answered in C
                    reply = hit
                elif hit is not None:  # the hot path: a live session's next step
                    reply = None
                    try:
                        res = hit  # a future: queued in C for this loop pass's batch
                        if hit.__class__ is tuple:
                            ms, seq, model, vals = hit
                            res = (try_plain(ms, seq, vals, tenant)
                                   if isfinite(sum(vals)) and models.get(model) is ms else None)
                        if res is not None:
                            if res.__class__ is not tuple:  # queued for this loop pass's batch
                                res = await res
                            reply = self._encoder(res[0].shape[1]).step_reply(*res)
                    except Exception as exc:  # noqa: BLE001 - reported on this step only
                        reply = pb.StreamStepsResponse(results=[_error_result(exc)]).SerializeToString()
                    if reply is None:
                        reply = await self._stream_message(raw, tenant)
                else:
                    reply = await self._stream_message(raw, tenant)
                latency.observe(time.perf_counter() - t0)
                yield reply
        except AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - ends the stream with its status
            await errors.end_stream(context, exc, "StreamSteps")
        errors.stream_ok("StreamSteps")

    async def _stream_message(self, raw, tenant: str) -> bytes:
        """The reply (bytes) to any StreamSteps message but a known plain step:
        parsed, checked, run; a message the StepIndex can learn is learned.
        Raises (ending the stream) only for a message that does not parse."""
        sessions = self.sessions
        message = parse_request(raw)
        steps = message.steps
        if message.HasField("batch") or len(steps) != 1:
            if message.HasField("batch"):
                reply = await self._session_batch(message.batch, tenant)
                if steps:
                    reply.results.extend((await self._step_many(steps, tenant)).results)
            elif steps:
                reply = await self._step_many(steps, tenant)
            else:
                reply = pb.StreamStepsResponse()  # nothing asked, nothing done; the stream lives
            return reply.SerializeToString()
        s = steps[0]
        try:
            res = None
            plain = _plain_step(s, sessions.models)
            if plain is not None:
                ms, seq, vals = plain
                res = sessions.try_plain_step(ms, seq, vals, tenant)
                if res is not None:
                    if res.__class__ is not tuple:  # queued for this loop pass's batch
                        res = await res
                    if raw.__class__ is bytes:
                        self._stream_steps.learn(raw, message, vals, ms, seq, s.model)
            if res is None:
                model, version, seq, x, start, end, checked = self._step_x(s)
                res = await sessions.step_with_position(
                    model, version, seq, x, start=start, end=end, tenant=tenant,
                    checked=checked, expect=expected_of(s))
            y, pos = res
            if y.shape[0] == 1:
                return self._encoder(y.shape[1]).step_reply(y, pos)
            reply = pb.StreamStepsResponse()  # a chunk of T steps
            r = reply.results.add(position=pos)
            r.y.shape.extend(y.shape)  # (T, out)
            r.y.float_data.extend(y.ravel().tolist())
        except Exception as exc:  # noqa: BLE001 - reported on this step only
            reply = pb.StreamStepsResponse(results=[_error_result(exc)])
        return reply.SerializeToString()

    def _gather_rows(self, steps):
        """A multiplexed message of one-step inputs for one model, as arrays.

        -> (model, version, ids, x (B, F) | (B,), starts, ends), or None when
        the message needs the general path (chunks, text, mixed models).
        """
        first = steps[0]
        model, version = first.model, first.version
        try:
            m = self.registry.get(model, version or None)
        except Exception:  # noqa: BLE001 - the general path reports it per step
            return None
        if m.cell is None:
            return None
        tokens = m.info.input_kind == "tokens"
        F = 1 if tokens else m.info.input_features
        vals, ids, starts, ends, expects = [], [], [], [], []
        for s in steps:
            if s.model != model or s.version != version or s.text:
                return None
            t = s.x
            data = t.int64_data if tokens else t.float_data
            if len(data) != F or (t.int64_data if not tokens else t.float_data):
                return None
            if t.shape and list(t.shape) not in ([F], [1, F], [1]):
                return None
            vals.extend(data)
            which = s.WhichOneof("sequence")
            ids.append(getattr(s, which) if which else None)
            starts.append(s.start)
            ends.append(s.end)
            expects.append(s.expected_position if s.HasField("expected_position") else -1)
        if tokens:
            x = np.array(vals, np.int64)  # (B,)
        else:
            x = np.array(vals, np.float32).reshape(len(steps), F)  # (B, F)
        if not any(e >= 0 for e in expects):
            expects = None
        return m.name, version or None, ids, x, starts, ends, expects

    async def _step_many(self, steps, tenant):
        rows = self._gather_rows(steps)
        if rows is not None:
            model, version, ids, x, starts, ends, expects = rows
            try:
                y, positions, errs = await self.sessions.step_batch(model, version, ids, x,
                                                                    starts, ends, tenant, expects)
            except Exception as exc:  # noqa: BLE001 - e.g. shutting down: every row gets it
                return pb.StreamStepsResponse(results=[_error_result(exc)] * len(steps))
            shape = [1, y.shape[1]]
            ys, ps = y.tolist(), positions.tolist()
            reply = pb.StreamStepsResponse()
            add = reply.results.add
            for i, e in enumerate(errs):  # filling in place: ~2x faster than nested constructors
                if e is not None:
                    add().CopyFrom(_error_result(e, ps[i]))
                    continue
                r = add(position=ps[i])
                r.y.shape[:] = shape
                r.y.float_data[:] = ys[i]
            return reply
        requests, results = [], [None] * len(steps)
        index = []
        for i, s in enumerate(steps):
            try:
                model, version, seq, x, start, end, _ = self._step_x(s)
            except Exception as exc:  # noqa: BLE001
                results[i] = _error_result(exc)
                continue
            requests.append((model, version, seq, x, start, end, tenant, expected_of(s)))
            index.append(i)
        if requests:
            try:
                done = await self.sessions.step_many(requests)
            except Exception as exc:  # noqa: BLE001 - e.g. too many steps: all refused
                done = [exc] * len(requests)
            for i, res in zip(index, done):
                if isinstance(res, BaseException):
                    results[i] = _error_result(res)
                else:
                    y, pos = res
                    results[i] = pb.StepResponse(y=from_array(y), position=pos)
        return pb.StreamStepsResponse(results=results)

    async def _session_batch(self, b: pb.SessionBatch, tenant: str) -> pb.StreamStepsResponse:
        """The packed form: B sessions' steps as arrays, answered as arrays."""
        reply = pb.StreamStepsResponse()
        out = reply.batch
        ids = list(b.sequence_ids) or list(b.sequence_keys)
        B = len(ids)
        try:
            if not B:
                raise InvalidArgument("batch names no session (sequence_ids or sequence_keys)")
            if b.sequence_ids and b.sequence_keys:
                raise InvalidArgument("batch sets both sequence_ids and sequence_keys; use one")
            m = self.registry.get(b.model, b.version or None)
            tokens = m.info.input_kind == "tokens"
            x = to_array(b.x, "batch x")
            if not b.x.shape:
                x = x if tokens else x.reshape(B, -1) if x.size % B == 0 else x
            want = (B,) if tokens else (B, m.info.input_features)
            if x.shape != want or (x.dtype == np.int64) != tokens:
                raise InvalidArgument(
                    f"batch x for {m.name!r} must be {'int64' if tokens else 'float32'} of shape "
                    f"{want} (one step per session), got {x.dtype} {x.shape}")
            starts = list(b.start) or [False] * B
            ends = list(b.end) or [False] * B
            if len(starts) != B or len(ends) != B:
                raise InvalidArgument(f"batch start/end need one flag per session ({B})")
            expects = list(b.expected_positions) or None
            y, positions, errs = await self.sessions.step_batch(
                m.name, b.version or None, ids, x, starts, ends, tenant, expects)
        except Exception as exc:  # noqa: BLE001 - the whole batch is refused, the stream lives
            code, message = errors.classify(exc, "StreamSteps")
            metrics.observe_request("StreamSteps.batch", code)
            out.codes[:] = [errors.status_number(code)] * max(B, 1)
            out.errors[:] = [message] * max(B, 1)
            return reply
        out.y.shape[:] = y.shape
        out.y.float_data[:] = y.ravel().tolist()
        out.positions[:] = positions.tolist()
        if errs.count(None) != len(errs):  # some rows refused
            pairs = [(0, "") if e is None else
                     (lambda c: (errors.status_number(c[0]), c[1]))(errors.classify(e, "StreamSteps"))
                     for e in errs]
            out.codes[:] = [p[0] for p in pairs]
            out.errors[:] = [p[1] for p in pairs]
        return reply

    @errors.unary("Rollout")
    async def Rollout(self, request, context):
        m = self.registry.get(request.model, request.version or None)
        x = None
        if request.HasField("x"):
            x = step_input(request.x, m.info.input_features, m.info.input_kind == "tokens")
        y, pos, tokens = await self.sessions.rollout(
            m.name, request.version or None, sequence_of(request), int(request.steps), x,
            commit=request.commit, tenant=tenant_of(context), temperature=float(request.temperature),
            top_k=int(request.top_k), seed=int(request.seed))
        return pb.RolloutResponse(y=from_array(y), position=pos, tokens=tokens)

    @errors.unary("EndSession")
    async def EndSession(self, request, context):
        pos = await self.sessions.end(request.model, request.version or None,
                                      sequence_of(request), tenant=tenant_of(context))
        return pb.EndSessionResponse(position=pos)


def _plain_step(s: pb.StepRequest, models: dict):
    """(ModelSessions, sequence id, F floats) of a plain step (no start, end,
    version, text or expected position; a float model's finite one-step x),
    else None: the general path checks it and names any problem."""
    if s.start or s.end or s.version or s.text or s.HasField("expected_position"):
        return None
    ms = models.get(s.model)
    vals = _one_float_row(s, ms.info) if ms is not None else None
    which = s.WhichOneof("sequence")
    return (ms, getattr(s, which), vals) if vals is not None and which else None


def _parse_step(raw: bytes) -> pb.StepRequest:
    try:
        return pb.StepRequest.FromString(raw)
    except Exception as exc:  # noqa: BLE001 - DecodeError and its kin: the bytes are not a StepRequest
        raise InvalidArgument(f"the request is not a valid {pb.StepRequest.DESCRIPTOR.full_name} "
                              f"message ({exc})") from None


def _one_float_row(s: pb.StepRequest, info) -> list | None:
    """The common step's input: F finite floats of a float model, as a list.

    None for anything else: the general path checks it and names the problem.
    Checking the few values in Python is cheaper than numpy's per-call cost;
    one isfinite of their sum stands for all of them (a NaN or an Inf makes
    the sum non-finite; a sum that overflows merely takes the general path).
    """
    t = s.x
    data = t.float_data
    F = info.input_features
    if len(data) != F or F > 16 or info.input_kind != "float" or len(t.int64_data):
        return None
    shape = t.shape
    n = len(shape)
    if n and not ((n == 1 and shape[0] == F) or (n == 2 and shape[0] == 1 and shape[1] == F)):
        return None
    vals = list(data)
    return vals if isfinite(sum(vals)) else None


def _one_float_step(s: pb.StepRequest, info) -> np.ndarray | None:
    """_one_float_row as a (1, F) float32 array (None for text or anything else)."""
    vals = None if s.text else _one_float_row(s, info)
    return None if vals is None else np.array((vals,), np.float32)


def _error_result(exc: BaseException, position: int = 0) -> pb.StepResponse:
    code, message = errors.classify(exc, "StreamSteps")
    metrics.observe_request("StreamSteps.step", code)
    return pb.StepResponse(code=errors.status_number(code), error=message,
                           position=getattr(exc, "position", position))
