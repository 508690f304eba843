// resnet_fused::conv_genstats: its autograd (the statistics are outputs without a gradient: the BN that reads them
// differentiates through them, bn_act_batch's training backward), the composite kernel (CPU; CUDA without a graph),
// and the route conv_bn_act_stage asks. The cuDNN graph kernel: cudnn/conv_genstats_graph.cpp.
#include <torch/autograd.h>
#include <torch/library.h>

#include <atomic>

#include "checks.h"
#include "conv_genstats.h"
#include "kernel_ops.h"

namespace resnet_fused {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;

std::atomic<bool> graphs_enabled{false};

struct ConvGenstats : torch::autograd::Function<ConvGenstats> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation) {
    static const auto op = kernel_ops::handle<ConvGenstatsOp>("resnet_fused::conv_genstats");
    Tensor y, mean, var;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(y, mean, var) = op.call(input, weight, stride, padding, dilation);
    }
    ctx->mark_non_differentiable({mean, var});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({input, weight});
    ctx->saved_data["conv"] = c10::List<int64_t>({stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]});
    return {y, mean, var};
  }

  // d conv / d input, d conv / d weight: aten's convolution backward (cuDNN's dgrad and wgrad on CUDA)
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list none(5);
    if (!grads[0].defined()) return none;
    const auto saved = ctx->get_saved_variables();
    const auto c = ctx->saved_data["conv"].toIntVector();
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1), false};
    auto [grad_input, grad_weight, grad_bias] =
        at::convolution_backward(grads[0], saved[0], saved[1], std::nullopt, {c[0], c[1]}, {c[2], c[3]}, {c[4], c[5]}, false,
                                 {0, 0}, 1, mask);
    none[0] = grad_input, none[1] = grad_weight;
    return none;
  }
};

std::tuple<Tensor, Tensor, Tensor> conv_genstats_autograd(const Tensor& input, const Tensor& weight, at::IntArrayRef stride,
                                                          at::IntArrayRef padding, at::IntArrayRef dilation) {
  auto r = ConvGenstats::apply(input, weight, stride, padding, dilation);
  return {r[0], r[1], r[2]};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> conv_genstats_composite(const Tensor& input, const Tensor& weight, at::IntArrayRef stride,
                                                           at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_conv_genstats(input, weight, stride, padding, dilation);
  return conv_genstats_passes(input, weight, stride, padding, dilation);
}

std::tuple<Tensor, Tensor, Tensor> conv_genstats_passes(const Tensor& input, const Tensor& weight, at::IntArrayRef stride,
                                                        at::IntArrayRef padding, at::IntArrayRef dilation) {
  Tensor y = at::conv2d(input, weight, std::nullopt, stride, padding, dilation, 1);
  if (y.scalar_type() == at::kDouble) {  // gradcheck's dtype: no bn_stats kernel takes it
    auto [var, mean] = at::var_mean(y, at::IntArrayRef{0, 2, 3}, /*correction=*/0, /*keepdim=*/false);
    return {y, mean, var};
  }
  auto [mean, var] = kernel_ops::bn_stats(y);
  return {y, mean, var};
}

bool conv_genstats_route(const Tensor& input, const Tensor& weight, bool has_bias, int64_t groups, bool training) {
  const auto cl = at::MemoryFormat::ChannelsLast;
  const auto t = input.scalar_type();
  // cheap tests first: off, or not CUDA, and nothing reads a (possibly symbolic) size
  return training && !has_bias && groups == 1 && graphs_enabled.load(std::memory_order_relaxed) && cudnn_graphs_built() &&
         input.is_cuda() && (t == at::kHalf || t == at::kBFloat16) && weight.scalar_type() == t && input.dim() == 4 &&
         weight.dim() == 4 && input.is_contiguous(cl) && weight.is_contiguous(cl) &&
         input.sym_size(1) % 8 == 0 && weight.sym_size(0) % 8 == 0;
}

void cudnn_graphs_set_enabled(bool enabled) { graphs_enabled.store(enabled); }
bool cudnn_graphs_enabled() { return graphs_enabled.load(); }

#ifndef RF_WITH_CUDNN_FRONTEND
bool cudnn_graphs_built() { return false; }
std::vector<std::pair<std::string, std::string>> cudnn_graph_report() { return {}; }
#endif

TORCH_LIBRARY_IMPL(resnet_fused, Autograd, m) { m.impl("conv_genstats", &conv_genstats_autograd); }
TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) { m.impl("conv_genstats", &conv_genstats_composite); }
#ifndef RF_WITH_CUDNN_FRONTEND
TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) { m.impl("conv_genstats", &conv_genstats_composite); }
#endif

}  // namespace resnet_fused
