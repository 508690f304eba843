// bn_act as one op call per stage on the cpu and cuda backends: the autograd of the two stage kernels (bn_act_batch,
// bn_act_running: their kernels are bn_act_compose.h's, registered per backend), their backward in C++, and
// bn_act_stage (checks, the op, the running-statistics update). The kernel ops they call go through kernel_ops.h;
// the same math in Python, for the torch and Triton backends, is resnet_fused/ops/bn_act.py and _bn_math.py.
#include <torch/autograd.h>
#include <torch/library.h>

#include "activation.h"
#include "bn_act_stage.h"
#include "checks.h"
#include "kernel_ops.h"

namespace resnet_fused {
namespace {

using kernel_ops::opt;
using kernel_ops::OptTensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;

// t in `dtype`, with no op dispatched where it is already (Tensor::to records an op even as a no-op)
Tensor as_dtype(const Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

// ReLU's backward reads its output (the mask); another activation's recomputes z = x * scale + shift (+ residual)
bool reads_input(Act a) { return a != Act::None && a != Act::Relu; }

struct BnActGrads {
  Tensor input, weight, bias, residual;
};

// (grad_input, grad_weight, grad_bias, grad_residual) of out = act(x * scale + shift (+ residual)), scale and shift
// from (batch or running) statistics mean, var (the math: resnet_fused/ops/_bn_math.py, bn_act_grads):
//   dz = grad_out * act'(z): ReLU's mask is read off `out` inside bn_act_backward's passes; another activation takes
//        one act_backward pass first (z recomputed in fp32), which is also grad_residual
//   then the normalization's backward, one bn_act_backward call (the math: its schema in csrc/ops.cpp)
BnActGrads bn_act_grads(Tensor grad_out, const Tensor& x, const Tensor& out, const Tensor& mean, const Tensor& var,
                        const Tensor& weight, const Tensor& bias, const Tensor& residual, double eps, std::string_view act_name,
                        double alpha, bool training, const std::array<bool, 4>& needs, at::ScalarType bias_dtype) {
  const auto [needs_x, needs_w, needs_b, needs_r] = needs;
  const Act act = parse_act(act_name, training ? "bn_act_batch" : "bn_act_running");
  const bool relu = act == Act::Relu;
  if (reads_input(act)) {  // dz = grad_out * act'(z), z = x * z_scale + z_shift (+ residual)
    const auto [z_scale, z_shift] = kernel_ops::bn_scale_shift(mean, var, opt(weight), opt(bias), eps);
    grad_out = kernel_ops::act_backward(grad_out, x, z_scale, z_shift, opt(residual), act_name, alpha);
  }
  auto [grad_input, grad_weight, grad_bias, grad_residual] =
      kernel_ops::bn_act_backward(grad_out, x, mean, var, opt(weight), relu ? opt(out) : std::nullopt, eps, training, needs_x,
                                  needs_w || needs_b, needs_r && relu);
  BnActGrads g;
  g.input = needs_x ? grad_input : Tensor();
  g.weight = needs_w ? as_dtype(grad_weight, weight.scalar_type()) : Tensor();
  g.bias = needs_b ? as_dtype(grad_bias, bias_dtype) : Tensor();
  g.residual = !needs_r ? Tensor() : relu ? grad_residual : grad_out;
  return g;
}

// what bn_act_grads reads, saved: x, weight, out (ReLU), mean, var, bias and residual (another activation)
void save_for_grads(AutogradContext* ctx, std::string_view act_name, double alpha, double eps, const Tensor& input,
                    const Tensor& weight, const Tensor& bias, const Tensor& residual, const Tensor& out, const Tensor& mean,
                    const Tensor& var, const char* op) {
  const Act act = parse_act(act_name, op);
  const bool z = reads_input(act);
  ctx->save_for_backward({input, weight, act == Act::Relu ? out : Tensor(), mean, var, z ? bias : Tensor(),
                          z ? residual : Tensor()});
  ctx->saved_data["act"] = std::string(act_name);
  ctx->saved_data["alpha"] = alpha;
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["bias_dtype"] = static_cast<int64_t>(bias.defined() ? bias.scalar_type() : at::kFloat);
}

// Function::apply makes an autograd edge for each given tensor argument (None gets none): which gradients are wanted,
// for the tensor arguments `of` (their positions among the forward's tensor arguments, `given` which were given)
template <size_t N>
std::array<bool, 4> wanted(AutogradContext* ctx, const std::array<bool, N>& given, const std::array<size_t, 4>& of) {
  std::array<bool, 4> needs{};
  for (size_t k = 0; k < 4; ++k) {
    size_t edge = 0;
    for (size_t i = 0; i < of[k]; ++i) edge += given[i];
    needs[k] = given[of[k]] && ctx->needs_input_grad(edge);
  }
  return needs;
}

BnActGrads grads_from(AutogradContext* ctx, const Tensor& grad_out, bool training, const std::array<bool, 4>& needs) {
  const auto saved = ctx->get_saved_variables();  // input, weight, out, mean, var, bias, residual
  return bn_act_grads(grad_out, saved[0], saved[2], saved[3], saved[4], saved[1], saved[5], saved[6],
                      ctx->saved_data["eps"].toDouble(), ctx->saved_data["act"].toStringRef(),
                      ctx->saved_data["alpha"].toDouble(), training, needs,
                      static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt()));
}

// ---- bn_act_batch: training, batch statistics ----

using BnActBatchOp = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, double,
                                                        std::string_view, double, const OptTensor&, const OptTensor&,
                                                        const OptTensor&, const OptTensor&, std::optional<double>,
                                                        const OptTensor&, const OptTensor&);
using BnActRunningOp = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                              double, std::string_view, double);

