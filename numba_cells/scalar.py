"""Scalar gate math, written once for every target.

`register_jitable` makes each function callable from `@njit` CPU kernels, from
`@cuda.jit` kernels (and the CUDA simulator), and from plain Python. Literals
are float32 on purpose: a bare `1.0` is float64 and would promote the whole
expression (FACTS.md), which costs time on GPUs and changes rounding.

`exp32` is the one primitive with per-target code. On CUDA (and in plain
Python) it is `math.exp` (the GPU's fast intrinsic). On the CPU, libm's expf
is an opaque call that stops LLVM from vectorising the gate loops and cost
~11 ns per element here; the inlined version below vectorises to ~0.7 ns
with a relative error of ~1e-7 (float32 rounding is 6e-8), measured over
[-80, 80] against float64 numpy.
"""
from __future__ import annotations

import math

from llvmlite import ir
from numba import float32, int32, types
from numba.extending import intrinsic, overload, register_jitable

# head activation codes (numba_cells.onnx_model.ACTIVATIONS)
ACT_NONE, ACT_SIGMOID, ACT_TANH, ACT_RELU, ACT_SOFTMAX, ACT_LOGSOFTMAX = 0, 1, 2, 3, 4, 5

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693145751953125  # ln 2 split so that n * _LN2_HI is exact for |n| < 256
_LN2_LO = 1.428606765330187e-06
_ROUND = 12582912.0  # 1.5 * 2**23: adding and subtracting it rounds to the nearest integer


def exp32(x):
    """e**x; plain Python and the generic (CUDA) target use math.exp."""
    return math.exp(x)


@overload(exp32, target="generic")
def _exp32_generic(x):
    return lambda x: math.exp(x)


@intrinsic
def _float32_from_bits(typingctx, bits):
    """Reinterpret the low 32 bits of an integer as a float32 (CPU only)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if bits.bitwidth != 32:
            v = builder.trunc(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(bits), codegen


@overload(exp32, target="cpu")
def _exp32_cpu(x):
    def impl(x):
        # clamp so 2**n stays a normal float32; exp(-87) ~ 1.6e-38 is 0 for gates
        x = x if x > float32(-87.0) else float32(-87.0)
        x = x if x < float32(88.0) else float32(88.0)
        n = (x * float32(_LOG2E) + float32(_ROUND)) - float32(_ROUND)  # round(x / ln 2)
        f = x - n * float32(_LN2_HI) - n * float32(_LN2_LO)  # |f| <= ln2 / 2
        # Taylor to f**7: truncation error < 0.35**8 / 8! ~ 5e-9, below float32 rounding
        p = float32(1.0) + f * (float32(1.0) + f * (float32(0.5) + f * (
            float32(1.0 / 6.0) + f * (float32(1.0 / 24.0) + f * (float32(1.0 / 120.0) + f * (
                float32(1.0 / 720.0) + f * float32(1.0 / 5040.0)))))))
        return p * _float32_from_bits((int32(n) + 127) << 23)  # p * 2**n

    return impl


@register_jitable
def sigmoid(x):
    # exp(-x) grows to ~1.7e38 for x << 0 and 1/(1+that) rounds to ~0: no branch needed
    return float32(1.0) / (float32(1.0) + exp32(-x))


@register_jitable
def tanh(x):
    # odd form on |x| keeps exp's argument <= 0 (no overflow); absolute error ~6e-8
    e = exp32(float32(-2.0) * abs(x))
    r = (float32(1.0) - e) / (float32(1.0) + e)
    return r if x >= float32(0.0) else -r


@register_jitable
def lstm_cell_state(i, f, g, c_prev):
    """c = f * c_prev + i * g, gates already activated."""
    return f * c_prev + i * g


@register_jitable
def lstm_hidden_gated(o, c):
    """h = o * tanh(c), the output gate o already activated."""
    return o * tanh(c)


@register_jitable
def lstm_hidden(o_pre, c):
    """h = sigmoid(o) * tanh(c) from the output gate's pre-activation (peephole added)."""
    return lstm_hidden_gated(sigmoid(o_pre), c)


@register_jitable
def lstm_unit(gi, go, gf, gc, c_prev, pi, po, pf):
    """One LSTM unit from its pre-activations (ONNX order i, o, f, c) -> (h, c).

    Peepholes pi/pf read the previous cell state, po the new one (ONNX spec);
    zero peepholes give the plain LSTM. The CPU kernel runs the same helpers
    one phase at a time over whole rows (see cpu.py), the GPU per unit.
    """
    c = lstm_cell_state(sigmoid(gi + pi * c_prev), sigmoid(gf + pf * c_prev), tanh(gc), c_prev)
    return lstm_hidden(go + po * c, c), c


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
