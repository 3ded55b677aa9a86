"""One recurrent sequence model for every task seqserve trains.

The recurrent core is a single torch.nn.RNN / LSTM / GRU module so that the
legacy ONNX exporter maps each layer to one ONNX recurrent node, which both
runtimes (ONNX Runtime and the Numba streaming cell) read.

Every head emits one output per time step, `y: (B, T, out)`:
  regression - the next value(s) of the series at each step (forecasting)
  classify   - class logits after reading each token; the last valid step is
               the sequence's class (a sentence can be classified as typed)
  tag        - per-token tag logits (named entities)
  lm         - next-token logits (language model)
so one graph interface (x, h0[, c0]) -> (y, hn[, cn]) serves them all.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

CELLS = ("rnn", "lstm", "gru")
HEADS = ("regression", "classify", "tag", "lm")


@dataclass
class ModelConfig:
    cell: str = "lstm"
    """Recurrent cell: rnn (tanh), lstm or gru."""
    input_size: int = 1
    """Features per step for float input; ignored when vocab_size > 0."""
    vocab_size: int = 0
    """Token vocabulary size; > 0 makes the input int64 token ids with an embedding."""
    embed_dim: int = 64
    """Embedding width for token input."""
    hidden: int = 64
    """Hidden units per layer and direction."""
    layers: int = 2
    """Stacked recurrent layers."""
    dropout: float = 0.0
    """Dropout between recurrent layers (and before the head) during training."""
    bidirectional: bool = False
    """Read both ways; such a model can answer whole sequences but cannot stream."""
    head: str = "regression"
    """Output head: regression | classify | tag | lm."""
    output_size: int = 1
    """Outputs per step: series dimensions, classes, tags or vocabulary size."""
    padding_idx: int | None = 0
    """Token id used for padding (token input only)."""

    def validate(self) -> "ModelConfig":
        if self.cell not in CELLS:
            raise ValueError(f"unknown cell {self.cell!r}: choose one of {', '.join(CELLS)}")
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}: choose one of {', '.join(HEADS)}")
        for name in ("hidden", "layers", "output_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.vocab_size <= 0 and self.input_size <= 0:
            raise ValueError(f"input_size must be positive, got {self.input_size}")
        if self.vocab_size > 0 and self.embed_dim <= 0:
            raise ValueError(f"embed_dim must be positive, got {self.embed_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        return self

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def token_input(self) -> bool:
        return self.vocab_size > 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known}).validate()


_RECURRENT = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


class SequenceModel(nn.Module):
    """x -> recurrent core -> per-step head, with the state passed explicitly."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config.validate()
        c = self.config
        if c.token_input:
            self.embedding = nn.Embedding(c.vocab_size, c.embed_dim, padding_idx=c.padding_idx)
            core_in = c.embed_dim
        else:
            self.embedding = None
            core_in = c.input_size
        kwargs = dict(
            input_size=core_in,
            hidden_size=c.hidden,
            num_layers=c.layers,
            batch_first=True,
            dropout=c.dropout if c.layers > 1 else 0.0,
            bidirectional=c.bidirectional,
        )
        if c.cell == "rnn":
            kwargs["nonlinearity"] = "tanh"
        self.rnn = _RECURRENT[c.cell](**kwargs)
        self.drop = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.hidden * c.directions, c.output_size)

    @property
    def state_shape(self) -> tuple[int, int]:
        """(layers * directions, hidden); the batch axis goes in the middle."""
        c = self.config
        return c.layers * c.directions, c.hidden

    def initial_state(self, batch: int, device=None):
        """Zeros: h (L*D, B, H), and (h, c) for LSTM."""
        n, h = self.state_shape
        zeros = torch.zeros(n, batch, h, device=device)
        return (zeros, zeros.clone()) if self.config.cell == "lstm" else zeros

    def forward(self, x, state=None, lengths=None):
        """x: (B, T, F) float or (B, T) int64 ids -> y (B, T, out), state.

        state: h (L*D, B, H) for rnn/gru, (h, c) for lstm; None means zeros.
        lengths: optional (B,) valid lengths of a right-padded batch; padded
        steps then neither advance the returned state nor leak into the
        backward direction, so a padded batch answers like each row alone.
        """
        if self.embedding is not None:
            x = self.embedding(x)  # (B, T) -> (B, T, E)
        T = x.shape[1]
        if lengths is not None:
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            out, state = self.rnn(packed, state)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=T)
        else:
            out, state = self.rnn(x, state)  # (B, T, D*H)
        y = self.head(self.drop(out))  # (B, T, out)
        return y, state


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class Checkpoint:
    """What a run folder's checkpoint.pt holds: enough to rebuild everything."""

    model: dict
    """ModelConfig as a dict."""
    task: dict
    """Task config (name and its parameters, e.g. window, columns, seed)."""
    train: dict
    """Training config (epochs, lr, batch size, clip, seed, ...)."""
    normalization: dict | None = None
    """{"mean": [...], "std": [...]} per input feature, fitted on train; None for text."""
    extra: dict = field(default_factory=dict)
    """Task-specific data a runtime needs: labels, vocabulary, tokenizer settings."""
    metrics: dict = field(default_factory=dict)
    """Final metrics (also written to metrics.json)."""


def save_checkpoint(path, model: SequenceModel, ckpt: Checkpoint) -> None:
    torch.save({"state_dict": model.state_dict(), **asdict(ckpt)}, path)


def load_checkpoint(path) -> tuple[SequenceModel, Checkpoint]:
    """Rebuild the model from the checkpoint alone (no flags needed)."""
    blob = torch.load(path, map_location="cpu", weights_only=False)
    state_dict = blob.pop("state_dict")
    ckpt = Checkpoint(**blob)
    model = SequenceModel(ModelConfig.from_dict(ckpt.model))
    model.load_state_dict(state_dict)
    model.eval()
    return model, ckpt
