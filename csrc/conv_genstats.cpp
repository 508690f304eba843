// resnet_fused::conv_genstats: its autograd (the statistics are outputs without a gradient: the BN that reads them
// differentiates through them: bn_act_batch's training backward, or the next conv_genstats's input BN), the
// composite kernel (CPU; CUDA without a graph), and the route conv_bn_act_stage asks. The cuDNN graph kernel:
// cudnn/graphs.cpp (stubs where it is not built: cudnn_graphs.cpp).
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <array>

#include "checks.h"
#include "conv_genstats.h"
#include "kernel_ops.h"

namespace resnet_fused {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

// grad_weight, grad_bias of a BN parameter, in the parameter's dtype (the kernels reduce in fp32)
Tensor in_dtype_of(const Tensor& grad, const Tensor& like) {
  return !grad.defined() || !like.defined() || grad.scalar_type() == like.scalar_type() ? grad : grad.to(like.scalar_type());
}

// The input BN's backward in float64 (gradcheck's dtype; the kernels take fp32 / fp16 / bf16): dz = grad_a where
// a > 0, then batch norm's training backward with the batch statistics, which depend on input
std::tuple<Tensor, Tensor, Tensor> input_bn_backward_fp64(const Tensor& grad_a, const Tensor& input, const Tensor& a,
                                                          const Tensor& mean, const Tensor& var, const Tensor& weight,
                                                          double eps, std::array<bool, 3> mask) {
  const Tensor dz = grad_a * (a > 0);
  return at::native_batch_norm_backward(dz, input, kernel_ops::opt(weight), std::nullopt, std::nullopt, mean,
                                        (var + eps).rsqrt(), /*train=*/true, eps, mask);
}

struct ConvGenstats : torch::autograd::Function<ConvGenstats> {
  // the tensor arguments, in order: input, weight, input_mean, input_var, input_weight, input_bias
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, const OptTensor& input_mean,
                               const OptTensor& input_var, const OptTensor& input_weight, const OptTensor& input_bias,
                               double input_eps) {
    static const auto op = kernel_ops::handle<ConvGenstatsOp>("resnet_fused::conv_genstats");
    Tensor y, mean, var;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(y, mean, var) =
          op.call(input, weight, stride, padding, dilation, input_mean, input_var, input_weight, input_bias, input_eps);
    }
    ctx->mark_non_differentiable({mean, var});
    ctx->set_materialize_grads(false);
    const auto value = [](const OptTensor& t) { return t.value_or(Tensor()); };
    ctx->save_for_backward({input, weight, value(input_mean), value(input_var), value(input_weight), value(input_bias)});
    ctx->saved_data["conv"] = c10::List<int64_t>({stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]});
    ctx->saved_data["eps"] = input_eps;
    ctx->saved_data["given"] = c10::List<bool>({input_mean.has_value(), input_var.has_value(), input_weight.has_value(),
                                                input_bias.has_value()});
    return {y, mean, var};
  }

  // y = conv(a, weight), a = input or relu(z), z = input * scale + shift:
  //   d y / d a, d y / d weight: aten's convolution backward (cuDNN's dgrad and wgrad on CUDA), on a recomputed
  //   d a / d input, d input_weight, d input_bias: ReLU's mask (z > 0), then batch norm's training backward (the batch
  //   statistics are functions of input: their gradient is in it), one bn_act_backward call
  // With the cuDNN graphs (CUDA fp16 / bf16): dgrad + dReLU + the BN's weight gradients in one graph, wgrad with a
  // recomputed as it loads: a is not written at all; each graph cuDNN lacks falls back to the passes above.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(10);
    if (!grads[0].defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight = saved[1], &in_mean = saved[2], &in_var = saved[3];
    const OptTensor in_weight = kernel_ops::opt(saved[4]), in_bias = kernel_ops::opt(saved[5]);
    const auto c = ctx->saved_data["conv"].toIntVector();
    const std::array<int64_t, 2> stride{c[0], c[1]}, padding{c[2], c[3]}, dilation{c[4], c[5]};
    const auto given = ctx->saved_data["given"].toBoolList();
    const bool prologue = given[0];
    // Function::apply gave an autograd edge to each tensor argument that was given: edge k of argument i
    const auto needs = [&](size_t i) {
      size_t edge = std::min<size_t>(i, 2);
      for (size_t j = 2; j < i; ++j) edge += given[j - 2];
      return (i < 2 || given[i - 2]) && ctx->needs_input_grad(edge);
    };
    const bool needs_input = needs(0), needs_weight = needs(1), needs_in_weight = needs(4), needs_in_bias = needs(5);
    if (!prologue) {
      std::tie(out[0], out[1], std::ignore) = at::convolution_backward(grads[0], input, weight, std::nullopt, stride, padding,
                                                                       dilation, false, {0, 0}, 1,
                                                                       {needs_input, needs_weight, false});
      return out;
    }
    const bool needs_a = needs_input || needs_in_weight || needs_in_bias;
    const double eps = ctx->saved_data["eps"].toDouble();
    const auto [scale, shift] = input_scale_shift(input, in_mean, in_var, in_weight, in_bias, eps);
    // the graphs first; what they do not cover goes through one aten convolution backward on a written a
    std::optional<std::tuple<Tensor, Tensor, Tensor>> dbn;
    std::optional<Tensor> grad_weight;
    if (needs_a) {
      dbn = conv_genstats_dgrad_graph(grads[0], input, weight, stride, padding, dilation, in_mean, in_var, in_weight, in_bias,
                                      eps, needs_input);
    }
    if (needs_weight) grad_weight = conv_genstats_wgrad_graph(grads[0], input, weight, stride, padding, dilation, scale, shift);
    const bool aten_dgrad = needs_a && !dbn, aten_wgrad = needs_weight && !grad_weight;
    Tensor a, grad_a;
    if (aten_dgrad || aten_wgrad) {
      a = input_bn_relu(input, scale, shift);  // one elementwise pass instead of a saved activation
      Tensor gw;
      std::tie(grad_a, gw, std::ignore) = at::convolution_backward(grads[0], a, weight, std::nullopt, stride, padding, dilation,
                                                                   false, {0, 0}, 1, {aten_dgrad, aten_wgrad, false});
      if (aten_wgrad) grad_weight = gw;
    }
    out[1] = grad_weight.value_or(Tensor());
    if (!needs_a) return out;
    Tensor grad_input, grad_in_weight, grad_in_bias;
    if (dbn) {
      std::tie(grad_input, grad_in_weight, grad_in_bias) = *dbn;
    } else if (input.scalar_type() == at::kDouble) {
      std::tie(grad_input, grad_in_weight, grad_in_bias) = input_bn_backward_fp64(
          grad_a, input, a, in_mean, in_var, saved[4], eps, {needs_input, needs_in_weight, needs_in_bias});
    } else {
      std::tie(grad_input, grad_in_weight, grad_in_bias, std::ignore) =
          kernel_ops::bn_act_backward(grad_a, input, in_mean, in_var, in_weight, a, eps, /*training=*/true, needs_input,
                                      needs_in_weight || needs_in_bias, false);
    }
    out[0] = needs_input ? grad_input : Tensor();
    out[7] = needs_in_weight ? in_dtype_of(grad_in_weight, saved[4]) : Tensor();
    out[8] = needs_in_bias ? in_dtype_of(grad_in_bias, saved[5]) : Tensor();
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor> conv_genstats_autograd(const Tensor& input, const Tensor& weight, at::IntArrayRef stride,
                                                          at::IntArrayRef padding, at::IntArrayRef dilation,
                                                          const OptTensor& input_mean, const OptTensor& input_var,
                                                          const OptTensor& input_weight, const OptTensor& input_bias,
                                                          double input_eps) {
  // an optional holding an undefined tensor is None (Function::apply gives it no autograd edge either)
  const auto given = [](const OptTensor& t) { return t.has_value() && t->defined() ? t : std::nullopt; };
  const OptTensor mean = given(input_mean), var = given(input_var);
  // the statistics are input's own batch statistics (as conv_genstats returns them): their gradient reaches input
  // through the backward's BN term, and no gradient of theirs is taken apart from it
  RF_CHECK(!(mean && mean->requires_grad()) && !(var && var->requires_grad()), "conv_genstats",
           "`input_mean` and `input_var` must not require grad: they are taken as `input`'s batch statistics, whose "
           "gradient the op carries into `input`'s (pass them detached, as conv_genstats returns them)");
  auto r = ConvGenstats::apply(input, weight, stride, padding, dilation, mean, var, given(input_weight), given(input_bias),
                               input_eps);
  return {r[0], r[1], r[2]};
}

}  // namespace

