// conv_bn_act_stage: act(batch_norm(conv2d(input)) (+ residual)) as one op call on the cpu and cuda backends:
// aten's convolution (cuDNN / oneDNN, with its own autograd), then bn_act_stage (bn_act_stage.cpp); in training on
// CUDA with the cuDNN graphs on, conv_genstats (the conv with the statistics in its epilogue) instead. The Python
// twin, with the Triton and deferred-BN routes, is resnet_fused/ops/conv_bn_act.py.
#include <torch/library.h>

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
                             double alpha, const OptTensor& num_batches_tracked) {
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
  if (conv_genstats_route(input, conv_weight, conv_bias.has_value(), groups, training)) {
    // the statistics from the conv's epilogue (a cuDNN graph): bn_act_batch takes no statistics pass over y
    static const auto conv_genstats = kernel_ops::handle<ConvGenstatsOp>("resnet_fused::conv_genstats");
    const auto [y, mean, var] = conv_genstats.call(input, conv_weight, stride, padding, dilation, std::nullopt, std::nullopt,
                                                    std::nullopt, std::nullopt, 0.0);
    return bn_act_stage(y, bn_weight, bn_bias, running_mean, running_var, residual, training, momentum, momentum_tensor, eps,
                        act, alpha, num_batches_tracked, op, "conv2d(input)", mean, var);
  }
  const auto y = at::conv2d(input, conv_weight, conv_bias, stride, padding, dilation, groups);
  return bn_act_stage(y, bn_weight, bn_bias, running_mean, running_var, residual, training, momentum, momentum_tensor, eps, act,
                      alpha, num_batches_tracked, op, "conv2d(input)");
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CompositeImplicitAutograd, m) { m.impl("conv_bn_act_stage", &conv_bn_act_stage); }

}  // namespace resnet_fused
