// The composed stage kernels (csrc/bn_act_compose.h) on the CPU: bn_act_batch, bn_act_running, bn_act_backward, each
// one dispatch with this module's kernels called directly after it.
#include "bn_act_compose.h"
#include "cpu/kernels.h"

namespace resnet_fused::cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// the sequences bn_act_compose.h may take as one call, as their steps (no launch to save on the CPU)
struct Kernels {
  static constexpr auto bn_scale_shift = &cpu::bn_scale_shift;
  static constexpr auto bn_act_apply = &cpu::bn_act_apply;
  static constexpr auto bn_act_backward_elemt = &cpu::bn_act_backward_elemt;

  static constexpr auto update_running = &cpu::update_running;

  static std::tuple<Tensor, Tensor, Tensor, Tensor> bn_stats_scale_shift(const Tensor& input, const OptTensor& weight,
                                                                         const OptTensor& bias, double eps,
                                                                         const coeffs::Running& running) {
    auto [mean, var] = cpu::bn_stats(input);
    auto [scale, shift] = cpu::bn_scale_shift(mean, var, weight, bias, eps);
    update_running(running, mean, var);
    return {mean, var, scale, shift};
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bn_act_backward_reduce_coeffs(
      const Tensor& grad_out, const Tensor& input, const Tensor& mean, const OptTensor& output, const Tensor& var,
      const OptTensor& weight, double eps, double count, bool training) {
    auto [sum_dy, sum_dy_xmu] = cpu::bn_act_backward_reduce(grad_out, input, mean, output);
    auto [a, b, c, grad_weight] = cpu::bn_backward_coeffs(sum_dy, sum_dy_xmu, var, weight, eps, count, training);
    return {sum_dy, sum_dy_xmu, a, b, c, grad_weight};
  }
};

}  // namespace

RF_REGISTER_COMPOSED_STAGE_KERNELS(CPU, Kernels)

}  // namespace resnet_fused::cpu
