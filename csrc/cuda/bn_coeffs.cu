// The per-channel coefficient ops on CUDA: bn_scale_shift, bn_update_running (forward) and bn_backward_coeffs (backward,
// also from cuDNN's normalized sums: bn_backward_coeffs_xhat_cuda), one launch each on the current stream, one thread
// per channel (C is a few thousand at most).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../bn_coeffs.h"
#include "common.cuh"
#include "kernels.h"

namespace resnet_fused::gpu {
namespace {

template <class F>
__global__ void __launch_bounds__(kThreads) per_channel_kernel(F f, int64_t C) {
  const int64_t c = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (c < C) f(c);
}

struct Launch {
  template <class F>
  void operator()(const F& f, int64_t C) const {
    if (C == 0) return;
    per_channel_kernel<<<static_cast<unsigned>(ceil_div(C, kThreads)), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(f, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> bn_scale_shift_cuda(const at::Tensor& mean, const at::Tensor& var,
                                                       const std::optional<at::Tensor>& weight,
                                                       const std::optional<at::Tensor>& bias, double eps) {
  check_bn_scale_shift(mean, var, weight, bias);
  const c10::cuda::CUDAGuard guard(mean.device());
  return coeffs::bn_scale_shift(mean, var, weight, bias, eps, Launch{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_backward_coeffs_cuda(
    const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    double eps, double count, bool training) {
  check_bn_backward_coeffs(sum_dy, sum_dy_xmu, var, weight);
  const c10::cuda::CUDAGuard guard(sum_dy.device());
  return coeffs::bn_backward_coeffs(sum_dy, sum_dy_xmu, var, weight, eps, count, training, Launch{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_backward_coeffs_xhat_cuda(
    const at::Tensor& sum_dy, const at::Tensor& sum_dy_xhat, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    double eps, double count) {
  check_bn_backward_coeffs(sum_dy, sum_dy_xhat, var, weight);
  const c10::cuda::CUDAGuard guard(sum_dy.device());
  return coeffs::bn_backward_coeffs(sum_dy, sum_dy_xhat, var, weight, eps, count, /*training=*/true, Launch{},
                                    /*xhat_sums=*/true);
}

void bn_update_running_cuda(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean,
                            const at::Tensor& var, double count, std::optional<double> momentum,
                            const std::optional<at::Tensor>& momentum_tensor,
                            const std::optional<at::Tensor>& num_batches_tracked) {
  check_bn_update_running(running_mean, running_var, mean, var, momentum, momentum_tensor, num_batches_tracked);
  const c10::cuda::CUDAGuard guard(mean.device());
  coeffs::bn_update_running(running_mean, running_var, mean, var, count, momentum, momentum_tensor, num_batches_tracked,
                            Launch{});
}

void update_running_cuda(const coeffs::Running& running, const at::Tensor& mean, const at::Tensor& var) {
  const c10::cuda::CUDAGuard guard(mean.device());
  coeffs::update_running(running, mean, var, Launch{});
}

}  // namespace resnet_fused::gpu

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("bn_scale_shift", &resnet_fused::gpu::bn_scale_shift_cuda);
  m.impl("bn_update_running", &resnet_fused::gpu::bn_update_running_cuda);
  m.impl("bn_backward_coeffs", &resnet_fused::gpu::bn_backward_coeffs_cuda);
}
