// The activations of the fused ops (resnet_fused/activations.py has the table): the schema's `str act`
// parsed once per call into an Act, the dispatch to a kernel templated on it, and the scalar fp32 math of
// every activation and its derivative, for host code and CUDA device code alike (aten's formulas).
// The CPU kernels' vector twins are in cpu/activation.h.
#pragma once
#include <c10/util/Exception.h>

#include <cmath>
#include <string_view>
#include <type_traits>
#include <utility>

#if defined(__CUDACC__)
#define RF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RF_HOST_DEVICE inline
#endif

namespace resnet_fused {

enum class Act { None, Relu, Relu6, LeakyRelu, Silu, Gelu, GeluTanh, Hardswish, Hardsigmoid };

// the schema's names
inline constexpr std::pair<std::string_view, Act> kActNames[] = {
    {"none", Act::None},       {"relu", Act::Relu},          {"relu6", Act::Relu6},
    {"leaky_relu", Act::LeakyRelu}, {"silu", Act::Silu},     {"gelu", Act::Gelu},
    {"gelu_tanh", Act::GeluTanh},   {"hardswish", Act::Hardswish}, {"hardsigmoid", Act::Hardsigmoid},
};

// the schema's name -> Act; `op` names the op in the error
inline Act parse_act(std::string_view name, const char* op) {
  for (const auto& [n, a] : kActNames) {
    if (n == name) return a;
  }
  TORCH_CHECK(false, "resnet_fused::", op, ": unknown activation '", std::string(name),
              "'; known: none, relu, relu6, leaky_relu, silu, gelu, gelu_tanh, hardswish, hardsigmoid");
}

// Act -> the schema's name
inline std::string_view act_name(Act a) {
  for (const auto& [n, x] : kActNames) {
    if (x == a) return n;
  }
  return "?";
}

template <Act A>
using ActTag = std::integral_constant<Act, A>;

// f(ActTag<a>{}) with a known at compile time: one kernel instantiation per activation
template <class F>
decltype(auto) dispatch_act(Act a, F&& f) {
  switch (a) {
    case Act::None: return f(ActTag<Act::None>{});
    case Act::Relu: return f(ActTag<Act::Relu>{});
    case Act::Relu6: return f(ActTag<Act::Relu6>{});
    case Act::LeakyRelu: return f(ActTag<Act::LeakyRelu>{});
    case Act::Silu: return f(ActTag<Act::Silu>{});
    case Act::Gelu: return f(ActTag<Act::Gelu>{});
    case Act::GeluTanh: return f(ActTag<Act::GeluTanh>{});
    case Act::Hardswish: return f(ActTag<Act::Hardswish>{});
    default: return f(ActTag<Act::Hardsigmoid>{});
  }
}

namespace act_math {
constexpr float kSqrt1_2 = 0.70710678118654752440f;        // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;     // 1 / sqrt(2 pi)
constexpr float kSqrt2OverPi = 0.79788456080286535588f;    // sqrt(2 / pi)
constexpr float kKappa = 0.044715f;                         // the tanh approximation's cubic term

#if defined(__CUDA_ARCH__)
RF_HOST_DEVICE float exp_(float x) { return ::expf(x); }
RF_HOST_DEVICE float erf_(float x) { return ::erff(x); }
RF_HOST_DEVICE float tanh_(float x) { return ::tanhf(x); }
#else
RF_HOST_DEVICE float exp_(float x) { return std::exp(x); }
RF_HOST_DEVICE float erf_(float x) { return std::erf(x); }
RF_HOST_DEVICE float tanh_(float x) { return std::tanh(x); }
#endif
// min(max(x, lo), hi) keeping NaN (fmin / fmax would drop it)
RF_HOST_DEVICE float clamp_nan(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }
}  // namespace act_math

// act(z); alpha: LeakyReLU's negative slope
template <Act A>
RF_HOST_DEVICE float act_fwd(float z, float alpha) {
  using namespace act_math;
  if constexpr (A == Act::None) return z;
  if constexpr (A == Act::Relu) return z < 0.f ? 0.f : z;
  if constexpr (A == Act::Relu6) return clamp_nan(z, 0.f, 6.f);
  if constexpr (A == Act::LeakyRelu) return z > 0.f ? z : z * alpha;
  if constexpr (A == Act::Silu) return z / (1.f + exp_(-z));
  if constexpr (A == Act::Gelu) return z * 0.5f * (1.f + erf_(z * kSqrt1_2));
  if constexpr (A == Act::GeluTanh) return 0.5f * z * (1.f + tanh_(kSqrt2OverPi * (z + kKappa * z * z * z)));
  if constexpr (A == Act::Hardswish) return z * clamp_nan(z + 3.f, 0.f, 6.f) / 6.f;
  if constexpr (A == Act::Hardsigmoid) return clamp_nan(z + 3.f, 0.f, 6.f) / 6.f;
}

// grad * d act/dz at z (ReLU: z may be the output, relu(z) > 0 <=> z > 0), as aten's vectorized CPU
// *_backward kernels, NaN included (ReLU6 / Hardsigmoid: 0, LeakyReLU: alpha grad, the others: NaN)
template <Act A>
RF_HOST_DEVICE float act_grad(float grad, float z, float alpha) {
  using namespace act_math;
  if constexpr (A == Act::None) return grad;
  if constexpr (A == Act::Relu) return z <= 0.f ? 0.f : grad;
  if constexpr (A == Act::Relu6) return (z > 0.f && z < 6.f) ? grad : 0.f;
  if constexpr (A == Act::LeakyRelu) return z > 0.f ? grad : grad * alpha;
  if constexpr (A == Act::Silu) {
    const float s = 1.f / (1.f + exp_(-z));
    return grad * s * (1.f + z * (1.f - s));
  }
  if constexpr (A == Act::Gelu) {
    const float cdf = 0.5f * (1.f + erf_(z * kSqrt1_2));
    const float pdf = kInvSqrt2Pi * exp_(-0.5f * z * z);
    return grad * (cdf + z * pdf);
  }
  if constexpr (A == Act::GeluTanh) {
    const float z2 = z * z;
    const float t = tanh_(kSqrt2OverPi * (z + kKappa * z2 * z));
    const float dt = (1.f - t * t) * kSqrt2OverPi * (1.f + 3.f * kKappa * z2);
    return grad * (0.5f * (1.f + t) + 0.5f * z * dt);
  }
  if constexpr (A == Act::Hardswish) return z <= -3.f ? 0.f : (z >= 3.f ? grad : grad * (z / 3.f + 0.5f));
  if constexpr (A == Act::Hardsigmoid) return (z > -3.f && z < 3.f) ? grad / 6.f : 0.f;
}

}  // namespace resnet_fused
