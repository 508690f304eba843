// add_relu on CUDA: out = relu(input + residual), elementwise. Both operands are laid out densely in
// the same memory format, so the op is flat over numel and the layout does not matter.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "common.cuh"

namespace resnet_fused::gpu {
namespace {

// Grid-stride over the n / V whole V-vectors, then over the n % V trailing elements one by one.
template <int V, typename T>
__global__ void __launch_bounds__(kThreads)
    add_relu_kernel(const T* __restrict__ x, const T* __restrict__ r, T* __restrict__ out, int64_t n) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  const int64_t tid = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  const int64_t n_vec = n / V;
  for (int64_t i = tid; i < n_vec; i += stride) {
    float a[V], b[V];
    load_f32<V>(x + i * V, a);
    load_f32<V>(r + i * V, b);
#pragma unroll
    for (int v = 0; v < V; ++v) a[v] = relu(a[v] + b[v]);
    store_f32<V>(out + i * V, a);
  }
  for (int64_t i = n_vec * V + tid; i < n; i += stride) {
    float a[1], b[1];
    load_f32<1>(x + i, a);
    load_f32<1>(r + i, b);
    a[0] = relu(a[0] + b[0]);
    store_f32<1>(out + i, a);
  }
}

at::Tensor add_relu_forward_cuda(const at::Tensor& input, const at::Tensor& residual) {
  check_add_relu(input, residual);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::MemoryFormat fmt = layout_of(input);
  const at::Tensor x = dense(input, fmt);
  const at::Tensor r = dense(residual, fmt);
  at::Tensor out = empty_as(x, fmt);
  const int64_t n = x.numel();
  if (n == 0) return out;

  RF_DISPATCH_FLOATING_TYPES(x.scalar_type(), "add_relu", [&] {
    constexpr int VW = vec_width<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const bool vec = aligned16({xp, rp, op});
    const auto kernel = vec ? add_relu_kernel<VW, scalar_t> : add_relu_kernel<1, scalar_t>;
    const int64_t items = vec ? std::max<int64_t>(n / VW, 1) : n;
    const auto grid = static_cast<unsigned>(std::min(ceil_div(items, kThreads), resident_blocks(kernel, kThreads)));
    kernel<<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(xp, rp, op, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace resnet_fused::gpu

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) { m.impl("add_relu_forward", &resnet_fused::gpu::add_relu_forward_cuda); }
