// The per-channel finalize of cuDNN's genstats: (sum y, sum y^2) over the M = N H W values of each channel ->
// (mean, biased var), one thread per channel, fp64 math: mean = sum / M, var = max(sum_sq / M - mean^2, 0) (NaN kept).
#include "genstats_finalize.h"

#include <c10/cuda/CUDAGuard.h>

#include "../cuda/common.cuh"

namespace resnet_fused::cudnn_graphs {
namespace {

__global__ void __launch_bounds__(gpu::kThreads)
    genstats_finalize_kernel(const float* sum, const float* sum_sq, double count, float* mean, float* var, int64_t C) {
  const int64_t c = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const double m = sum[c] / count;
  mean[c] = static_cast<float>(m);
  const double v = sum_sq[c] / count - m * m;
  var[c] = static_cast<float>(v != v ? v : fmax(v, 0.0));  // NaN passes (as bn_stats'), rounding's negatives clamp
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> genstats_finalize(const at::Tensor& sum, const at::Tensor& sum_sq, int64_t count) {
  const int64_t C = sum.numel();
  at::Tensor mean = at::empty({C}, sum.options()), var = at::empty({C}, sum.options());
  if (count == 0) return {mean.zero_(), var.zero_()};  // as bn_stats: an empty batch gives zeros
  if (C == 0) return {mean, var};
  const c10::cuda::CUDAGuard guard(sum.device());
  genstats_finalize_kernel<<<static_cast<unsigned>(gpu::ceil_div(C, gpu::kThreads)), gpu::kThreads, 0,
                             at::cuda::getCurrentCUDAStream()>>>(sum.const_data_ptr<float>(), sum_sq.const_data_ptr<float>(),
                                                                 static_cast<double>(count), mean.mutable_data_ptr<float>(),
                                                                 var.mutable_data_ptr<float>(), C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {mean, var};
}

}  // namespace resnet_fused::cudnn_graphs