struct BnActBatch : torch::autograd::Function<BnActBatch> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                               const OptTensor& residual, double eps, const std::string& act, double alpha,
                               const OptTensor& batch_mean, const OptTensor& batch_var, const OptTensor& running_mean,
                               const OptTensor& running_var, std::optional<double> momentum, const OptTensor& momentum_tensor,
                               const OptTensor& num_batches_tracked) {
    static const auto op = kernel_ops::handle<BnActBatchOp>("resnet_fused::bn_act_batch");
    Tensor out, mean, var;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(out, mean, var) = op.call(input, weight, bias, residual, eps, act, alpha, batch_mean, batch_var, running_mean,
                                         running_var, momentum, momentum_tensor, num_batches_tracked);
    }
    ctx->mark_non_differentiable({mean, var});
    ctx->set_materialize_grads(false);  // no zero-filled gradients for mean and var
    save_for_grads(ctx, act, alpha, eps, input, weight.value_or(Tensor()), bias.value_or(Tensor()),
                   residual.value_or(Tensor()), out, mean, var, "bn_act_batch");
    ctx->saved_data["given"] = c10::List<bool>({weight.has_value(), bias.has_value(), residual.has_value()});
    return {out, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list none(14);
    if (!grads[0].defined()) return none;  // out took no gradient
    const auto given = ctx->saved_data["given"].toBoolList();
    const std::array<bool, 4> tensors{true, given[0], given[1], given[2]};  // input, weight, bias, residual
    const auto g = grads_from(ctx, grads[0], true, wanted(ctx, tensors, {0, 1, 2, 3}));
    none[0] = g.input, none[1] = g.weight, none[2] = g.bias, none[3] = g.residual;
    return none;
  }
};

std::tuple<Tensor, Tensor, Tensor> bn_act_batch_autograd(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                                         const OptTensor& residual, double eps, std::string_view act,
                                                         double alpha, const OptTensor& batch_mean,
                                                         const OptTensor& batch_var, const OptTensor& running_mean,
                                                         const OptTensor& running_var, std::optional<double> momentum,
                                                         const OptTensor& momentum_tensor,
                                                         const OptTensor& num_batches_tracked) {
  auto r = BnActBatch::apply(input, weight, bias, residual, eps, std::string(act), alpha, batch_mean, batch_var, running_mean,
                             running_var, momentum, momentum_tensor, num_batches_tracked);
  return {r[0], r[1], r[2]};
}

// ---- bn_act_running: eval, running statistics ----

