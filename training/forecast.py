"""Forecasting data: the series, their chronological splits, normalisation, windows.

Tasks
  sine      a low- plus a high-frequency sine with random amplitudes and
            phases (the low one's amplitude drifts slowly, so the model has to
            read the amplitude from context); optional Gaussian noise;
            deterministic from the seed.
  sunspots  yearly sunspot numbers 1700-2008 (statsmodels, 309 values).
  co2       weekly Mauna Loa CO2 1958-2001 (statsmodels, 2,284 values; the 59
            missing weeks are interpolated in time).
  csv       the user's own file: --csv FILE --columns a,b,... ; all columns
            are forecast together (multivariate when more than one).

Rules every task follows (no leakage):
  - chronological split: train | val | test, contiguous and disjoint in time;
  - mean/std per feature fitted on train only and stored with the model;
  - training windows come from the train segment only: many-to-many, the
    target at step t is the input at step t+1;
  - val/test are scored one step ahead over their whole segment; inputs may
    reach back into earlier segments for warm-up context (inputs, never
    targets, so nothing of the scored future is seen).
"""
from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from seqserve.synthetic import sine_series  # noqa: F401 (the generator is shared with the serving demo)

TASKS = ("sine", "sunspots", "co2", "csv")


@dataclass
class TaskConfig:
    """Everything needed to rebuild a forecasting task's data exactly."""

    name: str = "sine"
    """sine | sunspots | co2 | csv."""
    window: int = 64
    """Training window length (steps); also the warm-up context for scoring."""
    seed: int = 0
    """Seeds the sine generator (amplitudes, phases, noise)."""
    noise: float = 0.0
    """Sine only: std of added Gaussian noise, relative to a unit amplitude."""
    length: int = 4000
    """Sine only: number of steps generated."""
    periods: tuple[float, float] = (40.0, 7.0)
    """Sine only: periods in steps of the low- and the high-frequency component."""
    csv: str | None = None
    """csv only: path to the file."""
    columns: list[str] = field(default_factory=list)
    """csv only: columns to forecast (all of them, together)."""
    val_frac: float = 0.15
    test_frac: float = 0.15

    def validate(self) -> "TaskConfig":
        if self.name not in TASKS:
            raise ValueError(f"unknown forecasting task {self.name!r}: choose one of {', '.join(TASKS)}")
        if self.window <= 0:
            raise ValueError(f"window must be positive, got {self.window}")
        if self.noise < 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")
        if self.length <= 0:
            raise ValueError(f"length must be positive, got {self.length}")
        if not (0 < self.val_frac < 1 and 0 < self.test_frac < 1 and self.val_frac + self.test_frac < 1):
            raise ValueError("val_frac and test_frac must be in (0, 1) and sum to less than 1")
        if self.name == "csv":
            if not self.csv:
                raise ValueError("task csv needs --csv FILE")
            if not self.columns:
                raise ValueError("task csv needs --columns a,b,... (the columns to forecast)")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["periods"] = list(self.periods)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TaskConfig":
        known = set(cls.__dataclass_fields__)
        kw = {k: v for k, v in d.items() if k in known}
        if "periods" in kw:
            kw["periods"] = tuple(kw["periods"])
        return cls(**kw).validate()


@dataclass
class Series:
    """A (possibly multivariate) series in its own units."""

    values: np.ndarray
    """(N, F) float64."""
    columns: list[str]
    """Name of each of the F features."""
    time: np.ndarray
    """(N,) float positions for plotting (step, year, row)."""
    time_label: str = "step"
    units: str = ""


# ---------------------------------------------------------------- the series


def sunspots_series() -> Series:
    import statsmodels.api as sm

    df = sm.datasets.sunspots.load_pandas().data
    return Series(df[["SUNACTIVITY"]].to_numpy(np.float64), ["SUNACTIVITY"],
                  df["YEAR"].to_numpy(np.float64), "year", "sunspot number")


def co2_series() -> Series:
    import statsmodels.api as sm

    df = sm.datasets.co2.load_pandas().data
    # 59 weeks are missing; fill them along the time axis (no gap is at either end).
    filled = df["co2"].interpolate(method="time").bfill().ffill()
    idx = df.index
    years = (idx.year + (idx.day_of_year - 1) / 365.25).to_numpy(np.float64)
    return Series(filled.to_numpy(np.float64)[:, None], ["co2"], years, "year", "ppm")


def csv_series(path: str | Path, columns: list[str]) -> Series:
    """Read `columns` of a CSV file with a header; refuse bad files by row/column."""
    path = Path(path)
    if not columns:
        raise ValueError("--columns is empty: name at least one column to forecast")
    if len(set(columns)) != len(columns):
        raise ValueError(f"--columns names a column twice: {','.join(columns)}")
    with path.open(newline="", encoding="utf-8-sig") as f:  # OSError names a missing file itself
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: file is empty (expected a header row naming the columns)")
        header = [h.strip() for h in header]
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"{path}: column {missing[0]!r} not in header (columns: {', '.join(header)})")
        where = [header.index(c) for c in columns]
        rows = []
        for row_no, row in enumerate(reader, start=1):
            if not row or all(not cell.strip() for cell in row):
                continue  # blank lines carry no data
            line = reader.line_num
            values = []
            for c, i in zip(columns, where):
                if i >= len(row):
                    raise ValueError(f"{path}: row {row_no} (line {line}) has no value for column {c!r}")
                cell = row[i].strip()
                try:
                    v = float(cell)
                except ValueError:
                    shown = repr(cell) if cell else "an empty cell"
                    raise ValueError(f"{path}: row {row_no} (line {line}), column {c!r}: "
                                     f"{shown} is not a number") from None
                if not math.isfinite(v):
                    raise ValueError(f"{path}: row {row_no} (line {line}), column {c!r}: "
                                     f"{cell!r} is not a finite number")
                values.append(v)
            rows.append(values)
    if not rows:
        raise ValueError(f"{path}: no data rows after the header")
    values = np.asarray(rows, dtype=np.float64)
    return Series(values, list(columns), np.arange(1, len(values) + 1, dtype=np.float64), "row")


