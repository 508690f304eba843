// Every resnet_fused schema, in one place. Kernels live in cpu/*.cpp and cuda/*.cu; fake (meta)
// kernels and autograd formulas are registered in Python (resnet_fused/functional.py); the math of
// each op is written out in plain PyTorch in resnet_fused/reference.py.
#include <torch/library.h>

#include "python_module.h"

RF_PYTHON_MODULE()  // resnet_fused._C: these schemas, and the CUDA kernels when built with them

TORCH_LIBRARY(resnet_fused, m) {
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
}
