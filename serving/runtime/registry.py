"""Every model of the repository, loaded once: metadata, ONNX Runtime, cell.

The newest version of each model is served unless pinned (NAME:VERSION).
A model that can stream (unidirectional) also gets a Numba cell read from
the same ONNX file, so both runtimes share one source of weights.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from seqserve import artifact
from seqserve.artifact import ModelInfo
from serving.errors import FailedPrecondition, NotFound, Unavailable
from serving.runtime.ort import OrtModel

log = logging.getLogger("seqserve.registry")


@dataclass
class LoadedModel:
    info: ModelInfo
    ort: OrtModel
    cell: object | None = None
    """numba_cells cell, for models that can stream."""
    cell_device: str = ""
    available_versions: list = field(default_factory=list)
    tokenizer: object | None = None
    """seqserve.text.Tokenizer for text models with a vocabulary."""

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def version(self) -> int:
        return self.info.version

    def require_cell(self):
        if self.cell is None:
            raise FailedPrecondition(
                f"model {self.name!r} cannot stream (it reads sequences both ways); use Predict")
        return self.cell

    def encode_text(self, text: str) -> np.ndarray:
        """Raw text -> int64 token ids (T,)."""
        from serving.errors import InvalidArgument

        if self.tokenizer is None:
            raise InvalidArgument(f"model {self.name!r} does not take text (no tokenizer in its metadata)")
        ids = self.tokenizer.encode(text)
        if not ids:
            raise InvalidArgument(f"text {text[:40]!r} has no tokens")
        return np.asarray(ids, dtype=np.int64)


def _load_info(path: Path, name: str, version: int) -> ModelInfo:
    return artifact.load_model_info(path, name=name, version=version)


def _tokenizer(info: ModelInfo):
    if info.input_kind != "tokens" or not info.vocab:
        return None
    from seqserve.text import Tokenizer

    return Tokenizer.from_metadata(info.tokenizer, info.vocab)


def load_model(repo: str, name: str, version: int | None, *, device: str = "auto",
               max_steps: int = 4096, capacity: int = 1024) -> LoadedModel:
    path = artifact.model_path(repo, name, version)
    version = int(path.parent.name)
    info = _load_info(path, name, version)
    ort_model = OrtModel(path, info, device=device, max_steps=max_steps)
    cell, cell_device = None, ""
    if info.can_stream:
        from numba_cells import load_cell

        cell = load_cell(str(path), device=device, capacity=capacity)
        cell_device = str(cell.device)
    log.info("model %s v%d (%s %s, %s): ONNX Runtime provider %s, streaming cell on %s",
             name, version, info.cell, info.task, path, ort_model.provider, cell_device or "none")
    return LoadedModel(info=info, ort=ort_model, cell=cell, cell_device=cell_device,
                       available_versions=artifact.versions(repo, name), tokenizer=_tokenizer(info))


def warm(model: LoadedModel) -> None:
    """Run each runtime once so the first request pays no compile or allocation."""
    info = model.info
    if info.input_kind == "tokens":
        x = np.ones((1, 2), np.int64)
    else:
        x = np.zeros((1, 2, info.input_features), np.float32)
    model.ort.predict(x)
    if model.cell is not None:
        # slot 0 is scratch here: the session manager resets every slot it hands out
        model.cell.step(x[:, 0], np.zeros(1, np.int64))
        from serving import wire
        if wire.NATIVE is not None:  # the C hot path calls the kernel's C entry
            model.cell.native_step()
        model.cell.step_chunk(x, np.zeros(1, np.int64))
        model.cell.reset(0)


class Registry:
    """name -> LoadedModel for the served version of every model.

    A server creates it empty (not ready: calls get UNAVAILABLE) and fills
    it with `load_all()` after it started listening, so health checks can
    say NOT_SERVING while models load and warm.
    """

    def __init__(self, models: dict[str, LoadedModel] | None = None, repo: str = ""):
        self.models: dict[str, LoadedModel] = dict(models or {})
        self.repo = repo
        self.ready = models is not None
        self.failed: dict[str, str] = {}  # model name -> why it is not served

    @classmethod
    def load(cls, repo: str, **kwargs) -> "Registry":
        reg = cls(repo=repo)
        reg.load_all(**kwargs)
        return reg

    def load_all(self, *, pins: dict[str, int] | None = None, device: str = "auto",
                 max_steps: int = 4096, warm_up: bool = True) -> None:
        repo = self.repo
        pins = pins or {}
        found = artifact.list_models(repo)
        for name in pins:
            if name not in found:
                raise ValueError(f"pinned model {name!r} is not in repository {repo!r}")
        models, failed = {}, {}
        for name in found:
            try:
                m = load_model(repo, name, pins.get(name), device=device, max_steps=max_steps)
                if warm_up:
                    warm(m)
            except Exception as exc:  # one broken model must not keep the others down
                log.error("model %s not served: %s", name, exc)
                failed[name] = str(exc)
                continue
            models[name] = m
        if not models:
            log.warning("no servable model in repository %r", repo)
        self.models = models
        self.failed = failed
        self.ready = True

    def get(self, name: str, version: int | None = None) -> LoadedModel:
        m = self.models.get(name)
        if m is None and not self.ready:
            raise Unavailable("models are still loading; retry shortly")
        if m is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise NotFound(f"unknown model {name!r} (served: {known})")
        if version and version != m.version:
            raise NotFound(
                f"model {name!r} version {version} is not served (serving version {m.version})")
        return m

    def __iter__(self):
        return iter(self.models.values())

    def __len__(self) -> int:
        return len(self.models)
