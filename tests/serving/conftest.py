"""Fixtures: a small model repository and a real server on 127.0.0.1:0.

Models are SequenceModel with random weights, exported through the real
exporter (tests may use torch; the server never does). The server runs on
its own event loop in a thread; tests talk to it with real gRPC stubs.
"""
from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos.seqserve.v1 import inference_pb2 as pb
from protos.seqserve.v1 import inference_pb2_grpc as pb_grpc

VOCAB = ["<pad>", "<unk>", "the", "cat", "sat", "on", "mat", ".", "a", "dog", "ran", "far"]
TAGS = ["O", "B-person", "I-person", "B-geo-loc", "I-geo-loc"]


def export_random(repo: Path, name: str, *, cell="lstm", input_size=3, output_size=3,
                  hidden=16, layers=2, head="regression", vocab=None, bidirectional=False,
                  seed=0, version=1, labels=None) -> Path:
    """A random-weight SequenceModel exported to REPO/NAME/VERSION/model.onnx."""
    import torch

    from training.export import export_model
    from training.model import Checkpoint, ModelConfig, SequenceModel

    torch.manual_seed(seed)
    cfg = ModelConfig(cell=cell, input_size=input_size, hidden=hidden, layers=layers, head=head,
                      output_size=output_size, vocab_size=len(vocab) if vocab else 0, embed_dim=8,
                      bidirectional=bidirectional)
    model = SequenceModel(cfg).eval()
    extra = {}
    if vocab:
        from seqserve.text import Tokenizer
        extra = {"vocab": list(vocab), "tokenizer": Tokenizer().to_dict()}
    if labels:
        extra["labels"] = list(labels)
    ckpt = Checkpoint(model=cfg.to_dict(), task={"name": "test"}, train={}, extra=extra)
    path = repo / name / str(version) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    export_model(model, ckpt, path)
    return path


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    export_random(repo, "lstm", cell="lstm", seed=1)
    export_random(repo, "gru", cell="gru", seed=2)
    export_random(repo, "rnn", cell="rnn", seed=3)
    export_random(repo, "lm", cell="lstm", head="lm", vocab=VOCAB, output_size=len(VOCAB), seed=4,
                  layers=1)
    export_random(repo, "bi", cell="gru", bidirectional=True, seed=5, layers=1)
    export_random(repo, "tagger", cell="lstm", head="tag", vocab=VOCAB, bidirectional=True, seed=6,
                  layers=1, labels=TAGS, output_size=len(TAGS))
    return repo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Running:
    server: object
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    port: int
    channel: grpc.Channel
    stub: pb_grpc.InferenceStub

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, coro_fn, timeout=30):
        """Run coro_fn() on the server's loop (e.g. a snapshot) and return its result."""
        return asyncio.run_coroutine_threadsafe(coro_fn(), self.loop).result(timeout)

    def stop(self):
        self.channel.close()
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def start_server(**overrides) -> Running:
    """A Server on its own loop in a thread, ready (models loaded) on return."""
    from serving.server import Server
    from serving.settings import Settings

    settings = Settings(**{"port": 0, "metrics_port": 0, "grace_s": 0.5, **overrides}).validate()
    loop = asyncio.new_event_loop()
    started = {}

    def run():
        asyncio.set_event_loop(loop)
        server = Server(settings)
        started["server"] = server
        try:
            started["port"] = loop.run_until_complete(server.start())
            loop.run_until_complete(asyncio.wait_for(server.until(server.ready), 120))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            started["error"] = exc
            return
        finally:
            started["event"].set()
        loop.run_forever()

    started["event"] = threading.Event()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started["event"].wait(180)
    if "error" in started:
        raise started["error"]
    channel = grpc.insecure_channel(f"127.0.0.1:{started['port']}")
    return Running(started["server"], loop, thread, started["port"], channel,
                   pb_grpc.InferenceStub(channel))


@pytest.fixture(scope="module")
def server(model_repo):
    running = start_server(repo=str(model_repo), session_idle_s=300, max_sessions=1000,
                           max_steps_per_request=512)
    yield running
    running.stop()


def step_request(model, seq, x, *, start=False, end=False) -> pb.StepRequest:
    x = np.asarray(x)
    t = pb.Tensor(shape=x.shape)
    if x.dtype.kind in "iu":
        t.int64_data.extend(x.ravel().tolist())
    else:
        t.float_data.extend(x.ravel().tolist())
    req = pb.StepRequest(model=model, x=t, start=start, end=end)
    if isinstance(seq, str):
        req.sequence_key = seq
    else:
        req.sequence_id = seq
    return req


def array(t: pb.Tensor) -> np.ndarray:
    if len(t.int64_data):
        return np.array(t.int64_data, np.int64).reshape(tuple(t.shape))
    return np.array(t.float_data, np.float32).reshape(tuple(t.shape))


def ort_reference(path, x, h0=None, c0=None) -> dict:
    """One ONNX Runtime call on the whole file: the independent reference."""
    import onnxruntime as ort

    from seqserve.artifact import load_model_info

    info = load_model_info(path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    zero = np.zeros((info.layers * info.directions, x.shape[0], info.hidden), np.float32)
    feeds = {"x": x, "h0": zero if h0 is None else h0}
    if info.has_cell_state:
        feeds["c0"] = zero if c0 is None else c0
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))


@pytest.fixture(scope="session")
def kit():
    """Helpers for test modules (importlib mode: they cannot import conftest)."""
    from types import SimpleNamespace

    return SimpleNamespace(step_request=step_request, array=array, ort_reference=ort_reference,
                           start_server=start_server, export_random=export_random,
                           free_port=free_port, VOCAB=VOCAB, TAGS=TAGS)