struct BnActRunning : torch::autograd::Function<BnActRunning> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& running_mean, const Tensor& running_var,
                               const OptTensor& weight, const OptTensor& bias, const OptTensor& residual, double eps,
                               const std::string& act, double alpha) {
    static const auto op = kernel_ops::handle<BnActRunningOp>("resnet_fused::bn_act_running");
    Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      out = op.call(input, running_mean, running_var, weight, bias, residual, eps, act, alpha);
    }
    save_for_grads(ctx, act, alpha, eps, input, weight.value_or(Tensor()), bias.value_or(Tensor()),
                   residual.value_or(Tensor()), out, running_mean, running_var, "bn_act_running");
    ctx->saved_data["given"] = c10::List<bool>({weight.has_value(), bias.has_value(), residual.has_value()});
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto given = ctx->saved_data["given"].toBoolList();
    // input, running_mean, running_var, weight, bias, residual
    const std::array<bool, 6> tensors{true, true, true, given[0], given[1], given[2]};
    const auto g = grads_from(ctx, grads[0], false, wanted(ctx, tensors, {0, 3, 4, 5}));
    variable_list r(9);
    r[0] = g.input, r[3] = g.weight, r[4] = g.bias, r[5] = g.residual;
    return r;
  }
};

Tensor bn_act_running_autograd(const Tensor& input, const Tensor& running_mean, const Tensor& running_var,
                               const OptTensor& weight, const OptTensor& bias, const OptTensor& residual, double eps,
                               std::string_view act, double alpha) {
  return BnActRunning::apply(input, running_mean, running_var, weight, bias, residual, eps, std::string(act), alpha)[0];
}

Tensor bn_act_stage_op(const Tensor& input, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
                       const OptTensor& running_var, const OptTensor& residual, bool training, std::optional<double> momentum,
                       const OptTensor& momentum_tensor, double eps, std::string_view act, double alpha,
                       const OptTensor& num_batches_tracked) {
  return bn_act_stage(input, weight, bias, running_mean, running_var, residual, training, momentum, momentum_tensor, eps, act,
                      alpha, num_batches_tracked, "bn_act_stage", "input");
}

}  // namespace

Tensor bn_act_stage(const Tensor& input, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
                    const OptTensor& running_var, const OptTensor& residual, bool training, std::optional<double> momentum,
                    const OptTensor& momentum_tensor, double eps, std::string_view act, double alpha,
                    const OptTensor& num_batches_tracked, const char* op, const char* of, const OptTensor& batch_mean,
                    const OptTensor& batch_var) {
  check_activation(input, op, "input");
  check_bn_vector(weight, input, op, "weight", of);
  check_bn_vector(bias, input, op, "bias", of);
  check_bn_vector(running_mean, input, op, "running_mean", of);
  check_bn_vector(running_var, input, op, "running_var", of);
  RF_CHECK(running_mean.has_value() == running_var.has_value(), op, "give both running_mean and running_var, or neither");
  if (residual.has_value()) check_like(*residual, input, op, "residual", of);
  if (num_batches_tracked.has_value()) {
    RF_CHECK(training && num_batches_tracked->dim() == 0, op, "`num_batches_tracked` is counted in training, a 0-dim tensor; got ",
             training ? "" : "training=False and ", "shape ", num_batches_tracked->sym_sizes());
    RF_CHECK(num_batches_tracked->device() == input.device(), op, "`num_batches_tracked` is on ", num_batches_tracked->device(),
             " but `", of, "` is on ", input.device());
  }
  parse_act(act, op);
  static const auto batch = kernel_ops::handle<BnActBatchOp>("resnet_fused::bn_act_batch");
  static const auto running = kernel_ops::handle<BnActRunningOp>("resnet_fused::bn_act_running");
  if (!training) {
    RF_CHECK(running_mean.has_value(), op, "running_mean and running_var must be given in evaluation mode");
    return running.call(input, *running_mean, *running_var, weight, bias, residual, eps, act, alpha);
  }
  RF_CHECK(input.sym_numel() != input.sym_size(1) || input.sym_numel() == 0, op,
           "expected more than 1 value per channel when training, got input size ", input.sym_sizes());
  // the running statistics move inside the op (in the statistics' launches on CUDA)
  return std::get<0>(batch.call(input, weight, bias, residual, eps, act, alpha, batch_mean, batch_var, running_mean, running_var,
                                momentum, momentum_tensor, num_batches_tracked));
}

TORCH_LIBRARY_IMPL(resnet_fused, Autograd, m) {
  m.impl("bn_act_batch", &bn_act_batch_autograd);
  m.impl("bn_act_running", &bn_act_running_autograd);
}

TORCH_LIBRARY_IMPL(resnet_fused, CompositeImplicitAutograd, m) { m.impl("bn_act_stage", &bn_act_stage_op); }

}  // namespace resnet_fused
