// Input checks shared by the CPU and CUDA kernels: each failure names the op, the argument, and the
// shapes / dtypes / devices involved.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

namespace resnet_fused {

#define RF_CHECK(cond, op, ...) TORCH_CHECK(cond, "resnet_fused::", op, ": ", __VA_ARGS__)

// A 4-D activation in fp32 / fp16 / bf16.
inline void check_activation(const at::Tensor& t, const char* op, const char* name) {
  RF_CHECK(t.dim() == 4, op, "expected `", name, "` to be a 4-D (N, C, H, W) tensor, got shape ", t.sizes());
  RF_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, op,
           "expected `", name, "` to be float32, float16 or bfloat16, got ", t.scalar_type());
}

// Another activation that must match `ref` in shape, dtype and device.
inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name, const char* ref_name) {
  RF_CHECK(t.sym_sizes() == ref.sym_sizes(), op, "`", name, "` has shape ", t.sym_sizes(), " but `", ref_name, "` has shape ",
           ref.sym_sizes());
  RF_CHECK(t.scalar_type() == ref.scalar_type(), op, "`", name, "` is ", t.scalar_type(), " but `", ref_name, "` is ",
           ref.scalar_type());
  RF_CHECK(t.device() == ref.device(), op, "`", name, "` is on ", t.device(), " but `", ref_name, "` is on ", ref.device());
}

// A per-channel fp32 vector of C elements on ref's device.
inline void check_channel_vector(const at::Tensor& v, const at::Tensor& ref, const char* op, const char* name) {
  const int64_t C = ref.size(1);
  RF_CHECK(v.dim() == 1 && v.numel() == C, op, "expected `", name, "` of shape [", C, "] (one per channel of a tensor of shape ",
           ref.sizes(), "), got shape ", v.sizes());
  RF_CHECK(v.scalar_type() == at::kFloat, op, "expected `", name, "` to be float32, got ", v.scalar_type());
  RF_CHECK(v.device() == ref.device(), op, "`", name, "` is on ", v.device(), " but the activations are on ", ref.device());
}

// The dtypes a per-channel vector is read (and a running statistic written) in: bn_coeffs.h's In / InOut
inline bool is_vector_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// A BN parameter or statistic: None, or a float32 / float64 / float16 / bfloat16 (C,) vector, C = input's channels
// (`of` names input), on input's device.
inline void check_bn_vector(const std::optional<at::Tensor>& v, const at::Tensor& input, const char* op, const char* name,
                            const char* of) {
  if (!v.has_value()) return;
  RF_CHECK(v->dim() == 1 && v->sym_numel() == input.sym_size(1), op, "expected `", name, "` of shape (", input.sym_size(1),
           "), one per channel of ", of, " ", input.sym_sizes(), ", got ", v->sym_sizes());
  RF_CHECK(is_vector_dtype(v->scalar_type()), op, "expected `", name, "` to be float32, float64, float16 or bfloat16, got ",
           v->scalar_type());
  RF_CHECK(v->device() == input.device(), op, "`", name, "` is on ", v->device(), " but `", of, "` is on ", input.device());
}

// Dispatch over the activation dtypes the kernels take (fp64 goes to the plain-PyTorch path in Python).
#define RF_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...)                        \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// The layout every kernel runs in and allocates its outputs in: channels_last (N, H, W, C) when `t` is
// dense channels_last and not also dense NCHW, else contiguous (N, C, H, W). So C = 1 or H = W = 1
// (dense in both) is NCHW, and a non-dense input is copied to NCHW. The fakes' rule, word for word
// (resnet_fused/reference.py `_memory_format`): fake and real outputs get the same strides.
inline at::MemoryFormat layout_of(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                                : at::MemoryFormat::Contiguous;
}

// x laid out densely in fmt (a no-op when it already is); an undefined optional stays undefined.
inline at::Tensor dense(const at::Tensor& x, at::MemoryFormat fmt) { return x.defined() ? x.contiguous(fmt) : x; }
inline at::Tensor dense(const std::optional<at::Tensor>& x, at::MemoryFormat fmt) {
  return x.has_value() ? dense(*x, fmt) : at::Tensor();
}

// Uninitialized, shaped and typed as x, laid out in fmt: one allocation op (at::empty_like dispatches empty_like, then
// empty or empty_strided under it).
inline at::Tensor empty_as(const at::Tensor& x, at::MemoryFormat fmt) { return at::empty(x.sizes(), x.options().memory_format(fmt)); }

// ---- per-op checks, called by every backend before it touches memory ----

inline void check_add_relu(const at::Tensor& input, const at::Tensor& residual) {
  check_activation(input, "add_relu_forward", "input");
  check_like(residual, input, "add_relu_forward", "residual", "input");
}

inline void check_bn_stats(const at::Tensor& input) { check_activation(input, "bn_stats", "input"); }

