// The activations of csrc/activation.h on the CPU, for the generic lambdas of channel_map: one overload on
// a float (the scalar tail: activation.h's math) and one on a Vectorized<float> (at::vec's exp / erf /
// tanh, the functions aten's own CPU activation kernels use). Both give NaN for NaN, and the vector
// masks pick the same branch as the scalar comparisons, NaN included.
#pragma once
#include "activation.h"
#include "cpu/channel_map.h"

namespace resnet_fused::cpu {

template <Act A>
inline float act_fwd(float z, float alpha) { return resnet_fused::act_fwd<A>(z, alpha); }

template <Act A>
inline float act_grad(float grad, float z, float alpha) { return resnet_fused::act_grad<A>(grad, z, alpha); }

template <Act A>
inline fVec act_fwd(fVec z, float alpha) {
  using namespace act_math;
  const fVec zero(0.f), three(3.f), six(6.f);
  if constexpr (A == Act::None) return z;
  if constexpr (A == Act::Relu) return fVec::blendv(z, zero, z < zero);
  if constexpr (A == Act::Relu6) return fVec::blendv(fVec::blendv(z, zero, z < zero), six, z > six);
  if constexpr (A == Act::LeakyRelu) return fVec::blendv(z * fVec(alpha), z, z > zero);
  if constexpr (A == Act::Silu) return z / (fVec(1.f) + z.neg().exp());
  if constexpr (A == Act::Gelu) return z * fVec(0.5f) * (fVec(1.f) + (z * fVec(kSqrt1_2)).erf());
  if constexpr (A == Act::GeluTanh) {
    return fVec(0.5f) * z * (fVec(1.f) + (fVec(kSqrt2OverPi) * (z + fVec(kKappa) * z * z * z)).tanh());
  }
  // at::vec::maximum / minimum propagate NaN
  if constexpr (A == Act::Hardswish) return z * at::vec::minimum(at::vec::maximum(z + three, zero), six) / six;
  if constexpr (A == Act::Hardsigmoid) return at::vec::minimum(at::vec::maximum(z + three, zero), six) / six;
}

template <Act A>
inline fVec act_grad(fVec grad, fVec z, float alpha) {
  using namespace act_math;
  const fVec zero(0.f), one(1.f), three(3.f), six(6.f);
  if constexpr (A == Act::None) return grad;
  if constexpr (A == Act::Relu) return fVec::blendv(grad, zero, z <= zero);
  if constexpr (A == Act::Relu6) return fVec::blendv(zero, grad, (z > zero) & (z < six));
  if constexpr (A == Act::LeakyRelu) return fVec::blendv(grad * fVec(alpha), grad, z > zero);
  if constexpr (A == Act::Silu) {
    const fVec s = one / (one + z.neg().exp());
    return grad * s * (one + z * (one - s));
  }
  if constexpr (A == Act::Gelu) {
    const fVec cdf = fVec(0.5f) * (one + (z * fVec(kSqrt1_2)).erf());
    const fVec pdf = fVec(kInvSqrt2Pi) * (fVec(-0.5f) * z * z).exp();
    return grad * (cdf + z * pdf);
  }
  if constexpr (A == Act::GeluTanh) {
    const fVec z2 = z * z;
    const fVec t = (fVec(kSqrt2OverPi) * (z + fVec(kKappa) * z2 * z)).tanh();
    const fVec dt = (one - t * t) * fVec(kSqrt2OverPi) * (one + fVec(3.f * kKappa) * z2);
    return grad * (fVec(0.5f) * (one + t) + fVec(0.5f) * z * dt);
  }
  if constexpr (A == Act::Hardswish) {  // z <= -3: 0; z >= 3: grad; else (NaN too) grad (z / 3 + 1/2)
    const fVec inner = fVec::blendv(grad * (z / three + fVec(0.5f)), grad, z >= three);
    return fVec::blendv(inner, zero, z <= three.neg());
  }
  if constexpr (A == Act::Hardsigmoid) return fVec::blendv(zero, grad / six, (z > three.neg()) & (z < three));
}

}  // namespace resnet_fused::cpu
