// The per-channel coefficient ops on the CPU: bn_scale_shift and bn_update_running (forward) and
// bn_backward_coeffs (backward), one plain loop over the channels each (C is small: a few thousand at most).
#include <torch/library.h>

#include "bn_coeffs.h"
#include "cpu/kernels.h"

namespace resnet_fused::cpu {
namespace {

template <class F>
void for_each_channel(const F& f, int64_t C) {
  for (int64_t c = 0; c < C; ++c) f(c);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> bn_scale_shift(const at::Tensor& mean, const at::Tensor& var,
                                                  const std::optional<at::Tensor>& weight,
                                                  const std::optional<at::Tensor>& bias, double eps) {
  check_bn_scale_shift(mean, var, weight, bias);
  return coeffs::bn_scale_shift(mean, var, weight, bias, eps,
                                [](const coeffs::ScaleShift& f, int64_t C) { for_each_channel(f, C); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_backward_coeffs(
    const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    double eps, double count, bool training) {
  check_bn_backward_coeffs(sum_dy, sum_dy_xmu, var, weight);
  return coeffs::bn_backward_coeffs(sum_dy, sum_dy_xmu, var, weight, eps, count, training,
                                    [](const coeffs::BackwardCoeffs& f, int64_t C) { for_each_channel(f, C); });
}

void bn_update_running(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean,
                       const at::Tensor& var, double count, std::optional<double> momentum,
                       const std::optional<at::Tensor>& momentum_tensor, const std::optional<at::Tensor>& num_batches_tracked) {
  check_bn_update_running(running_mean, running_var, mean, var, momentum, momentum_tensor, num_batches_tracked);
  coeffs::bn_update_running(running_mean, running_var, mean, var, count, momentum, momentum_tensor, num_batches_tracked,
                            [](const coeffs::RunningUpdate& f, int64_t C) { for_each_channel(f, C); });
}

void update_running(const coeffs::Running& running, const at::Tensor& mean, const at::Tensor& var) {
  coeffs::update_running(running, mean, var, [](const coeffs::RunningUpdate& f, int64_t C) { for_each_channel(f, C); });
}

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("bn_scale_shift", &bn_scale_shift);
  m.impl("bn_update_running", &bn_update_running);
  m.impl("bn_backward_coeffs", &bn_backward_coeffs);
}

}  // namespace resnet_fused::cpu
