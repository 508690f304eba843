"""The Triton launchers (resnet_fused/triton) as torch ops, ``resnet_fused::triton_*``, so that tracing
(torch.compile, opcheck) sees their fakes. Registered for every device: each launcher rejects, naming
its op, tensors on a device it cannot run on here (it takes CUDA; CPU only under TRITON_INTERPRET=1),
and launches on its tensors' CUDA device."""

from __future__ import annotations

import torch

from resnet_fused import _kernel_fakes as fakes
from resnet_fused._layout import conv_output_shape
from resnet_fused.triton import add_relu as _add_relu
from resnet_fused.triton import bn_act as _bn_act
from resnet_fused.triton import bn_coeffs as _bn_coeffs
from resnet_fused.triton import conv as _conv


def _op(name: str, launcher, fake, schema: str | None = None):
    op = torch.library.custom_op(f"resnet_fused::triton_{name}", launcher, mutates_args=(), schema=schema)
    op.register_fake(fake)
    return op


def _conv_bn_act_fake(input, weight, stride, padding, dilation, in_scale, in_shift, in_relu, out_scale, out_shift, residual,
                      act, alpha, stats):
    out = input.new_empty(conv_output_shape(input.shape, weight.shape, stride, padding, dilation))
    n = weight.shape[0] if stats else 0
    return out.contiguous(memory_format=torch.channels_last), input.new_empty(n, dtype=torch.float32), input.new_empty(n, dtype=torch.float32)


# the kernel ops (same names, signatures and fakes as the C++ ones)
add_relu_forward = _op("add_relu_forward", _add_relu.add_relu, fakes.add_relu_forward)
bn_stats = _op("bn_stats", _bn_act.bn_stats, fakes.bn_stats)
bn_act_apply = _op("bn_act_apply", _bn_act.bn_act_apply, fakes.bn_act_apply)
act_backward = _op("act_backward", _bn_act.act_backward, fakes.act_backward)
bn_act_backward_reduce = _op("bn_act_backward_reduce", _bn_act.bn_act_backward_reduce, fakes.bn_act_backward_reduce)
bn_act_backward_elemt = _op("bn_act_backward_elemt", _bn_act.bn_act_backward_elemt, fakes.bn_act_backward_elemt)
bn_scale_shift = _op("bn_scale_shift", _bn_coeffs.bn_scale_shift, fakes.bn_scale_shift)
bn_backward_coeffs = _op("bn_backward_coeffs", _bn_coeffs.bn_backward_coeffs, fakes.bn_backward_coeffs)

# act(conv2d(in_act(input * in_scale + in_shift), weight) * out_scale + out_shift (+ residual)) -> (out, mean, var)
fused_conv = _op("conv_bn_act", _conv.fused_conv, _conv_bn_act_fake, schema=(
    "(Tensor input, Tensor weight, int[2] stride, int[2] padding, int[2] dilation, Tensor? in_scale, Tensor? in_shift, "
    "bool in_relu, Tensor? out_scale, Tensor? out_shift, Tensor? residual, str act, float alpha, bool stats) "
    "-> (Tensor, Tensor, Tensor)"))
