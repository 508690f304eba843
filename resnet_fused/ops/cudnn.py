"""CUDA inference on the `cuda` backend, BN folded: cuDNN's convolution, then the bias, the residual add
and the ReLU in one pass of our epilogue kernel; or all of it in one cuDNN call: conv + add + bias +
ReLU (``resnet_fused::cudnn_conv_add_relu``, aten's) where a block's residual joins and cuDNN has an
engine, and with the cuDNN graphs on (set_graphs) our graph of the conv with its bias (+ residual)
(+ activation) elsewhere (conv_act_stage's fused_conv, csrc/cudnn_graphs.h: conv_act_graph).

aten has no such call for conv + bias + ReLU alone: its ``cudnn_convolution_relu`` is its add + ReLU
graph with alpha = 0 and the output's own uninitialized memory as the addend (aten/src/ATen/native/
cudnn/ConvShared.cpp; the graph in Conv_v8.cpp adds alpha * z as a pointwise operand): one more read of
an output-sized tensor, and 0 * NaN = NaN wherever that memory held a NaN. Without our graph that case
runs the conv and the epilogue pass."""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

from resnet_fused import backends
from resnet_fused._layout import conv_output_shape
from resnet_fused.activations import Activation
from resnet_fused.ops._autocast import lower_precision_fp
from resnet_fused.ops._checks import check_residual_of_conv, residual_for
from resnet_fused.ops.kernels import bias_act

# cuDNN's runtime-fusion engines (the ones that take a conv + pointwise graph) read and write 16-byte channel
# vectors of NHWC tensors: channel counts a multiple of 8 in fp16 / bf16; fp32 runs on their tensor-core
# (TF32) engines only, 4 channels per vector
CHANNEL_MULTIPLE = {torch.float16: 8, torch.bfloat16: 8, torch.float32: 4}


def padded_channels(in_channels: int, groups: int, dtype: torch.dtype) -> int:
    """The input channels a convolution runs on under a tuner's Variant(pad_channels=True): in_channels rounded up to
    a multiple of CHANNEL_MULTIPLE[dtype] (the RGB stem: 3 -> 8 in fp16 / bf16, 3 -> 4 in fp32), input and weight
    zero-padded (the padded channels add 0 * 0 to every output); in_channels where grouped."""
    multiple = CHANNEL_MULTIPLE.get(dtype)
    return in_channels if groups != 1 or multiple is None else -(-in_channels // multiple) * multiple


def cudnn_fuses(input_shape, weight_shape, dtype: torch.dtype, channels_last: bool, groups: int, allow_tf32: bool) -> bool:
    """Whether cuDNN has a fused conv + add + bias + ReLU engine for a convolution of input (N, Cin, H, W) with
    weight (Cout, Cin / groups, KH, KW) computing in `dtype` (cudnn_convolution_add_relu raises where none
    takes the graph): NHWC (`channels_last`: cuDNN's layout rule, input or weight channels_last), groups = 1,
    Cin and Cout multiples of CHANNEL_MULTIPLE[dtype], fp32 only with TF32 allowed. Not: the RGB stem
    (Cin = 3), grouped convolutions, NCHW, IEEE fp32; conv_act runs the conv and the epilogue pass there."""
    multiple = CHANNEL_MULTIPLE.get(dtype) if dtype != torch.float32 or allow_tf32 else None
    return (multiple is not None and channels_last and groups == 1 and len(input_shape) == 4
            and input_shape[1] % multiple == 0 and weight_shape[0] % multiple == 0)


def _channels_last(input: Tensor, weight: Tensor) -> bool:
    # cuDNN's layout rule (cudnn_conv_suggest_memory_format): channels_last if the input or the weight is
    return any(torch._prims_common.suggest_memory_format(t) == torch.channels_last for t in (input, weight))


def applies(input: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None, backend: str | None) -> bool:
    """conv_act runs here: 4-D CUDA tensors on the `cuda` backend, no gradient needed (neither the epilogue
    kernel nor cuDNN's fused call has a backward)."""
    return (input.is_cuda and input.dim() == 4 and backends.resolve(backend, input) == "cuda"
            and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias, residual))))


# the activations our conv + epilogue graph applies (csrc/cudnn/graphs.cpp, graph_act: cuDNN's pointwise modes)
GRAPH_ACTS = ("none", "relu", "relu6", "leaky_relu", "silu", "gelu", "gelu_tanh")