inline void check_bn_act_apply(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& shift,
                               const std::optional<at::Tensor>& residual) {
  const char* op = "bn_act_apply";
  check_activation(input, op, "input");
  check_channel_vector(scale, input, op, "scale");
  check_channel_vector(shift, input, op, "shift");
  if (residual.has_value()) check_like(*residual, input, op, "residual", "input");
}

inline void check_act_backward(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& scale,
                               const at::Tensor& shift, const std::optional<at::Tensor>& residual) {
  const char* op = "act_backward";
  check_activation(input, op, "input");
  check_like(grad_out, input, op, "grad_out", "input");
  check_channel_vector(scale, input, op, "scale");
  check_channel_vector(shift, input, op, "shift");
  if (residual.has_value()) check_like(*residual, input, op, "residual", "input");
}

inline void check_bn_act_backward_reduce(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                                         const std::optional<at::Tensor>& output) {
  const char* op = "bn_act_backward_reduce";
  check_activation(input, op, "input");
  check_like(grad_out, input, op, "grad_out", "input");
  check_channel_vector(mean, input, op, "mean");
  if (output.has_value()) check_like(*output, input, op, "output", "input");
}

inline void check_bn_act_backward_elemt(const at::Tensor& grad_out, const std::optional<at::Tensor>& output,
                                        const std::optional<at::Tensor>& input, const std::optional<at::Tensor>& mean,
                                        const at::Tensor& dy_scale, const std::optional<at::Tensor>& x_scale,
                                        const std::optional<at::Tensor>& shift) {
  const char* op = "bn_act_backward_elemt";
  check_activation(grad_out, op, "grad_out");
  check_channel_vector(dy_scale, grad_out, op, "dy_scale");
  if (output.has_value()) check_like(*output, grad_out, op, "output", "grad_out");
  RF_CHECK(input.has_value() == mean.has_value() && input.has_value() == x_scale.has_value() &&
               input.has_value() == shift.has_value(),
           op, "`input`, `mean`, `x_scale` and `shift` must be given together (training) or all omitted (eval)");
  if (input.has_value()) {
    check_like(*input, grad_out, op, "input", "grad_out");
    check_channel_vector(*mean, grad_out, op, "mean");
    check_channel_vector(*x_scale, grad_out, op, "x_scale");
    check_channel_vector(*shift, grad_out, op, "shift");
  }
}

inline void check_bn_act_backward(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                                  const at::Tensor& var, const std::optional<at::Tensor>& weight,
                                  const std::optional<at::Tensor>& output) {
  const char* op = "bn_act_backward";
  check_activation(input, op, "input");
  check_like(grad_out, input, op, "grad_out", "input");
  if (output.has_value()) check_like(*output, input, op, "output", "input");
  check_bn_vector(mean, input, op, "mean", "input");
  check_bn_vector(var, input, op, "var", "input");
  check_bn_vector(weight, input, op, "weight", "input");
}

inline void check_conv_genstats(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation,
                                const std::optional<at::Tensor>& input_mean, const std::optional<at::Tensor>& input_var,
                                const std::optional<at::Tensor>& input_weight, const std::optional<at::Tensor>& input_bias) {
  const char* op = "conv_genstats";
  RF_CHECK(input.dim() == 4 && input.is_floating_point(), op, "expected `input` to be a 4-D (N, C, H, W) floating-point tensor, got ",
           input.scalar_type(), " of shape ", input.sizes());
  RF_CHECK(weight.dim() == 4 && weight.size(1) == input.size(1), op, "expected `weight` of shape (Cout, ", input.size(1),
           ", KH, KW) for `input` of shape ", input.sizes(), " (groups 1), got ", weight.sizes());
  RF_CHECK(weight.scalar_type() == input.scalar_type() && weight.device() == input.device(), op, "`weight` is ",
           weight.scalar_type(), " on ", weight.device(), " but `input` is ", input.scalar_type(), " on ", input.device());
  RF_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
           "expected two values each of stride, padding and dilation, got ", stride, ", ", padding, ", ", dilation);
  // the input BN: its batch statistics together; weight and bias only with them
  RF_CHECK(input_mean.has_value() == input_var.has_value() &&
               (input_mean.has_value() || (!input_weight.has_value() && !input_bias.has_value())),
           op, "give `input_mean` and `input_var` together (the input's batch statistics), and `input_weight` / `input_bias` "
           "only with them");
  check_bn_vector(input_mean, input, op, "input_mean", "input");
  check_bn_vector(input_var, input, op, "input_var", "input");
  check_bn_vector(input_weight, input, op, "input_weight", "input");
  check_bn_vector(input_bias, input, op, "input_bias", "input");
}

