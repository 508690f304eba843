// conv_bn_act_stage: act(batch_norm(conv2d(input)) (+ residual)) as one op call on the cpu and cuda backends:
// aten's convolution (cuDNN / oneDNN, with its own autograd), then bn_act_stage (bn_act_stage.cpp); in training on
// CUDA with the cuDNN graphs on, conv_genstats (the conv with the statistics in its epilogue) instead. With an input
// BN (the previous stage's BN + ReLU, deferred by conv_bn_defer_stage: that stage wrote its conv's raw output and
// statistics only), conv_genstats applies it as the conv loads its input. The Python twin, with the Triton routes,
// is resnet_fused/ops/conv_bn_act.py (and conv_stats.py for the deferred BN).
#include <torch/library.h>

#include <tuple>
#include <utility>

#include "bn_act_stage.h"
#include "checks.h"
#include "conv_genstats.h"
#include "kernel_ops.h"

namespace resnet_fused {
namespace {

using OptTensor = std::optional<at::Tensor>;

at::Tensor conv_bn_act_stage(const at::Tensor& input, const at::Tensor& conv_weight, const OptTensor& conv_bias,
                             const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& running_mean,
                             const OptTensor& running_var, const OptTensor& residual, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool training,
                             std::optional<double> momentum, const OptTensor& momentum_tensor, double eps, std::string_view act,
                             double alpha, const OptTensor& num_batches_tracked, const OptTensor& input_mean,
                             const OptTensor& input_var, const OptTensor& input_weight, const OptTensor& input_bias,
                             double input_eps) {
  const char* op = "conv_bn_act_stage";
  check_activation(input, op, "input");
  RF_CHECK(conv_weight.dim() == 4, op, "expected `conv_weight` of shape (Cout, Cin / groups, KH, KW), got ", conv_weight.sym_sizes());
  RF_CHECK(groups > 0 && conv_weight.sym_size(1) * groups == input.sym_size(1), op, "`conv_weight` ", conv_weight.sym_sizes(),
           " with groups=", groups, " expects ", conv_weight.sym_size(1) * groups, " input channels, `input` ", input.sym_sizes(),
           " has ", input.sym_size(1));
  RF_CHECK(conv_weight.scalar_type() == input.scalar_type() && conv_weight.device() == input.device(), op, "`conv_weight` is ",
           conv_weight.scalar_type(), " on ", conv_weight.device(), ", `input` is ", input.scalar_type(), " on ", input.device());
  if (conv_bias.has_value()) {
    RF_CHECK(conv_bias->dim() == 1 && conv_bias->sym_numel() == conv_weight.sym_size(0), op, "expected `conv_bias` of shape (",
             conv_weight.sym_size(0), "), one per output channel of `conv_weight` ", conv_weight.sym_sizes(), ", got ", conv_bias->sym_sizes());
  }
  const bool input_bn = input_mean.has_value() || input_var.has_value() || input_weight.has_value() || input_bias.has_value();
  if (input_bn) {
    RF_CHECK(training && !conv_bias.has_value() && groups == 1, op, "an input BN (input_mean, input_var: a deferred BN + ReLU) ",
             "needs training, no conv_bias and groups=1; got training=", training, ", conv_bias ",
             conv_bias.has_value() ? "given" : "None", ", groups=", groups);
  }
  if (input_bn || conv_genstats_route(input, conv_weight, conv_bias.has_value(), groups, training)) {
    // the statistics from the conv's epilogue (a cuDNN graph; elsewhere bn_stats after the conv): bn_act_batch takes
    // no statistics pass over y
    static const auto conv_genstats = kernel_ops::handle<ConvGenstatsOp>("resnet_fused::conv_genstats");
    const auto [y, mean, var] = conv_genstats.call(input, conv_weight, stride, padding, dilation, input_mean, input_var,
                                                    input_weight, input_bias, input_eps);
    return bn_act_stage(y, bn_weight, bn_bias, running_mean, running_var, residual, training, momentum, momentum_tensor, eps,
                        act, alpha, num_batches_tracked, op, "conv2d(input)", mean, var);
  }
  const auto y = at::conv2d(input, conv_weight, conv_bias, stride, padding, dilation, groups);
  return bn_act_stage(y, bn_weight, bn_bias, running_mean, running_var, residual, training, momentum, momentum_tensor, eps, act,
                      alpha, num_batches_tracked, op, "conv2d(input)");
}

using BnUpdateRunningOp = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                               std::optional<double>, const OptTensor&, const OptTensor&);

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bn_defer_stage(
    const at::Tensor& input, const at::Tensor& conv_weight, const OptTensor& running_mean, const OptTensor& running_var,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, std::optional<double> momentum,
    const OptTensor& momentum_tensor, const OptTensor& num_batches_tracked, const OptTensor& input_mean,
    const OptTensor& input_var, const OptTensor& input_weight, const OptTensor& input_bias, double input_eps) {
  const char* op = "conv_bn_defer_stage";
  RF_CHECK(conv_weight.dim() == 4, op, "expected `conv_weight` of shape (Cout, Cin, KH, KW), got ", conv_weight.sym_sizes());
  RF_CHECK(running_mean.has_value() == running_var.has_value(), op, "give both running_mean and running_var, or neither");
  for (const auto& [v, name] : {std::pair{&running_mean, "running_mean"}, std::pair{&running_var, "running_var"}}) {
    if (!v->has_value()) continue;
    RF_CHECK((*v)->dim() == 1 && (*v)->sym_numel() == conv_weight.sym_size(0) && (*v)->is_floating_point() &&
                 (*v)->device() == input.device(),
             op, "expected `", name, "` to be a floating-point vector of shape (", conv_weight.sym_size(0), "), one per output ",
             "channel of `conv_weight` ", conv_weight.sym_sizes(), ", on ", input.device(), "; got ", (*v)->scalar_type(),
             " of shape ", (*v)->sym_sizes(), " on ", (*v)->device());
  }
  if (num_batches_tracked.has_value()) {
    RF_CHECK(num_batches_tracked->dim() == 0 && num_batches_tracked->device() == input.device(), op,
             "`num_batches_tracked` is a 0-dim counter on the input's device (", input.device(), "); got shape ",
             num_batches_tracked->sym_sizes(), " on ", num_batches_tracked->device());
  }
  static const auto conv_genstats = kernel_ops::handle<ConvGenstatsOp>("resnet_fused::conv_genstats");
  static const auto update = kernel_ops::handle<BnUpdateRunningOp>("resnet_fused::bn_update_running");
  auto [y, mean, var] = conv_genstats.call(input, conv_weight, stride, padding, dilation, input_mean, input_var, input_weight,
                                           input_bias, input_eps);
  RF_CHECK(y.sym_numel() != y.sym_size(1) || y.sym_numel() == 0, op,
           "expected more than 1 value per channel when training, got conv2d(input) of size ", y.sym_sizes());
  // nn.BatchNorm2d's order: the batch counted, then the running statistics moved (momentum None: by 1 / the count)
  if (num_batches_tracked.has_value()) num_batches_tracked->add_(1);
  const bool moves = momentum.has_value() || momentum_tensor.has_value() || num_batches_tracked.has_value();
  if (running_mean.has_value() && moves) {
    // count = N H W (a guard where the sizes are symbolic: the op takes it as a number)
    const int64_t numel = y.sym_numel().guard_int(__FILE__, __LINE__);
    if (numel > 0) {
      const double count = static_cast<double>(numel / y.sym_size(1).guard_int(__FILE__, __LINE__));
      update.call(*running_mean, *running_var, mean, var, count, momentum, momentum_tensor, num_batches_tracked);
    }
  }
  return {y, mean, var};
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CompositeImplicitAutograd, m) {
  m.impl("conv_bn_act_stage", &conv_bn_act_stage);
  m.impl("conv_bn_defer_stage", &conv_bn_defer_stage);
}

}  // namespace resnet_fused
