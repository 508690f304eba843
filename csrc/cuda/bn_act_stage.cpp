// The composed stage kernels (csrc/bn_act_compose.h) on CUDA: bn_act_batch, bn_act_running, bn_act_backward, each
// one dispatch with this module's kernels called directly after it.
#include "bn_act_compose.h"
#include "cuda/kernels.h"

namespace resnet_fused::gpu {
namespace {

struct Kernels {
  static constexpr auto bn_stats_scale_shift = &gpu::bn_stats_scale_shift_cuda;
  static constexpr auto bn_scale_shift = &gpu::bn_scale_shift_cuda;
  static constexpr auto update_running = &gpu::update_running_cuda;
  static constexpr auto bn_act_apply = &gpu::bn_act_apply_cuda;
  static constexpr auto bn_act_backward_reduce_coeffs = &gpu::bn_act_backward_reduce_coeffs_cuda;
  static constexpr auto bn_act_backward_elemt = &gpu::bn_act_backward_elemt_cuda;
};

}  // namespace

RF_REGISTER_COMPOSED_STAGE_KERNELS(CUDA, Kernels)

}  // namespace resnet_fused::gpu
