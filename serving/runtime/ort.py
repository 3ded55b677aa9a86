"""OrtModel: a batch of whole sequences through ONNX Runtime.

The session asks for CUDA first and falls back to CPU; `provider` is what
ONNX Runtime really uses (onnxruntime-gpu lists CUDA even where no GPU is).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from seqserve.artifact import ModelInfo
from serving.runtime.inputs import check_batch, check_state

log = logging.getLogger("seqserve.ort")

# The CUDA fallback would print a multi-line error per session; we log the
# provider really used instead (below).
ort.set_default_logger_severity(4)

WANTED_PROVIDERS = ["CUDAExecutionProvider", "CPUExecutionProvider"]

# Predict work below this many multiply-adds runs inline on the event loop
# (~0.2 ms on this machine's cores); more runs in a worker thread.
INLINE_MACS = 1_000_000


class OrtModel:
    def __init__(self, path: str | Path, info: ModelInfo, *, device: str = "auto",
                 max_steps: int = 1 << 30, threads: int = 0):
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # the CUDA fallback warning is reported below, once
        if threads:
            opts.intra_op_num_threads = threads
        # Idle ORT workers must not spin: they would steal the CPU the event
        # loop needs for every other request.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        wanted = ["CPUExecutionProvider"] if device == "cpu" else WANTED_PROVIDERS
        available = ort.get_available_providers()
        providers = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        self.providers = self.session.get_providers()
        self.provider = self.providers[0]
        self.info = info
        self.max_steps = max_steps
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        log.info("model %s v%s: ONNX Runtime on %s (asked %s)", info.name, info.version,
                 self.provider, providers)

    @property
    def step_macs(self) -> int:
        """Multiply-adds one time step of one sequence costs (recurrent layers and head)."""
        i = self.info
        gates = {"lstm": 4, "gru": 3}.get(i.cell, 1)
        width = i.input_features if i.input_kind == "float" else i.hidden  # embedding ~ hidden
        macs = 0
        for _ in range(i.layers):
            macs += i.directions * gates * i.hidden * (width + i.hidden)
            width = i.directions * i.hidden
        return macs + width * i.output_size

    def runs_inline(self, x: np.ndarray) -> bool:
        """Small enough to run on the event loop (well under a millisecond).

        Anything bigger runs in a (lower-priority) worker thread: ORT releases
        the GIL, so the loop keeps answering steps, health checks and
        refusals meanwhile. Judged by work (batch x time x per-step cost),
        not by input size: a (32, 256, 1) batch is only 8,192 values but
        ~140 million multiply-adds for a 64-unit LSTM, tens of milliseconds.
        """
        if x.ndim < 2:  # malformed: predict() refuses it at once, inline
            return True
        return x.shape[0] * x.shape[1] * self.step_macs <= INLINE_MACS

    @property
    def state_rows(self) -> int:
        return self.info.layers * self.info.directions

    def predict(self, x: np.ndarray, h0: np.ndarray | None = None,
                c0: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """x (B, T, F) float32 | (B, T) int64 -> {"y": (B, T, out), "hn", "cn"?}.

        A missing initial state is zeros (what the model was trained with).
        """
        x = check_batch(self.info, np.asarray(x), self.max_steps)
        B = x.shape[0]
        h0 = check_state(self.info, None if h0 is None else np.asarray(h0), B, "h0")
        c0 = check_state(self.info, None if c0 is None else np.asarray(c0), B, "c0")
        if c0 is not None and not self.info.has_cell_state:
            from serving.errors import InvalidArgument
            raise InvalidArgument(f"model {self.info.name!r} is a {self.info.cell} and has no c0")
        zeros = (self.state_rows, B, self.info.hidden)
        feeds = {"x": x}
        if "h0" in self.input_names:
            feeds["h0"] = h0 if h0 is not None else np.zeros(zeros, np.float32)
        if "c0" in self.input_names:
            feeds["c0"] = c0 if c0 is not None else np.zeros(zeros, np.float32)
        values = self.session.run(None, feeds)
        return dict(zip(self.output_names, values))
