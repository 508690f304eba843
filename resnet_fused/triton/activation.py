"""The activations of resnet_fused/activations.py in Triton: act(z) and grad * act'(z) in fp32.

A kernel takes the activation as a constexpr code, ACT = act_code(name) (one specialization per
activation), and LeakyReLU's slope as a runtime fp32 scalar alpha. The formulas are aten's (the table
in resnet_fused/activations.py), NaN in giving NaN out: a clamp is where(z < lo, lo, where(z > hi, hi, z)),
never tl.minimum / tl.maximum, which drop a NaN. One rewrite: Triton has no tanh that also runs in the
interpreter, so gelu_tanh uses (1 + tanh u) / 2 = s = sigmoid(2u) and 1 - tanh(u)^2 = 4 s (1 - s):

    gelu_tanh(z) = z s,   d/dz = s + 2 z s (1 - s) k (1 + 3 kappa z^2),   u = k (z + kappa z^3), k = sqrt(2 / pi)

with s and s (1 - s) from a = exp(-2|u|) in (0, 1] (_gelu_tanh_sigmoid): exact identities, computed
without overflow and without the cancellation of 1 + tanh u (u << 0) or 1 - tanh(u)^2 (|u| >> 0).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..activations import ACTIVATIONS

_CODES = {name: i for i, name in enumerate(ACTIVATIONS)}
NONE = tl.constexpr(_CODES["none"])
RELU = tl.constexpr(_CODES["relu"])
RELU6 = tl.constexpr(_CODES["relu6"])
LEAKY_RELU = tl.constexpr(_CODES["leaky_relu"])
SILU = tl.constexpr(_CODES["silu"])
GELU = tl.constexpr(_CODES["gelu"])
GELU_TANH = tl.constexpr(_CODES["gelu_tanh"])
HARDSWISH = tl.constexpr(_CODES["hardswish"])
HARDSIGMOID = tl.constexpr(_CODES["hardsigmoid"])

_SQRT1_2 = tl.constexpr(0.70710678118654752440)  # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.39894228040143267794)  # 1 / sqrt(2 pi)
_SQRT_2_OVER_PI = tl.constexpr(0.79788456080286535588)  # sqrt(2 / pi)
_KAPPA = tl.constexpr(0.044715)  # the tanh approximation's cubic term
# (a constexpr times a tensor is a constexpr in the interpreter, which tl.exp rejects: tensors go first)


def act_code(op: str, act: str) -> int:
    """The constexpr code of the activation named `act`; `op` names the op in the error."""
    code = _CODES.get(act)
    if code is None:
        raise RuntimeError(f"{op}: unknown activation {act!r}; known: {', '.join(ACTIVATIONS)}")
    return code


@triton.jit
def _clamp(z, lo, hi):
    # min(max(z, lo), hi), NaN kept
    return tl.where(z < lo, lo, tl.where(z > hi, hi, z))


@triton.jit
def _gelu_tanh_sigmoid(z):
    # (s, s (1 - s)), s = (1 + tanh u) / 2 = sigmoid(2u), u = k (z + kappa z^3): with a = exp(-2|u|),
    # s = 1 / (1 + a) for u >= 0, a / (1 + a) below, and s (1 - s) = a / (1 + a)^2 either way
    u = (z + z * z * z * _KAPPA) * _SQRT_2_OVER_PI
    a = tl.exp(-2.0 * tl.abs(u))
    r = 1.0 / (1.0 + a)
    return tl.where(u >= 0, r, a * r), a * r * r


@triton.jit
def act_fwd(z, ACT: tl.constexpr, alpha):
    # act(z), z fp32
    if ACT == RELU:
        return tl.where(z < 0, 0.0, z)
    elif ACT == RELU6:
        return _clamp(z, 0.0, 6.0)
    elif ACT == LEAKY_RELU:
        return tl.where(z > 0, z, z * alpha)
    elif ACT == SILU:
        return z / (1.0 + tl.exp(-z))
    elif ACT == GELU:
        return z * 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2))
    elif ACT == GELU_TANH:
        s, _ = _gelu_tanh_sigmoid(z)
        return z * s
    elif ACT == HARDSWISH:
        return z * _clamp(z + 3.0, 0.0, 6.0) / 6.0
    elif ACT == HARDSIGMOID:
        return _clamp(z + 3.0, 0.0, 6.0) / 6.0
    else:
        return z


@triton.jit
def act_grad(g, z, ACT: tl.constexpr, alpha):
    # g * act'(z), g and z fp32 (ReLU: z may be the output, relu(z) > 0 <=> z > 0), as aten's vectorized
    # CPU *_backward kernels, NaN z included (ReLU6, Hardsigmoid: 0; LeakyReLU: alpha g; ReLU: g; others: NaN)
    if ACT == RELU:
        return tl.where(z <= 0, 0.0, g)
    elif ACT == RELU6:
        return tl.where((z > 0) & (z < 6.0), g, 0.0)
    elif ACT == LEAKY_RELU:
        return tl.where(z > 0, g, g * alpha)
    elif ACT == SILU:
        s = 1.0 / (1.0 + tl.exp(-z))
        return g * s * (1.0 + z * (1.0 - s))
    elif ACT == GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2))
        pdf = tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
        return g * (cdf + z * pdf)
    elif ACT == GELU_TANH:
        s, s_1_s = _gelu_tanh_sigmoid(z)
        return g * (s + 2.0 * z * s_1_s * _SQRT_2_OVER_PI * (1.0 + z * z * (3.0 * _KAPPA)))
    elif ACT == HARDSWISH:
        return tl.where(z <= -3.0, 0.0, tl.where(z >= 3.0, g, g * (z / 3.0 + 0.5)))
    elif ACT == HARDSIGMOID:
        return tl.where((z > -3.0) & (z < 3.0), g / 6.0, 0.0)
    else:
        return g
