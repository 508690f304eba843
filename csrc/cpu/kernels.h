// The CPU kernels of the kernel ops (csrc/ops.cpp), callable directly inside this module: bn_act.cpp, bn_coeffs.cpp.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string_view>
#include <tuple>

#include "bn_coeffs.h"

namespace resnet_fused::cpu {

using OptTensor = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor> bn_stats(const at::Tensor& input);
at::Tensor bn_act_apply(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& shift, const OptTensor& residual,
                        std::string_view act, double alpha);
at::Tensor act_backward(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& scale, const at::Tensor& shift,
                        const OptTensor& residual, std::string_view act, double alpha);
std::tuple<at::Tensor, at::Tensor> bn_act_backward_reduce(const at::Tensor& grad_out, const at::Tensor& input,
                                                          const at::Tensor& mean, const OptTensor& output);
std::tuple<at::Tensor, at::Tensor> bn_act_backward_elemt(const at::Tensor& grad_out, const OptTensor& output,
                                                         const OptTensor& input, const OptTensor& mean,
                                                         const at::Tensor& dy_scale, const OptTensor& x_scale,
                                                         const OptTensor& shift, bool need_grad_residual);
std::tuple<at::Tensor, at::Tensor> bn_scale_shift(const at::Tensor& mean, const at::Tensor& var, const OptTensor& weight,
                                                  const OptTensor& bias, double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_backward_coeffs(const at::Tensor& sum_dy,
                                                                              const at::Tensor& sum_dy_xmu,
                                                                              const at::Tensor& var, const OptTensor& weight,
                                                                              double eps, double count, bool training);
void bn_update_running(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean,
                       const at::Tensor& var, double count, std::optional<double> momentum, const OptTensor& momentum_tensor,
                       const OptTensor& num_batches_tracked);
// coeffs::Running's update as its steps (num_batches_tracked's += 1, then bn_update_running's loop)
void update_running(const coeffs::Running& running, const at::Tensor& mean, const at::Tensor& var);

}  // namespace resnet_fused::cpu