def graph_fuses(input_shape, x: Tensor, weight: Tensor, act: Activation, groups: int, bias: bool, residual: bool) -> bool:
    """Whether conv_act_stage's fused_conv may run our conv + bias (+ residual) (+ activation) graph for a convolution of an
    input of input_shape like x (dtype, layout) with `weight` (conv_act_graph's rule): the graphs on, something to fuse,
    act one of GRAPH_ACTS, groups 1, fp16 / bf16 channels_last input and weight, channels multiples of 8. cuDNN may still
    decline a signature (reported once): the stage then runs the conv and its epilogue pass."""
    cl = torch.channels_last
    return (graphs_enabled() and act.name in GRAPH_ACTS and (bias or residual or act.name != "none") and groups == 1
            and x.dtype in (torch.float16, torch.bfloat16) and weight.dtype == x.dtype and x.is_contiguous(memory_format=cl)
            and weight.is_contiguous(memory_format=cl) and input_shape[1] % 8 == 0 and weight.shape[0] % 8 == 0)


def _graph_call(input: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None, groups: int,
                act: Activation) -> bool:
    """conv_act_stage's graph computes this call (graph_fuses), one dtype throughout, no autocast, unless a tuner's Variant
    says no."""
    return (torch.backends.cudnn.enabled and backends.variant().cudnn_fused is not False
            and not torch.is_autocast_enabled("cuda") and (residual is None or residual.dtype == input.dtype)
            and graph_fuses(input.shape, input, weight, act, groups, bias is not None, residual is not None))


def _fused_call(input: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor, groups: int) -> bool:
    """cudnn_conv_add_relu computes this call: cuDNN enabled, an engine for it (cudnn_fuses), one dtype
    throughout (under autocast the op's rule casts input, weight and bias), unless a tuner's Variant says no."""
    autocast = torch.is_autocast_enabled("cuda")
    dtype = torch.get_autocast_dtype("cuda") if autocast else input.dtype
    return (torch.backends.cudnn.enabled and backends.variant().cudnn_fused is not False
            and residual.dtype == input.dtype and residual.device == input.device
            and (autocast or all(t is None or t.dtype == input.dtype for t in (weight, bias)))
            and cudnn_fuses(input.shape, weight.shape, dtype, _channels_last(input, weight), groups,
                            torch.backends.cudnn.allow_tf32))


def conv_act(input: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int,
             residual: Tensor | None, act: Activation) -> Tensor:
    """act(conv2d(input, weight) + bias (+ residual)) where applies(): with a residual and a ReLU where cuDNN
    fuses, one cuDNN call (the conv output written once); otherwise cuDNN's conv without bias (aten's conv
    adds a bias in a pass of its own), then one epilogue pass act(y * 1 + bias (+ residual)), fp32 math; with the
    cuDNN graphs on, our graph of the conv and that epilogue where it applies (_graph_call)."""
    if act.name == "relu" and residual is not None and _fused_call(input, weight, bias, residual, groups):
        check_residual_of_conv(residual, input, weight, stride, padding, dilation, "conv_act")
        return cudnn_conv_add_relu(input, weight, bias, residual, list(stride), list(padding), list(dilation), groups)
    if _graph_call(input, weight, bias, residual, groups, act):
        return torch.ops.resnet_fused.conv_act_stage(input, weight, bias, residual, list(stride), list(padding),
                                                     list(dilation), groups, act.name, act.alpha, True)
    y = torch.nn.functional.conv2d(input, weight, None, stride, padding, dilation, groups)
    residual = residual_for(residual, y, "conv_act")
    if bias is None and residual is None and act.name in ("none", "relu"):
        return torch.relu(y) if act.name == "relu" else y
    return bias_act(y, bias, residual, act, "cuda")  # the BN scale is in the folded weight already


# relu(conv(input, weight) + residual + bias) in one cuDNN call (aten's cudnn_convolution_add_relu, alpha 1: a
# conv + pointwise graph), so the conv output is written once. aten gives it neither autograd nor a fake
# kernel nor an autocast rule, hence this wrapper op with a fake, conv2d's autocast rule and no autograd.
@torch.library.custom_op("resnet_fused::cudnn_conv_add_relu", mutates_args=(), device_types="cuda")
def cudnn_conv_add_relu(input: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor, stride: list[int],
                        padding: list[int], dilation: list[int], groups: int) -> Tensor:
    return torch.cudnn_convolution_add_relu(input, weight, residual, 1.0, bias, stride, padding, dilation, groups)


