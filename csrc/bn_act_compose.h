// The stage kernels of csrc/ops.cpp that are several kernels in a row (bn_act_batch's and bn_act_running's forward,
// bn_act_backward), written once over a backend's kernel functions K and registered per backend
// (cpu/bn_act_stage.cpp, cuda/bn_act_stage.cpp): one dispatch per call, the kernels called directly after it.
// K: a struct of the backend's kernels, each with its kernel op's signature (csrc/ops.cpp); update_running(running,
// mean, var), bn_coeffs.h's Running update; and two sequences as one call, where a backend saves launches by fusing
// them (CUDA: the coefficients and the running update in the reduction's finalize launch, the count in its first):
//   bn_stats_scale_shift(input, weight, bias, eps, running) -> (mean, var, scale, shift)
//     = bn_stats, then bn_scale_shift, then update_running(running, mean, var)
//   bn_act_backward_reduce_coeffs(grad_out, input, mean, output, var, weight, eps, count, training)
//     -> (sum_dy, sum_dy_xmu, a, b, c, grad_weight)              = bn_act_backward_reduce, then bn_backward_coeffs
// The same math in Python, for the torch and Triton backends: resnet_fused/ops/_bn_math.py.
#pragma once
#include <ATen/ATen.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <tuple>

#include "activation.h"
#include "bn_coeffs.h"
#include "checks.h"

