// Every resnet_fused kernel-op schema, in one place. Kernels live in cpu/*.cpp and cuda/*.cu; fake
// (meta) kernels in resnet_fused/_kernel_fakes.py (set_python_module below); the differentiable ops
// built on these are in resnet_fused/ops/; the math of each op is written out in plain PyTorch in
// resnet_fused/reference.py.
#include <torch/library.h>

#include "python_module.h"

RF_PYTHON_MODULE()  // resnet_fused._C: these schemas, and the CUDA kernels when built with them

TORCH_LIBRARY(resnet_fused, m) {
  m.set_python_module("resnet_fused._kernel_fakes");
  // relu(input + residual)
  m.def("add_relu_forward(Tensor input, Tensor residual) -> Tensor");
  // per-channel (mean, biased variance) over N, H, W, fp32
  m.def("bn_stats(Tensor input) -> (Tensor mean, Tensor var)");
  // act(input * scale[c] + shift[c] (+ residual)), act = relu if relu else identity
  m.def("bn_act_apply(Tensor input, Tensor scale, Tensor shift, Tensor? residual, bool relu) -> Tensor");
  // (sum dy, sum dy * (input - mean)) per channel, dy = grad_out, 0 where output <= 0 (output=None: no relu)
  m.def("bn_act_backward_reduce(Tensor grad_out, Tensor input, Tensor mean, Tensor? output) -> (Tensor sum_dy, Tensor sum_dy_xmu)");
  // grad_input = dy * dy_scale[c] (+ (input - mean[c]) * x_scale[c] + shift[c]); grad_residual = dy if need_grad_residual
  m.def("bn_act_backward_elemt(Tensor grad_out, Tensor? output, Tensor? input, Tensor? mean, Tensor dy_scale, Tensor? x_scale, Tensor? shift, bool need_grad_residual) -> (Tensor grad_input, Tensor grad_residual)");
  // scale = weight / sqrt(var + eps), shift = bias - mean * scale per channel (weight None: 1, bias None: 0); fp64 math, fp32 out
  m.def("bn_scale_shift(Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps) -> (Tensor scale, Tensor shift)");
  // a = weight * invstd, b = -a invstd^2 sum_dy_xmu / count, c = -a sum_dy / count (eval: b = c = 0), grad_weight = sum_dy_xmu * invstd
  m.def("bn_backward_coeffs(Tensor sum_dy, Tensor sum_dy_xmu, Tensor var, Tensor? weight, float eps, float count, bool training) -> (Tensor a, Tensor b, Tensor c, Tensor grad_weight)");
}
