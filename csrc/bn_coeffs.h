// The per-channel math of bn_scale_shift and bn_backward_coeffs, written once for the CPU loop
// (cpu/bn_coeffs.cpp) and the CUDA kernel (cuda/bn_coeffs.cu): one channel per call, fp64 math on
// inputs of any floating dtype, fp32 outputs. resnet_fused/reference.py is the specification.
#pragma once
#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <optional>

#include "checks.h"

namespace resnet_fused::coeffs {

// A (C,) vector of float32 / float64 / float16 / bfloat16 read as fp64; an absent one (nullptr) reads `absent`.
struct In {
  const void* p = nullptr;
  at::ScalarType type = at::kFloat;
  double absent = 0.0;

  C10_HOST_DEVICE double operator[](int64_t i) const {
    if (p == nullptr) return absent;
    switch (type) {
      case at::kDouble: return static_cast<const double*>(p)[i];
      case at::kHalf: return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
      case at::kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
      default: return static_cast<const float*>(p)[i];
    }
  }
};

// `t` (densely laid out: a strided vector is copied once, a dense one is used as is), or `absent` when undefined.
inline In in(const at::Tensor& t, double absent = 0.0) {
  return t.defined() ? In{t.const_data_ptr(), t.scalar_type(), absent} : In{nullptr, at::kFloat, absent};
}
inline at::Tensor dense_vector(const at::Tensor& t) { return t.contiguous(); }
inline at::Tensor dense_vector(const std::optional<at::Tensor>& t) { return t.has_value() ? t->contiguous() : at::Tensor(); }

struct ScaleShift {
  In mean, var, weight, bias;  // weight absent: 1, bias absent: 0
  double eps;
  float *scale, *shift;

  // scale = weight / sqrt(var + eps), shift = bias - mean * scale (no bias: -(mean * scale))
  C10_HOST_DEVICE void operator()(int64_t c) const {
    const double invstd = 1.0 / ::sqrt(var[c] + eps);
    const double s = weight.p == nullptr ? invstd : invstd * weight[c];
    const double ms = mean[c] * s;
    scale[c] = static_cast<float>(s);
    shift[c] = static_cast<float>(bias.p == nullptr ? -ms : bias[c] - ms);
  }
};

// A (C,) vector of float32 / float64 / float16 / bfloat16 read and written as fp64 (a running statistic).
struct InOut {
  void* p;
  at::ScalarType type;

  C10_HOST_DEVICE double operator[](int64_t i) const { return In{p, type}[i]; }
  C10_HOST_DEVICE void set(int64_t i, double v) const {
    switch (type) {
      case at::kDouble: static_cast<double*>(p)[i] = v; break;
      case at::kHalf: static_cast<c10::Half*>(p)[i] = static_cast<float>(v); break;
      case at::kBFloat16: static_cast<c10::BFloat16*>(p)[i] = static_cast<float>(v); break;
      default: static_cast<float*>(p)[i] = static_cast<float>(v);
    }
  }
};

struct RunningUpdate {
  InOut running_mean, running_var;
  In mean, var, momentum_tensor;              // momentum_tensor absent: p == nullptr
  const int64_t* num_batches_tracked;         // nullptr: absent
  double momentum, unbias;                    // unbias = count / (count - 1)

  // w = momentum_tensor[0], else momentum (>= 0), else 1 / num_batches_tracked (counted already);
  // running += w (batch - running), as torch.lerp; the variance's batch value unbiased
  C10_HOST_DEVICE void operator()(int64_t c) const {
    const double w = momentum_tensor.p != nullptr ? momentum_tensor[0]
                     : momentum >= 0.0            ? momentum
                                                  : 1.0 / static_cast<double>(*num_batches_tracked);
    const double rm = running_mean[c], rv = running_var[c];
    running_mean.set(c, rm + w * (mean[c] - rm));
    running_var.set(c, rv + w * (var[c] * unbias - rv));
  }
};

struct BackwardCoeffs {
  In sum_dy, sum_dy_xmu, var, weight;  // weight absent: 1
  double eps, count;
  bool training;
  bool xhat_sums;  // sum_dy_xmu holds sum dy xhat, xhat = (x - mean) invstd (cuDNN's dbn_weight dscale)
  float *a, *b, *c, *grad_weight;

