// The CUDA kernels of the kernel ops (csrc/ops.cpp), callable directly inside resnet_fused._C: bn_act.cu, bn_coeffs.cu.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string_view>
#include <tuple>

#include "bn_coeffs.h"

namespace resnet_fused::gpu {

using OptTensor = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& input);
// (mean, var, scale, shift): bn_stats, then bn_scale_shift, then update_running_cuda, in bn_stats's launches
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_stats_scale_shift_cuda(const at::Tensor& input,
                                                                                     const OptTensor& weight,
                                                                                     const OptTensor& bias, double eps,
                                                                                     const coeffs::Running& running);
at::Tensor bn_act_apply_cuda(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& shift, const OptTensor& residual,
                             std::string_view act, double alpha);
at::Tensor act_backward_cuda(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& scale, const at::Tensor& shift,
                             const OptTensor& residual, std::string_view act, double alpha);
std::tuple<at::Tensor, at::Tensor> bn_act_backward_reduce_cuda(const at::Tensor& grad_out, const at::Tensor& input,
                                                               const at::Tensor& mean, const OptTensor& output);
// (sum_dy, sum_dy_xmu, a, b, c, grad_weight): bn_act_backward_reduce, then bn_backward_coeffs, in the reduction's launches
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward_reduce_coeffs_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean, const OptTensor& output, const at::Tensor& var,
    const OptTensor& weight, double eps, double count, bool training);
std::tuple<at::Tensor, at::Tensor> bn_act_backward_elemt_cuda(const at::Tensor& grad_out, const OptTensor& output,
                                                              const OptTensor& input, const OptTensor& mean,
                                                              const at::Tensor& dy_scale, const OptTensor& x_scale,
                                                              const OptTensor& shift, bool need_grad_residual);
std::tuple<at::Tensor, at::Tensor> bn_scale_shift_cuda(const at::Tensor& mean, const at::Tensor& var, const OptTensor& weight,
                                                       const OptTensor& bias, double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_backward_coeffs_cuda(const at::Tensor& sum_dy,
                                                                                   const at::Tensor& sum_dy_xmu,
                                                                                   const at::Tensor& var, const OptTensor& weight,
                                                                                   double eps, double count, bool training);
// bn_backward_coeffs in training from sum dy xhat (xhat = (x - mean) invstd: cuDNN's dbn_weight dscale) in place of
// sum dy (x - mean): one launch
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_backward_coeffs_xhat_cuda(const at::Tensor& sum_dy,
                                                                                        const at::Tensor& sum_dy_xhat,
                                                                                        const at::Tensor& var,
                                                                                        const OptTensor& weight, double eps,
                                                                                        double count);
void bn_update_running_cuda(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean,
                            const at::Tensor& var, double count, std::optional<double> momentum, const OptTensor& momentum_tensor,
                            const OptTensor& num_batches_tracked);
// coeffs::Running's update as its steps (num_batches_tracked's += 1, then bn_update_running's kernel)
void update_running_cuda(const coeffs::Running& running, const at::Tensor& mean, const at::Tensor& var);

}  // namespace resnet_fused::gpu
