"""Synthetic series shared by training (the `sine` task) and the serving demo.

Pure numpy: the serving side (serving/demo.py) must not import training.
"""
from __future__ import annotations

import math

import numpy as np


def sine_series(length: int, seed: int, noise: float = 0.0,
                periods: tuple[float, float] = (40.0, 7.0)) -> np.ndarray:
    """(length,) low + high frequency sines; same seed, same series.

    The low component's amplitude drifts by +-25% over ~ten low periods so
    that a model cannot memorise one amplitude: it must infer it from the
    context it has read (what a served model streaming a new wave needs).
    """
    rng = np.random.default_rng(seed)
    p_lo, p_hi = periods
    a_lo, a_hi = rng.uniform(0.7, 1.0), rng.uniform(0.25, 0.45)
    ph_lo, ph_hi, ph_mod = rng.uniform(0, 2 * math.pi, size=3)
    t = np.arange(length, dtype=np.float64)
    drift = 1.0 + 0.25 * np.sin(2 * math.pi * t / (10.3 * p_lo) + ph_mod)
    x = a_lo * drift * np.sin(2 * math.pi * t / p_lo + ph_lo) + a_hi * np.sin(2 * math.pi * t / p_hi + ph_hi)
    if noise > 0:
        x = x + rng.normal(0.0, noise, size=length)
    return x