namespace resnet_fused::compose {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

// (act(batch_norm(input) + residual), batch mean, biased batch var): statistics (or the producer's batch_mean /
// batch_var), then scale = weight invstd, shift = bias - mean scale, then one apply pass; where given, the running
// statistics' update (coeffs::Running) in the statistics' step (K::bn_stats_scale_shift) or after the coefficients
template <class K>
std::tuple<Tensor, Tensor, Tensor> bn_act_batch(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                                const OptTensor& residual, double eps, std::string_view act, double alpha,
                                                const OptTensor& batch_mean, const OptTensor& batch_var,
                                                const OptTensor& running_mean, const OptTensor& running_var,
                                                std::optional<double> momentum, const OptTensor& momentum_tensor,
                                                const OptTensor& num_batches_tracked) {
  // everything checked before the running statistics or the counter move
  const char* op = "bn_act_batch";
  check_activation(input, op, "input");
  check_bn_vector(weight, input, op, "weight", "input");
  check_bn_vector(bias, input, op, "bias", "input");
  if (residual.has_value()) check_like(*residual, input, op, "residual", "input");
  parse_act(act, op);
  RF_CHECK(batch_mean.has_value() == batch_var.has_value(), op, "give both batch_mean and batch_var, or neither");
  check_bn_vector(batch_mean, input, op, "batch_mean", "input");
  check_bn_vector(batch_var, input, op, "batch_var", "input");
  check_running(input, running_mean, running_var, momentum, momentum_tensor, num_batches_tracked, op);
  const int64_t C = input.size(1);
  const coeffs::Running running{running_mean, running_var, momentum, momentum_tensor, num_batches_tracked,
                                C > 0 ? static_cast<double>(input.numel() / C) : 0.0};
  Tensor mean, var, scale, shift;
  if (batch_mean.has_value()) {
    mean = batch_mean->clone();  // an op's outputs may not alias its inputs
    var = batch_var->clone();
    std::tie(scale, shift) = K::bn_scale_shift(mean, var, weight, bias, eps);
    K::update_running(running, mean, var);
  } else {
    std::tie(mean, var, scale, shift) = K::bn_stats_scale_shift(input, weight, bias, eps, running);
  }
  // the counter moved in place below the ADInplaceOrView key: its version, which fold caches read, bumped here (the
  // running statistics' are not, as aten's batch_norm leaves theirs)
  if (num_batches_tracked.has_value()) torch::autograd::impl::bump_version(*num_batches_tracked);
  return {K::bn_act_apply(input, scale, shift, residual, act, alpha), mean, var};
}

// act(batch_norm(input) with the running statistics + residual)
template <class K>
Tensor bn_act_running(const Tensor& input, const Tensor& running_mean, const Tensor& running_var, const OptTensor& weight,
                      const OptTensor& bias, const OptTensor& residual, double eps, std::string_view act, double alpha) {
  const auto [scale, shift] = K::bn_scale_shift(running_mean, running_var, weight, bias, eps);
  return K::bn_act_apply(input, scale, shift, residual, act, alpha);
}

// (grad_input, grad_weight, grad_bias, grad_residual): the schema's math (csrc/ops.cpp) as grad_input = dy a + (x - mean) b + c,
//   a = w invstd; training: b = -a invstd^2 sum dy (x - mean) / M, c = -a sum dy / M; eval: b = c = 0
// in at most two passes: the reduction (sum dy, sum dy (x - mean)) where training or the parameters need it, then the
// elementwise pass; eval with no parameter gradient reads a = w invstd off bn_scale_shift and skips the reduction.
template <class K>
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_act_backward(const Tensor& grad_out, const Tensor& input, const Tensor& mean,
                                                           const Tensor& var, const OptTensor& weight, const OptTensor& output,
                                                           double eps, bool training, bool need_grad_input,
                                                           bool need_grad_params, bool need_grad_residual) {
  check_bn_act_backward(grad_out, input, mean, var, weight, output);
  const Tensor dy = dense(grad_out, layout_of(input));  // one layout for both passes
  const Tensor mean_f = mean.scalar_type() == at::kFloat ? mean : mean.to(at::kFloat);  // the passes read fp32 statistics
  Tensor grad_input, grad_weight, grad_bias, grad_residual, a, b, c;
  if (training || need_grad_params) {
    const int64_t C = input.size(1);
    const double count = C > 0 ? static_cast<double>(input.numel() / C) : 0.0;  // M = N H W
    Tensor sum_dy_xmu;
    std::tie(grad_bias, sum_dy_xmu, a, b, c, grad_weight) =
        K::bn_act_backward_reduce_coeffs(dy, input, mean_f, output, var, weight, eps, count, training);
  } else if (need_grad_input) {
    a = std::get<0>(K::bn_scale_shift(mean, var, weight, std::nullopt, eps));
  }
  if (need_grad_input && training) {
    std::tie(grad_input, grad_residual) = K::bn_act_backward_elemt(dy, output, input, mean_f, a, b, c, need_grad_residual);
  } else if (need_grad_input) {
    std::tie(grad_input, grad_residual) =
        K::bn_act_backward_elemt(dy, output, std::nullopt, std::nullopt, a, std::nullopt, std::nullopt, need_grad_residual);
  } else if (need_grad_residual) {  // d relu(z)/dz = (out > 0), NaN passing
    grad_residual = output.has_value() ? at::threshold_backward(dy, *output, 0) : dy.clone();
  }
  for (Tensor* t : {&grad_input, &grad_weight, &grad_bias, &grad_residual}) {
    if (!t->defined()) *t = at::empty({0}, grad_out.options());  // an output not asked for
  }
  return {grad_input, grad_weight, grad_bias, grad_residual};
}

}  // namespace resnet_fused::compose

// The composed stage kernels registered for dispatch key KEY (CPU, CUDA) over the backend's Kernels struct K.
#define RF_REGISTER_COMPOSED_STAGE_KERNELS(KEY, K)                          \
  TORCH_LIBRARY_IMPL(resnet_fused, KEY, m) {                                \
    m.impl("bn_act_batch", &::resnet_fused::compose::bn_act_batch<K>);       \
    m.impl("bn_act_running", &::resnet_fused::compose::bn_act_running<K>);   \
    m.impl("bn_act_backward", &::resnet_fused::compose::bn_act_backward<K>); \
  }
