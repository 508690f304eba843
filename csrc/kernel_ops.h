// The kernel ops (csrc/ops.cpp) called from C++ through the dispatcher, one typed handle each, found once:
// what the stage ops (bn_act_stage.cpp, conv_act_stage.cpp) launch on the input's device (CPU kernels in
// cpu/, CUDA kernels in cuda/, the fakes under torch.compile's tracing).
#pragma once
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ATen.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace resnet_fused::kernel_ops {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;
using Pair = std::tuple<Tensor, Tensor>;

template <class Signature>
c10::TypedOperatorHandle<Signature> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// A kernel op has no autograd of its own: its callers run it where no gradient flows through it (a backward, a no-grad
// path) or inside their autograd Function. Called below the Autograd keys, it skips autograd's boxed fallback (a
// stack of IValues per call).
#define RF_KERNEL_OP(name, ...)                                       \
  static const auto op = handle<__VA_ARGS__>("resnet_fused::" name); \
  const at::AutoDispatchBelowAutograd below_autograd

inline Tensor add_relu_forward(const Tensor& input, const Tensor& residual) {
  RF_KERNEL_OP("add_relu_forward", Tensor(const Tensor&, const Tensor&));
  return op.call(input, residual);
}

inline Pair bn_stats(const Tensor& input) {
  RF_KERNEL_OP("bn_stats", Pair(const Tensor&));
  return op.call(input);
}

inline Pair bn_scale_shift(const Tensor& mean, const Tensor& var, const OptTensor& weight, const OptTensor& bias, double eps) {
  RF_KERNEL_OP("bn_scale_shift", Pair(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, double));
  return op.call(mean, var, weight, bias, eps);
}

inline Tensor bn_act_apply(const Tensor& input, const Tensor& scale, const Tensor& shift, const OptTensor& residual,
                           std::string_view act, double alpha) {
  RF_KERNEL_OP("bn_act_apply", Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, std::string_view, double));
  return op.call(input, scale, shift, residual, act, alpha);
}

inline Tensor act_backward(const Tensor& grad_out, const Tensor& input, const Tensor& scale, const Tensor& shift,
                           const OptTensor& residual, std::string_view act, double alpha) {
  RF_KERNEL_OP("act_backward", Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                      std::string_view, double));
  return op.call(grad_out, input, scale, shift, residual, act, alpha);
}

inline std::tuple<Tensor, Tensor, Tensor, Tensor> bn_act_backward(const Tensor& grad_out, const Tensor& input, const Tensor& mean,
                                                                  const Tensor& var, const OptTensor& weight,
                                                                  const OptTensor& output, double eps, bool training,
                                                                  bool need_grad_input, bool need_grad_params,
                                                                  bool need_grad_residual) {
  RF_KERNEL_OP("bn_act_backward", std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                               const Tensor&, const OptTensor&, const OptTensor&,
                                                                               double, bool, bool, bool, bool));
  return op.call(grad_out, input, mean, var, weight, output, eps, training, need_grad_input, need_grad_params,
                 need_grad_residual);
}

#undef RF_KERNEL_OP

// an undefined tensor (a None argument, or one not saved) as the schema's `Tensor?`
inline OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

}  // namespace resnet_fused::kernel_ops