  // a = weight invstd; training: b = -a invstd^2 sum_dy_xmu / count, c = -a sum_dy / count; eval: b = c = 0;
  // grad_weight = sum_dy_xmu invstd (= sum dy xhat: xhat_sums' sums as they are)
  C10_HOST_DEVICE void operator()(int64_t i) const {
    const double invstd = 1.0 / ::sqrt(var[i] + eps);
    const double ai = weight.p == nullptr ? invstd : invstd * weight[i];
    const double sxhat = xhat_sums ? sum_dy_xmu[i] : sum_dy_xmu[i] * invstd;  // sum dy xhat
    a[i] = static_cast<float>(ai);
    b[i] = training ? static_cast<float>(-ai * invstd * sxhat / count) : 0.f;
    c[i] = training ? static_cast<float>(-ai * sum_dy[i] / count) : 0.f;
    grad_weight[i] = static_cast<float>(sxhat);
  }
};

// Lays the (checked: check_<op> in checks.h, called first by every backend) inputs out densely and
// allocates the fp32 outputs; `run(f, C)` applies f to every channel.
template <class Run>
std::tuple<at::Tensor, at::Tensor> bn_scale_shift(const at::Tensor& mean, const at::Tensor& var,
                                                  const std::optional<at::Tensor>& weight,
                                                  const std::optional<at::Tensor>& bias, double eps, Run run) {
  const at::Tensor m = dense_vector(mean), v = dense_vector(var), w = dense_vector(weight), b = dense_vector(bias);
  const auto fopts = m.options().dtype(at::kFloat);
  at::Tensor scale = at::empty({m.numel()}, fopts), shift = at::empty({m.numel()}, fopts);
  run(ScaleShift{in(m), in(v), in(w, 1.0), in(b), eps, scale.mutable_data_ptr<float>(), shift.mutable_data_ptr<float>()},
      m.numel());
  return {scale, shift};
}

template <class Run>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_backward_coeffs(
    const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    double eps, double count, bool training, Run run, bool xhat_sums = false) {
  const at::Tensor s = dense_vector(sum_dy), sx = dense_vector(sum_dy_xmu), v = dense_vector(var), w = dense_vector(weight);
  const int64_t C = s.numel();
  const auto fopts = s.options().dtype(at::kFloat);
  at::Tensor a = at::empty({C}, fopts), b = at::empty({C}, fopts), c = at::empty({C}, fopts), grad_weight = at::empty({C}, fopts);
  run(BackwardCoeffs{in(s), in(sx), in(v), in(w, 1.0), eps, count, training, xhat_sums, a.mutable_data_ptr<float>(),
                     b.mutable_data_ptr<float>(), c.mutable_data_ptr<float>(), grad_weight.mutable_data_ptr<float>()},
      s.numel());
  return {a, b, c, grad_weight};
}

// the update functor over dense running statistics rm, rv, batch statistics m, v, momentum_tensor w and int64
// num_batches_tracked n (undefined: absent)
inline RunningUpdate running_update(const at::Tensor& rm, const at::Tensor& rv, const at::Tensor& m, const at::Tensor& v,
                                    const at::Tensor& w, const at::Tensor& n, std::optional<double> momentum, double count) {
  return RunningUpdate{{rm.data_ptr(), rm.scalar_type()}, {rv.data_ptr(), rv.scalar_type()}, in(m), in(v), in(w),
                       n.defined() ? n.const_data_ptr<int64_t>() : nullptr, momentum.value_or(-1.0), count / (count - 1)};
}

// running statistics updated in place (through a dense copy if one is strided); momentum < 0: none given
template <class Run>
void bn_update_running(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean,
                       const at::Tensor& var, double count, std::optional<double> momentum,
                       const std::optional<at::Tensor>& momentum_tensor, const std::optional<at::Tensor>& num_batches_tracked,
                       Run run) {
  at::Tensor rm = running_mean.contiguous(), rv = running_var.contiguous();
  const at::Tensor m = dense_vector(mean), v = dense_vector(var), w = dense_vector(momentum_tensor);
  // (checked int64 or converted; a no-op Tensor::to would still dispatch an op)
  const at::Tensor n = !num_batches_tracked.has_value()                 ? at::Tensor()
                       : num_batches_tracked->scalar_type() == at::kLong ? num_batches_tracked->contiguous()
                                                                         : num_batches_tracked->to(at::kLong).contiguous();
  run(running_update(rm, rv, m, v, w, n, momentum, count), rm.numel());
  if (!rm.is_same(running_mean)) running_mean.copy_(rm);
  if (!rv.is_same(running_var)) running_var.copy_(rv);
}

// A training stage's running statistics as bn_act_batch takes them (its schema's optional arguments, csrc/ops.cpp) and
// count = N H W: num_batches_tracked += 1 where given, then, where running_mean is and the batch is not empty,
// bn_update_running's update (nn.BatchNorm2d's order: the batch is counted before the momentum 1 / count is read)
struct Running {
  std::optional<at::Tensor> mean, var;
  std::optional<double> momentum;
  std::optional<at::Tensor> momentum_tensor, num_batches_tracked;
  double count = 0;

  bool updates() const { return mean.has_value() && count > 0; }
  // momentum None with neither momentum_tensor nor num_batches_tracked: 0 (the statistics stay), as bn_act_stage's spec
  std::optional<double> momentum_used() const {
    return momentum.has_value() || momentum_tensor.has_value() || num_batches_tracked.has_value() ? momentum : 0.0;
  }
  // whether a kernel can take the update in place: running statistics dense, num_batches_tracked int64
  bool in_place() const {
    return (!mean.has_value() || (mean->is_contiguous() && var->is_contiguous())) &&
           (!num_batches_tracked.has_value() || num_batches_tracked->scalar_type() == at::kLong);
  }
};

// num_batches_tracked += 1 (a CPU int64 counter written directly: no op dispatched)
inline void count_batch(const at::Tensor& n) {
  if (n.is_cpu() && n.scalar_type() == at::kLong) {
    ++*n.mutable_data_ptr<int64_t>();
  } else {
    n.add_(1);
  }
}

// Running's whole update as separate steps: count, then bn_update_running over `run` (the device's per-channel loop)
template <class Run>
void update_running(const Running& r, const at::Tensor& mean, const at::Tensor& var, Run run) {
  if (r.num_batches_tracked.has_value()) count_batch(*r.num_batches_tracked);
  if (r.updates()) {
    bn_update_running(*r.mean, *r.var, mean, var, r.count, r.momentum_used(), r.momentum_tensor, r.num_batches_tracked, run);
  }
}

}  // namespace resnet_fused::coeffs