// A per-channel statistic or parameter read by the coefficient ops: a 1-D float32 / float64 / float16 /
// bfloat16 vector with as many elements as `ref` (the op's first vector) and on its device.
inline void check_coeff_vector(const at::Tensor& v, const at::Tensor& ref, const char* op, const char* name,
                               const char* ref_name) {
  const auto t = v.scalar_type();
  RF_CHECK(v.dim() == 1, op, "expected `", name, "` to be a 1-D per-channel vector, got shape ", v.sizes());
  RF_CHECK(is_vector_dtype(t), op, "expected `", name, "` to be float32, float64, float16 or bfloat16, got ", t);
  RF_CHECK(v.numel() == ref.numel(), op, "`", name, "` has shape ", v.sizes(), " but `", ref_name, "` has shape ",
           ref.sizes());
  RF_CHECK(v.device() == ref.device(), op, "`", name, "` is on ", v.device(), " but `", ref_name, "` is on ", ref.device());
}

inline void check_bn_scale_shift(const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias) {
  const char* op = "bn_scale_shift";
  check_coeff_vector(mean, mean, op, "mean", "mean");
  check_coeff_vector(var, mean, op, "var", "mean");
  if (weight.has_value()) check_coeff_vector(*weight, mean, op, "weight", "mean");
  if (bias.has_value()) check_coeff_vector(*bias, mean, op, "bias", "mean");
}

// an optional one-value tensor (a momentum_tensor, a num_batches_tracked) on `device`
inline void check_one_value(const std::optional<at::Tensor>& t, const at::Device& device, const char* op, const char* name) {
  if (!t.has_value()) return;
  RF_CHECK(t->sym_numel() == 1 && t->device() == device, op, "expected `", name, "` to be one value on ", device, ", got shape ",
           t->sym_sizes(), " on ", t->device());
}

// an optional momentum_tensor: one float32 / float64 / float16 / bfloat16 value on `device` (read as bn_coeffs.h's In)
inline void check_momentum_tensor(const std::optional<at::Tensor>& t, const at::Device& device, const char* op) {
  check_one_value(t, device, op, "momentum_tensor");
  if (t.has_value()) {
    RF_CHECK(is_vector_dtype(t->scalar_type()), op, "expected `momentum_tensor` to be float32, float64, float16 or bfloat16, got ",
             t->scalar_type());
  }
}

// a training stage's optional running statistics (bn_act_batch, bn_act_stage): per-channel vectors of input given
// together, a momentum >= 0, one-value momentum_tensor and 0-dim num_batches_tracked on input's device
inline void check_running(const at::Tensor& input, const std::optional<at::Tensor>& running_mean,
                          const std::optional<at::Tensor>& running_var, std::optional<double> momentum,
                          const std::optional<at::Tensor>& momentum_tensor,
                          const std::optional<at::Tensor>& num_batches_tracked, const char* op) {
  check_bn_vector(running_mean, input, op, "running_mean", "input");
  check_bn_vector(running_var, input, op, "running_var", "input");
  RF_CHECK(running_mean.has_value() == running_var.has_value(), op, "give both running_mean and running_var, or neither");
  RF_CHECK(!momentum.has_value() || *momentum >= 0.0, op, "expected momentum >= 0, got ", *momentum);
  check_momentum_tensor(momentum_tensor, input.device(), op);
  if (num_batches_tracked.has_value()) {
    RF_CHECK(num_batches_tracked->dim() == 0 && num_batches_tracked->device() == input.device(), op,
             "expected `num_batches_tracked` to be a 0-dim tensor on ", input.device(), ", got shape ",
             num_batches_tracked->sym_sizes(), " on ", num_batches_tracked->device());
  }
}

inline void check_bn_update_running(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean,
                                    const at::Tensor& var, std::optional<double> momentum,
                                    const std::optional<at::Tensor>& momentum_tensor,
                                    const std::optional<at::Tensor>& num_batches_tracked) {
  const char* op = "bn_update_running";
  check_coeff_vector(running_mean, mean, op, "running_mean", "mean");
  check_coeff_vector(running_var, mean, op, "running_var", "mean");
  check_coeff_vector(mean, mean, op, "mean", "mean");
  check_coeff_vector(var, mean, op, "var", "mean");
  RF_CHECK(momentum_tensor.has_value() || momentum.has_value() || num_batches_tracked.has_value(), op,
           "give a momentum, a momentum_tensor or num_batches_tracked (momentum=None: 1 / num_batches_tracked)");
  RF_CHECK(!momentum.has_value() || *momentum >= 0.0, op, "expected momentum >= 0, got ", *momentum);
  check_momentum_tensor(momentum_tensor, mean.device(), op);
  check_one_value(num_batches_tracked, mean.device(), op, "num_batches_tracked");
}

inline void check_bn_backward_coeffs(const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, const at::Tensor& var,
                                     const std::optional<at::Tensor>& weight) {
  const char* op = "bn_backward_coeffs";
  check_coeff_vector(sum_dy, sum_dy, op, "sum_dy", "sum_dy");
  check_coeff_vector(sum_dy_xmu, sum_dy, op, "sum_dy_xmu", "sum_dy");
  check_coeff_vector(var, sum_dy, op, "var", "sum_dy");
  if (weight.has_value()) check_coeff_vector(*weight, sum_dy, op, "weight", "sum_dy");
}

}  // namespace resnet_fused
