"""The activations a fused op applies after its normalization (and residual add), by name.

One spec, ``Activation(name, alpha)``, travels from the public functions (``act="silu"``, or the
module a model uses: ``act=nn.LeakyReLU(0.2)``) down to every kernel op, whose schemas carry it as
``str act, float alpha``. Forward and derivative are torch's own (aten's CPU / CUDA formulas):

  name          act(z)                                   d act / dz, from z (ReLU: from the output)
  none          z                                        1
  relu          z < 0 ? 0 : z                            out <= 0 ? 0 : 1   (aten threshold_backward)
  relu6         z < 0 ? 0 : z > 6 ? 6 : z                0 < z < 6 ? 1 : 0  (aten hardtanh_backward)
  leaky_relu    z > 0 ? z : alpha z                      z > 0 ? 1 : alpha
  silu          z / (1 + exp(-z))                        s (1 + z (1 - s)),  s = 1 / (1 + exp(-z))
  gelu          z/2 (1 + erf(z / sqrt 2))                (1 + erf(z / sqrt 2)) / 2 + z exp(-z^2 / 2) / sqrt(2 pi)
  gelu_tanh     z/2 (1 + tanh(k (z + 0.044715 z^3)))     k = sqrt(2 / pi); aten gelu_backward(approximate="tanh")
  hardswish     z min(max(z + 3, 0), 6) / 6              z <= -3 ? 0 : z >= 3 ? 1 : z / 3 + 1/2
  hardsigmoid   min(max(z + 3, 0), 6) / 6                -3 < z < 3 ? 1/6 : 0

NaN in gives NaN out, as torch's activations (a clamp that keeps NaN); a NaN z gets the derivative of
aten's vectorized CPU kernels on every backend (ReLU6, Hardsigmoid: 0; LeakyReLU: alpha; the others NaN;
ReLU reads the output: NaN passes the gradient), as Activation.backward, the reference, states it (aten's
scalar loops and CUDA kernels answer otherwise for ReLU6 and Hardswish). The backward of ReLU reads the
saved output (as aten's); every other activation's backward recomputes z from the saved input (and
residual) and reads it, as aten's backward formulas read the activation's input.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = ("none", "relu", "relu6", "leaky_relu", "silu", "gelu", "gelu_tanh", "hardswish", "hardsigmoid")

# activation modules by (module path, class name) -> name; nn.LeakyReLU carries its slope (below)
_MODULES = {
    ("torch.nn.modules.linear", "Identity"): "none",
    ("torch.nn.modules.activation", "ReLU"): "relu",
    ("torch.nn.modules.activation", "ReLU6"): "relu6",
    ("torch.nn.modules.activation", "LeakyReLU"): "leaky_relu",
    ("torch.nn.modules.activation", "SiLU"): "silu",
    ("torch.nn.modules.activation", "Hardswish"): "hardswish",
    ("torch.nn.modules.activation", "Hardsigmoid"): "hardsigmoid",
    # timm's own (timm.layers.activations / activations_me): the same functions
    ("timm.layers.activations", "Swish"): "silu",
    ("timm.layers.activations", "GELU"): "gelu",
    ("timm.layers.activations", "GELUTanh"): "gelu_tanh",
    ("timm.layers.activations", "HardSwish"): "hardswish",
    ("timm.layers.activations", "HardSigmoid"): "hardsigmoid",
    ("timm.layers.activations_me", "SwishMe"): "silu",
    ("timm.layers.activations_me", "HardSwishMe"): "hardswish",
    ("timm.layers.activations_me", "HardSigmoidMe"): "hardsigmoid",
    # Hugging Face transformers' (ACT2FN["gelu"], ["silu"], ["gelu_pytorch_tanh"], ["linear"])
    ("transformers.activations", "GELUActivation"): "gelu",
    ("transformers.activations", "SiLUActivation"): "silu",
    ("transformers.activations", "GELUTanh"): "gelu_tanh",
    ("transformers.activations", "LinearActivation"): "none",
}


class Activation(NamedTuple):
    """An activation by name (one of ACTIVATIONS) and its parameter (LeakyReLU's negative slope, else 0)."""

    name: str = "relu"
    alpha: float = 0.0

    @property
    def is_identity(self) -> bool:
        return self.name == "none"

    @property
    def backward_reads_output(self) -> bool:
        """ReLU's derivative comes from the saved output."""
        return self.name == "relu"

    @property
    def backward_reads_input(self) -> bool:
        """Every other non-identity activation's derivative comes from its input z (recomputed)."""
        return self.name not in ("relu", "none")

    def __call__(self, z: Tensor) -> Tensor:
        """act(z) with torch's functions (differentiable): the eager form every kernel reproduces."""
        name = self.name
        if name == "none":
            return z
        if name == "relu":
            return torch.relu(z)
        if name == "relu6":
            return F.hardtanh(z, 0.0, 6.0)
        if name == "leaky_relu":
            return F.leaky_relu(z, self.alpha)
        if name == "silu":
            return F.silu(z)
        if name in ("gelu", "gelu_tanh"):
            return F.gelu(z, approximate="tanh" if name == "gelu_tanh" else "none")
        if name == "hardswish":
            return F.hardswish(z)
        return F.hardsigmoid(z)

    def backward(self, grad: Tensor, z: Tensor) -> Tensor:
        """grad * d act / dz at z, by aten's backward kernels (the reference the fused backwards match), and
        at a NaN z the value of the table above (aten's answer there depends on which of its loops ran)."""
        aten, name = torch.ops.aten, self.name
        if name in ("none", "relu"):  # relu(z) > 0 <=> z > 0; NaN passes the gradient
            return grad if name == "none" else aten.threshold_backward(grad, z, 0)
        if name == "relu6":
            dz = aten.hardtanh_backward(grad, z, 0.0, 6.0)
        elif name == "leaky_relu":
            dz = aten.leaky_relu_backward(grad, z, self.alpha, False)
        elif name == "silu":
            dz = aten.silu_backward(grad, z)
        elif name in ("gelu", "gelu_tanh"):
            dz = aten.gelu_backward(grad, z, approximate="tanh" if name == "gelu_tanh" else "none")
        elif name == "hardswish":
            dz = aten.hardswish_backward(grad, z)
        else:
            dz = aten.hardsigmoid_backward(grad, z)
        at_nan = {"relu6": 0.0, "hardsigmoid": 0.0, "leaky_relu": grad * self.alpha}.get(name, float("nan"))
        return torch.where(z.isnan(), at_nan, dz)

    def module(self) -> nn.Module:
        """The nn module computing this activation (eager twins of fused modules)."""
        if self.name == "leaky_relu":
            return nn.LeakyReLU(self.alpha)
        if self.name in ("gelu", "gelu_tanh"):
            return nn.GELU(approximate="tanh" if self.name == "gelu_tanh" else "none")
        return {"none": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "hardswish": nn.Hardswish,
                "hardsigmoid": nn.Hardsigmoid}[self.name]()

    def __str__(self) -> str:
        return f"leaky_relu({self.alpha:g})" if self.name == "leaky_relu" else self.name


RELU = Activation("relu")
IDENTITY = Activation("none")


def module_activation(m) -> Activation | None:
    """The Activation an activation module computes, or None when it is not one the kernels know
    (an nn.Hardtanh other than (0, 6), a PReLU, an unknown class, ...)."""
    if m is None:
        return IDENTITY
    name = _MODULES.get((type(m).__module__, type(m).__name__))
    if name is None:
        if type(m) is nn.Hardtanh and (m.min_val, m.max_val) == (0.0, 6.0):
            return Activation("relu6")
        if type(m) is nn.GELU:
            return Activation("gelu_tanh" if m.approximate == "tanh" else "gelu")
        return None
    return Activation(name, float(m.negative_slope) if name == "leaky_relu" else 0.0)


def activation(act) -> Activation:
    """The Activation `act` names: an Activation, a name in ACTIVATIONS, an activation module
    (nn.ReLU, nn.LeakyReLU(0.2), nn.GELU(approximate="tanh"), timm's ...), None (none), or a bool
    (True: ReLU, False: none, the meaning of the ``relu`` flag this argument replaced)."""
    if isinstance(act, Activation):
        if act.name not in ACTIVATIONS:
            raise ValueError(f"resnet_fused: unknown activation {act.name!r}; known: {', '.join(ACTIVATIONS)}")
        return act
    if act is None or act is False:
        return IDENTITY
    if act is True:
        return RELU
    if isinstance(act, str):
        if act not in ACTIVATIONS:
            raise ValueError(f"resnet_fused: unknown activation {act!r}; known: {', '.join(ACTIVATIONS)}")
        return Activation(act, 0.01 if act == "leaky_relu" else 0.0)  # nn.LeakyReLU's default slope
    if isinstance(act, nn.Module):
        spec = module_activation(act)
        if spec is None:
            raise ValueError(f"resnet_fused: {type(act).__module__}.{type(act).__name__} is not an activation the fused "
                             f"kernels compute; known: {', '.join(ACTIVATIONS)} (and their nn / timm modules)")
        return spec
    raise TypeError(f"resnet_fused: an activation is a name ({', '.join(ACTIVATIONS)}), an activation module, an "
                    f"Activation, None or a bool; got {type(act).__name__}")
