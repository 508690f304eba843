// The composed stage kernels (csrc/bn_act_compose.h) on the CPU: bn_act_batch, bn_act_running, bn_act_backward, each
// one dispatch with this module's kernels called directly after it.
#include "bn_act_compose.h"
#include "cpu/kernels.h"

namespace resnet_fused::cpu {
namespace {

struct Kernels {
  static constexpr auto bn_stats = &cpu::bn_stats;
  static constexpr auto bn_scale_shift = &cpu::bn_scale_shift;
  static constexpr auto bn_act_apply = &cpu::bn_act_apply;
  static constexpr auto bn_act_backward_reduce = &cpu::bn_act_backward_reduce;
  static constexpr auto bn_backward_coeffs = &cpu::bn_backward_coeffs;
  static constexpr auto bn_act_backward_elemt = &cpu::bn_act_backward_elemt;
};

}  // namespace

RF_REGISTER_COMPOSED_STAGE_KERNELS(CPU, Kernels)

}  // namespace resnet_fused::cpu
