"""CPU inference through oneDNN's fused convolution: the bias, the residual add and the ReLU ride on the
convolution as post-ops (what Inductor's CPU backend emits), so its output is written once; and the
weight prepacked once into oneDNN's blocked layout (what Inductor's CPU freezing does)."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from resnet_fused import backends
from resnet_fused._layout import pair
from resnet_fused.activations import Activation
from resnet_fused.ops._checks import check_residual_of_conv

# oneDNN's fused convolution has a fixed cost per call of ~40 us (2 AVX2 cores, prepacked weight: 56 us
# at 1x8x4x4 -> 8 channels 3x3, against 14 us for aten conv + relu; about even at 1x64x14x14 with a
# ReLU, and ahead there with a residual). Below this many outputs (at stride 1) aten's conv runs.
MIN_OUTPUT = 1 << 13

# each activation as oneDNN's eltwise post-op: (unary_attr, scalars, algorithm) of mkldnn._convolution_pointwise
_POST_OPS = {
    "none": ("none", [], ""), "relu": ("relu", [], ""), "relu6": ("hardtanh", [0.0, 6.0], ""),
    "leaky_relu": ("leaky_relu", None, ""), "silu": ("swish", [], ""), "gelu": ("gelu", [], "none"),
    "gelu_tanh": ("gelu", [], "tanh"), "hardswish": ("hardswish", [], ""), "hardsigmoid": ("hardsigmoid", [], ""),
}


@functools.cache
def runs(dtype: torch.dtype) -> bool:
    """Whether oneDNN's fused convolution runs `dtype` on this CPU at its jit kernels' speed: fp32 wherever oneDNN is
    built in; bf16 where oneDNN's bf16 ISA is there (AVX-512 and up: torch.ops.mkldnn._is_mkldnn_bf16_supported, which
    honours ONEDNN_MAX_CPU_ISA; below it oneDNN would run bf16 on its reference kernels). fp16 is left to aten's conv:
    untested on a CPU with AVX512-FP16 / AMX-FP16."""
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def applies(input: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None, backend: str | None) -> bool:
    """oneDNN's fused convolution computes conv_act here: CPU, a dtype it runs (runs), and no gradient needed (it is
    not differentiable)."""
    return (
        input.device.type == "cpu"
        and backends.resolve(backend, input) == "cpu"
        and runs(input.dtype)
        and weight.dtype == input.dtype
        and (bias is None or bias.dtype == input.dtype)  # its add post-op takes the bias in the input's dtype
        and (residual is None or residual.dtype == input.dtype)
        and not torch.is_autocast_enabled("cpu")
        and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias, residual)))
    )


def onednn_inference(input: Tensor, weight: Tensor, bias: Tensor | None = None, residual: Tensor | None = None,
                     backend: str | None = None) -> bool:
    """Whether conv_act runs oneDNN's convolution with post-ops here (and so can use a prepacked weight):
    where it can run (applies) and pays (at least MIN_OUTPUT outputs), or as a tuner's Variant says."""
    if torch.compiler.is_compiling():  # Inductor lowers the plain conv + epilogue to oneDNN itself
        return False
    forced = backends.variant().onednn
    large = input.numel() // max(input.shape[1], 1) * weight.shape[0] >= MIN_OUTPUT
    return (large if forced is None else forced) and applies(input, weight, bias, residual, backend)


def prepack_conv_weight(weight: Tensor, stride, padding, dilation, groups: int, input_shape) -> Tensor:
    """``weight`` reordered once into oneDNN's blocked layout for inputs of ``input_shape``: conv_act then
    skips the per-call reorder, which costs most where weights are large and activations small (ResNet's
    last stages). CPU, a dtype oneDNN runs (runs); for conv_act only."""
    return torch._C._nn.mkldnn_reorder_conv2d_weight(weight.detach().to_mkldnn(), list(pair(padding)), list(pair(stride)),
                                                     list(pair(dilation)), groups, list(input_shape))


def conv_act(input: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int,
             residual: Tensor | None, act: Activation) -> Tensor:
    """act(conv2d(input, weight, bias) (+ residual)) in one oneDNN call; weight dense or prepacked. With a
    residual oneDNN fuses ReLU alone after the add: another activation then takes one pass of its own."""
    stride, padding, dilation = list(pair(stride)), list(pair(padding)), list(pair(dilation))
    ops = torch.ops.mkldnn._convolution_pointwise
    unary, scalars, algorithm = _POST_OPS[act.name]
    scalars = [act.alpha] if scalars is None else scalars
    if residual is None:
        return ops(input, weight, bias, padding, stride, dilation, groups, unary, scalars, algorithm)
    check_residual_of_conv(residual, input, weight, stride, padding, dilation, "conv_act")
    relu = act.name == "relu"
    if relu and input.dtype != torch.float32 and not (weight.is_mkldnn and groups == 1):
        # aten fuses the add for groups == 1 and a prepacked weight (or a channels_last pair); otherwise it runs the
        # conv, then for a ReLU at::add_relu_, which has no bf16 kernel: the add + ReLU is then ours
        return ops(input, weight, bias, padding, stride, dilation, groups, "none", [], "").add_(residual).relu_()
    out = ops.binary(input, residual, weight, bias, padding, stride, dilation, groups, "add", 1.0,
                     "relu" if relu else None, [], "")
    return out if relu or act.is_identity else act(out)
