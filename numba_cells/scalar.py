"""Scalar gate math, written once for every target.

`register_jitable` makes each function callable from `@njit` CPU kernels, from
`@cuda.jit` kernels (and the CUDA simulator), and from plain Python. Literals
are float32 on purpose: a bare `1.0` is float64 and would promote the whole
expression (FACTS.md), which costs time on GPUs and changes rounding.
"""
from __future__ import annotations

import math

from numba import float32
from numba.extending import register_jitable

# head activation codes (numba_cells.onnx_model.ACTIVATIONS)
ACT_NONE, ACT_SIGMOID, ACT_TANH, ACT_RELU, ACT_SOFTMAX, ACT_LOGSOFTMAX = 0, 1, 2, 3, 4, 5


@register_jitable
def sigmoid(x):
    # exp(-x) overflows to inf for x < -88 and 1/(1+inf) is exactly 0: no branch needed
    return float32(1.0) / (float32(1.0) + math.exp(-x))


@register_jitable
def tanh(x):
    return math.tanh(x)


@register_jitable
def lstm_unit(gi, go, gf, gc, c_prev, pi, po, pf):
    """One LSTM unit from its pre-activations (ONNX order i, o, f, c) -> (h, c).

    Peepholes pi/pf read the previous cell state, po the new one (ONNX spec);
    zero peepholes give the plain LSTM.
    """
    i = sigmoid(gi + pi * c_prev)
    f = sigmoid(gf + pf * c_prev)
    c = f * c_prev + i * tanh(gc)
    o = sigmoid(go + po * c)
    return o * tanh(c), c


@register_jitable
def gru_unit(z, n, h_prev):
    """GRU blend of the candidate n and the previous state by the update gate z."""
    return (float32(1.0) - z) * n + z * h_prev


@register_jitable
def activate(v, act):
    """Elementwise head activations; softmax is done over the row by the caller."""
    if act == ACT_SIGMOID:
        return sigmoid(v)
    if act == ACT_TANH:
        return tanh(v)
    if act == ACT_RELU:
        return v if v > float32(0.0) else float32(0.0)
    return v