@cudnn_conv_add_relu.register_fake
def _cudnn_conv_add_relu_fake(input, weight, bias, residual, stride, padding, dilation, groups):
    out = input.new_empty(conv_output_shape(input.shape, weight.shape, stride, padding, dilation))
    return out.contiguous(memory_format=torch.channels_last) if _channels_last(input, weight) else out


lower_precision_fp("cudnn_conv_add_relu", cast=(0, 1, 2, 3), device_types=("cuda",))


# ---- training: the statistics of a conv's output from cuDNN's genstats epilogue (csrc/cudnn/) ----
#
# conv_bn_act_stage in training on CUDA takes y's batch statistics from resnet_fused::conv_genstats, a cuDNN graph (conv
# with genstats), where csrc/conv_genstats.h's conv_genstats_route says so (fp16 / bf16, channels_last, groups 1, no conv
# bias, channels multiples of 8) and cuDNN builds the graph; bn_act_batch then takes no statistics pass over y. A block
# whose convs all qualify in fp16 (defers_bn_relu) also defers its inner BN + ReLU: conv_genstats's graph with the input
# BN + ReLU as its prologue. Off by default until a GPU run has checked it (RESNET_FUSED_CUDNN_GRAPHS=1, or
# set_graphs(True)).


def _extension():
    from resnet_fused import _C

    return _C


def graphs_built() -> bool:
    """Whether resnet_fused._C has the cuDNN graphs (built with CUDA and cudnn-frontend's headers: the `gpu` extra
    installed before the build)."""
    return backends.has_extension() and _extension().cudnn_graphs_built()


_graphs_on = False  # set_graphs's setting, mirrored here: plan keys read it on every block call


def graphs_enabled() -> bool:
    return _graphs_on


def set_graphs(enabled: bool) -> None:
    """Turn the cuDNN-graph statistics of training conv -> BN stages on or off, process-wide, from the next call."""
    if enabled and not graphs_built():
        why = backends.extension_error() or ("built without CUDA" if not backends.extension_has_cuda() else
                                             "built without cudnn-frontend's headers (pip install nvidia-cudnn-frontend, "
                                             "then rebuild)")
        raise RuntimeError(f"resnet_fused: the cuDNN graphs are not in this build of resnet_fused._C: {why}")
    global _graphs_on
    if backends.has_extension():
        _extension().cudnn_graphs_set_enabled(bool(enabled))
        _graphs_on = bool(enabled)


@contextlib.contextmanager
def graphs(enabled: bool = True):
    """set_graphs(enabled) inside the block, the setting before it restored after (benchmarks: one provider's calls)."""
    was = graphs_enabled()
    set_graphs(enabled)
    try:
        yield
    finally:
        set_graphs(was)


def defers_bn_relu(x: Tensor, convs) -> bool:
    """Whether a training block on the cuda backend defers its inner BN + ReLU into the next convolution (conv_genstats's
    graph with the input BN + ReLU as its prologue, DESIGN.md's data flow) by the rules: the graphs on, x fp16 (Hopper
    builds neither pattern in bf16, benchmarks/results/h200-2026-12-04-cudnn-graphs: there `tune` may still choose it)
    and channels_last, no autocast, every conv bias-free, groups 1, fp16 channels_last weights, channels multiples of 8.
    cuDNN may still decline a signature: conv_genstats then runs its passes, the activation written once."""
    cl = torch.channels_last
    return (x.is_cuda and x.dtype == torch.float16 and x.is_contiguous(memory_format=cl) and not torch.is_autocast_enabled("cuda")
            and graphs_enabled() and all(
                c.bias is None and c.groups == 1 and c.weight.dtype == torch.float16 and c.weight.is_contiguous(memory_format=cl)
                and c.in_channels % 8 == 0 and c.out_channels % 8 == 0 for c in convs))


def graph_report() -> list[tuple[str, str]]:
    """The graphs conv_genstats has tried in this process, first seen first: (signature, "" where cuDNN built it, else
    cuDNN's reason; that signature runs aten's conv, then bn_stats)."""
    return list(_extension().cudnn_graph_report()) if backends.has_extension() else []


if os.environ.get("RESNET_FUSED_CUDNN_GRAPHS", "0") == "1" and graphs_built():
    set_graphs(True)