def load_series(task: TaskConfig) -> Series:
    task.validate()
    if task.name == "sine":
        x = sine_series(task.length, task.seed, task.noise, task.periods)
        return Series(x[:, None], ["sine"], np.arange(task.length, dtype=np.float64), "step")
    if task.name == "sunspots":
        return sunspots_series()
    if task.name == "co2":
        return co2_series()
    return csv_series(task.csv, task.columns)


# ------------------------------------------------- splits and normalisation


@dataclass
class Splits:
    """Chronological [start, stop) index ranges of each segment of one series."""

    train: tuple[int, int]
    val: tuple[int, int]
    test: tuple[int, int]

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}


def min_length(window: int, val_frac: float = 0.15, test_frac: float = 0.15) -> int:
    """Fewest values for which train holds one window (+1 target) and val/test two values."""
    n = window + 1
    while chronological_split_sizes(n, val_frac, test_frac)[0] < window + 1 or \
            min(chronological_split_sizes(n, val_frac, test_frac)[1:]) < 2:
        n += 1
    return n


def chronological_split_sizes(n: int, val_frac: float, test_frac: float) -> tuple[int, int, int]:
    n_test = max(1, int(round(n * test_frac)))
    n_val = max(1, int(round(n * val_frac)))
    return n - n_val - n_test, n_val, n_test


def chronological_split(n: int, window: int, val_frac: float = 0.15, test_frac: float = 0.15,
                        what: str = "the series") -> Splits:
    """train | val | test in time order; refuse a series too short for the window."""
    n_train, n_val, n_test = chronological_split_sizes(n, val_frac, test_frac)
    if n_train < window + 1 or n_val < 2 or n_test < 2:
        need = min_length(window, val_frac, test_frac)
        raise ValueError(f"{what} has {n} rows: too short for window {window} "
                         f"(needs at least {need} rows so the train split holds one window plus "
                         f"its target and val/test two values each); use a smaller --window")
    return Splits((0, n_train), (n_train, n_train + n_val), (n_train + n_val, n))


@dataclass
class Normalization:
    """Per-feature affine map fitted on the train segment only."""

    mean: np.ndarray  # (F,)
    std: np.ndarray  # (F,)

    @classmethod
    def fit(cls, train_values: np.ndarray) -> "Normalization":
        mean = train_values.mean(axis=0)
        std = train_values.std(axis=0)
        # A column that is constant in train would divide by zero; leave its scale alone.
        std = np.where(std > 1e-12, std, 1.0)
        return cls(mean, std)

    def apply(self, values: np.ndarray) -> np.ndarray:
        return (values - self.mean) / self.std

    def invert(self, values: np.ndarray) -> np.ndarray:
        return values * self.std + self.mean

    def to_dict(self) -> dict:
        return {"mean": [float(m) for m in self.mean], "std": [float(s) for s in self.std]}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalization":
        return cls(np.asarray(d["mean"], np.float64), np.asarray(d["std"], np.float64))


@dataclass
class ForecastData:
    """A task's series, split and normalised, ready for training and scoring."""

    task: TaskConfig
    series: Series
    splits: Splits
    norm: Normalization
    normalized: np.ndarray
    """(N, F) float32: the whole series through the train-fitted normalisation."""

    @property
    def features(self) -> int:
        return self.series.values.shape[1]


def prepare(task: TaskConfig) -> ForecastData:
    series = load_series(task)
    what = task.csv if task.name == "csv" else task.name
    splits = chronological_split(len(series.values), task.window, task.val_frac, task.test_frac, what)
    a, b = splits.train
    norm = Normalization.fit(series.values[a:b])
    return ForecastData(task, series, splits, norm, norm.apply(series.values).astype(np.float32))


# ------------------------------------------------------------------ windows


def train_windows(data: ForecastData) -> tuple[np.ndarray, np.ndarray]:
    """Every window of the train segment: X (N, W, F) and next-step targets Y (N, W, F)."""
    a, b = data.splits.train
    seg = data.normalized[a:b]  # (n_train, F)
    W = data.task.window
    starts = np.arange(0, len(seg) - W)  # the last target is seg[-1]
    idx = starts[:, None] + np.arange(W)[None, :]  # (N, W)
    return seg[idx], seg[idx + 1]


def batches(X: np.ndarray, Y: np.ndarray, batch_size: int, seed: int, epoch: int):
    """Shuffled minibatches of (x, y) float tensors; the order depends on (seed, epoch) only."""
    import torch

    order = np.random.default_rng([seed, epoch]).permutation(len(X))
    for i in range(0, len(order), batch_size):
        j = order[i:i + batch_size]
        yield torch.from_numpy(X[j]), torch.from_numpy(Y[j])


def scoring_inputs(data: ForecastData, segment: tuple[int, int], warmup: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Inputs and targets to score one-step predictions of a segment.

    Returns x (T, F) = normalized[start - ctx : stop - 1], targets (stop - start, F)
    and ctx; output step ctx - 1 + k of the model predicts target k. ctx is
    `warmup` or fewer when the series starts earlier.
    """
    start, stop = segment
    if start < 1:
        raise ValueError("a scored segment needs at least one earlier value as input")
    ctx = min(warmup, start)
    x = data.normalized[start - ctx:stop - 1]
    return x, data.normalized[start:stop], ctx