std::tuple<Tensor, Tensor> input_scale_shift(const Tensor& input, const Tensor& mean, const Tensor& var, const OptTensor& weight,
                                            const OptTensor& bias, double eps) {
  if (input.scalar_type() != at::kDouble) return kernel_ops::bn_scale_shift(mean, var, weight, bias, eps);
  Tensor scale = (var.to(at::kDouble) + eps).rsqrt();  // float64: aten, in float64
  if (weight.has_value()) scale = scale * weight->to(at::kDouble);
  Tensor shift = -mean.to(at::kDouble) * scale;
  if (bias.has_value()) shift = shift + bias->to(at::kDouble);
  return {scale, shift};
}

Tensor input_bn_relu(const Tensor& input, const Tensor& scale, const Tensor& shift) {
  if (input.scalar_type() != at::kDouble) return kernel_ops::bn_act_apply(input, scale, shift, std::nullopt, "relu", 0.0);
  const std::array<int64_t, 4> per_channel{1, -1, 1, 1};
  return at::relu(input * scale.view(per_channel) + shift.view(per_channel));
}

std::tuple<Tensor, Tensor, Tensor> conv_genstats_composite(const Tensor& input, const Tensor& weight, at::IntArrayRef stride,
                                                           at::IntArrayRef padding, at::IntArrayRef dilation,
                                                           const OptTensor& input_mean, const OptTensor& input_var,
                                                           const OptTensor& input_weight, const OptTensor& input_bias,
                                                           double input_eps) {
  check_conv_genstats(input, weight, stride, padding, dilation, input_mean, input_var, input_weight, input_bias);
  if (!input_mean.has_value()) return conv_genstats_passes(input, weight, stride, padding, dilation);
  const auto [scale, shift] = input_scale_shift(input, *input_mean, *input_var, input_weight, input_bias, input_eps);
  return conv_genstats_passes(input_bn_relu(input, scale, shift), weight, stride, padding, dilation);
}

std::tuple<Tensor, Tensor, Tensor> conv_genstats_passes(const Tensor& a, const Tensor& weight, at::IntArrayRef stride,
                                                        at::IntArrayRef padding, at::IntArrayRef dilation) {
  Tensor y = at::conv2d(a, weight, std::nullopt, stride, padding, dilation, 1);
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
  return training && !has_bias && groups == 1 && cudnn_graphs_enabled() && cudnn_graphs_built() &&
         input.is_cuda() && (t == at::kHalf || t == at::kBFloat16) && weight.scalar_type() == t && input.dim() == 4 &&
         weight.dim() == 4 && input.is_contiguous(cl) && weight.is_contiguous(cl) &&
         input.sym_size(1) % 8 == 0 && weight.sym_size(0) % 8 == 0;
}

TORCH_LIBRARY_IMPL(resnet_fused, Autograd, m) { m.impl("conv_genstats", &conv_genstats_autograd); }
TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) { m.impl("conv_genstats", &conv_genstats_composite); }
#ifndef RF_WITH_CUDNN_FRONTEND
TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) { m.impl("conv_genstats", &conv_genstats_composite); }
#endif

}  // namespace resnet_fused
