"""The `cuda` backend's inference decisions that need no GPU (resnet_fused/ops/cudnn.py): where cuDNN's
fused conv + add + bias + ReLU has an engine (cudnn_fuses, a function of shapes, dtype, layout, groups and
TF32); everywhere else conv_act runs cuDNN's conv and the epilogue pass. tests/gpu/test_gpu_cudnn.py
runs both paths, and every shape cudnn_fuses admits, on a GPU; the epilogue path runs here on CPU tensors."""

import pytest
import torch
import torch.nn.functional as F

from helpers import FORMATS, activation, assert_within_eager_error, needs_extension
from resnet_fused import backends
from resnet_fused.activations import activation as activation_spec
from resnet_fused.ops import cudnn
from resnet_fused.ops.cudnn import cudnn_fuses

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


@pytest.mark.parametrize("input_shape,weight_shape,dtype,channels_last,groups,tf32,fuses", [
    ((8, 64, 56, 56), (64, 64, 3, 3), F16, True, 1, True, True),  # a ResNet stage conv, NHWC
    ((8, 64, 56, 56), (256, 64, 1, 1), BF16, True, 1, False, True),  # TF32 matters only for fp32
    ((3, 96, 9, 9), (40, 96, 1, 1), F16, True, 1, True, True),  # 40 = 5 x 8
    ((8, 3, 224, 224), (64, 3, 7, 7), F16, True, 1, True, False),  # the RGB stem: Cin = 3
    ((8, 3, 224, 224), (64, 3, 7, 7), F32, True, 1, True, False),
    ((8, 128, 28, 28), (128, 4, 3, 3), BF16, True, 32, True, False),  # ResNeXt's grouped 3x3
    ((8, 64, 56, 56), (64, 64, 3, 3), F16, False, 1, True, False),  # NCHW
    ((2, 24, 10, 10), (20, 24, 3, 3), F16, True, 1, True, False),  # Cout = 20: not a multiple of 8
    ((2, 24, 10, 10), (20, 24, 3, 3), F32, True, 1, True, True),  # ... but of 4 (TF32)
    ((2, 24, 10, 10), (20, 24, 3, 3), F32, True, 1, False, False),  # IEEE fp32: no fused engine
    ((2, 64, 8, 8), (64, 64, 3, 3), F64, True, 1, True, False),
])
def test_cudnn_fuses(input_shape, weight_shape, dtype, channels_last, groups, tf32, fuses):
    assert cudnn_fuses(input_shape, weight_shape, dtype, channels_last, groups, tf32) is fuses


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("bias,residual,relu", [(True, False, True), (True, True, True), (True, False, False),
                                                (True, True, False), (False, True, True), (False, False, True)])
def test_conv_then_epilogue_composition(bias, residual, relu, fmt, dtype):
    """cudnn.conv_act's path where cuDNN does not fuse (the conv without bias, then one bn_act_apply pass with
    scale 1 and the bias as shift), run here on CPU tensors: the C++ kernel op dispatches on the device.
    Against eager's conv (+ bias) (+ residual) (+ ReLU) under the eager-error rule, the eager layout."""
    x = activation((3, 5, 9, 7), dtype, fmt)
    w = (torch.randn(6, 5, 3, 3) / 45 ** 0.5).to(dtype).contiguous(memory_format=fmt)
    b = torch.randn(6).to(dtype) if bias else None
    r = activation((3, 6, 5, 4), dtype, fmt) if residual else None

    def eager(x, w, b, r):
        y = F.conv2d(x, w, b, 2, 1)
        y = y + r if r is not None else y
        return torch.relu(y) if relu else y

    with backends.use_variant(backends.Variant(cudnn_fused=False)):
        out = cudnn.conv_act(x, w, b, (2, 2), (1, 1), (1, 1), 1, r, activation_spec(relu))
    e = eager(x, w, b, r)
    assert out.is_contiguous(memory_format=fmt) and e.is_contiguous(memory_format=fmt)
    assert_within_eager_error(out, e, eager(*(t.double() if t is not None else None for t in (x, w, b, r))), "conv + epilogue")


@pytest.mark.parametrize("input_shape,weight_shape,dtype,channels_last,groups,act,bias,residual,fuses", [
    ((8, 64, 56, 56), (64, 64, 3, 3), F16, True, 1, "relu", True, False, True),  # a block's conv1, BN folded
    ((8, 64, 56, 56), (256, 64, 1, 1), BF16, True, 1, "none", True, False, True),  # a projection shortcut
    ((8, 64, 56, 56), (64, 64, 3, 3), F16, True, 1, "relu", False, False, True),  # ReLU alone
    ((8, 64, 56, 56), (64, 64, 3, 3), F16, True, 1, "none", True, True, True),  # bias + residual, no activation
    ((8, 64, 56, 56), (64, 64, 3, 3), F16, True, 1, "none", False, False, False),  # nothing to fuse: the conv
    ((8, 64, 56, 56), (64, 64, 3, 3), F16, True, 1, "silu", True, False, True),  # SiLU: cuDNN's SWISH_FWD
    ((8, 64, 56, 56), (64, 64, 3, 3), BF16, True, 1, "gelu", False, False, True),  # an activation alone
    ((8, 64, 56, 56), (64, 64, 3, 3), F16, True, 1, "hardswish", True, False, False),  # an activation cuDNN lacks
    ((8, 3, 224, 224), (64, 3, 7, 7), F16, True, 1, "relu", True, False, False),  # the RGB stem: Cin = 3
    ((8, 128, 28, 28), (128, 4, 3, 3), F16, True, 32, "relu", True, False, False),  # grouped
    ((8, 64, 56, 56), (64, 64, 3, 3), F16, False, 1, "relu", True, False, False),  # NCHW
    ((2, 24, 10, 10), (20, 24, 3, 3), F16, True, 1, "relu", True, False, False),  # Cout = 20
    ((2, 64, 8, 8), (64, 64, 3, 3), F32, True, 1, "relu", True, False, False),  # fp32: today's passes
])
def test_graph_fuses(input_shape, weight_shape, dtype, channels_last, groups, act, bias, residual, fuses, monkeypatch):
    """Where conv_act_stage's fused_conv may take our conv + epilogue cuDNN graph (the C++ rule, conv_act_graph's):
    with the graphs on only; the tensors stand in for the stage's dtype and layout."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(input_shape, dtype=dtype).contiguous(memory_format=fmt)
    w = torch.empty(weight_shape, dtype=dtype).contiguous(memory_format=fmt)
    spec = activation_spec(act)
    monkeypatch.setattr(cudnn, "graphs_enabled", lambda: True)
    assert cudnn.graph_fuses(input_shape, x, w, spec, groups, bias, residual) is fuses
    monkeypatch.setattr(cudnn, "graphs_enabled", lambda: False)
    assert cudnn.graph_fuses(input_shape, x, w, spec, groups, bias, residual) is False
