// Device and launch helpers shared by the CUDA kernels: 16-byte vector access with fp32 conversion,
// ReLU and its gradient, Chan's merge of Welford states, a block tree reduction, launch geometry.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <mutex>
#include <shared_mutex>
#include <tuple>

namespace resnet_fused::gpu {

constexpr int kThreads = 256;   // threads per block (upper bound), every kernel
constexpr int kVecBytes = 16;   // one vector access: 4 x fp32 or 8 x fp16 / bf16

template <typename T>
constexpr int vec_width() { return kVecBytes / sizeof(T); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- vector access: N consecutive T at p (aligned to N * sizeof(T)), converted to / from fp32 ----

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ void load_f32(const T* p, float (&out)[N]) {
  const Vec<T, N> in = *reinterpret_cast<const Vec<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = static_cast<float>(in.v[i]);
}

template <int N, typename T>
__device__ __forceinline__ void store_f32(T* p, const float (&in)[N]) {
  Vec<T, N> out;
#pragma unroll
  for (int i = 0; i < N; ++i) out.v[i] = static_cast<T>(in[i]);
  *reinterpret_cast<Vec<T, N>*>(p) = out;
}

// Vector access is possible when every given pointer (nullptr = absent tensor) is 16-byte aligned.
inline bool aligned16(std::initializer_list<const void*> ptrs) {
  return std::all_of(ptrs.begin(), ptrs.end(),
                     [](const void* p) { return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0; });
}

// ---- activation math (fp32) ----

// v < 0 ? 0 : v: NaN stays NaN, as torch.relu (fmaxf(v, 0) would drop it).
__device__ __forceinline__ float relu(float v) { return v < 0.f ? 0.f : v; }

// dy = output <= 0 ? 0 : grad: the ReLU gradient read off the saved output (relu(z) > 0 <=> z > 0).
// A select, as aten threshold_backward: a NaN output passes the gradient, and a masked-off element
// gets 0 even where grad is inf / NaN.
__device__ __forceinline__ float relu_grad(float grad, float output) { return output <= 0.f ? 0.f : grad; }

// Chan et al.: merge the Welford state (mean_b, m2_b, n_b) of one set into (mean, m2, n) of another,
//   n' = n + n_b,  mean' = mean + d * n_b / n',  m2' = m2 + m2_b + d^2 * n * n_b / n',  d = mean_b - mean.
// Either state may be empty (n = 0).
__device__ __forceinline__ void welford_merge(float& mean, float& m2, float& n, float mean_b, float m2_b, float n_b) {
  const float n_ab = n + n_b;
  const float w = n_ab > 0.f ? n_b / n_ab : 0.f;
  const float d = mean_b - mean;
  mean += d * w;
  m2 += m2_b + d * d * n * w;
  n = n_ab;
}

// Tree-reduces a K-float state `a` with `combine(float* a, const float* b)` (in place, on shared
// memory) over the `members` threads tid = m * stride + g (m < members) of each group g, where
// tid = threadIdx.x + threadIdx.y * blockDim.x: stride = blockDim.x reduces over threadIdx.y,
// stride = 1 and members = all threads reduces the whole block. Every thread of the block must call
// it (it synchronises); on return the threads with m == 0 hold the result in `a`, and smem
// (reduce_smem_floats<K>()) is free again.
template <int K>
constexpr int reduce_smem_floats() { return (K | 1) * kThreads; }

template <int K, class Combine>
__device__ __forceinline__ void block_reduce(float (&a)[K], float* smem, int m, int members, int stride,
                                             Combine combine) {
  if (members == 1) return;
  constexpr int S = K | 1;  // odd stride between threads' states: a warp reading word k hits 32 banks
  float* own = smem + (threadIdx.x + threadIdx.y * blockDim.x) * S;
#pragma unroll
  for (int k = 0; k < K; ++k) own[k] = a[k];
  __syncthreads();
  // s = next_pow2(members) / 2, ..., 1: member m < s absorbs member m + s, if any. Writers touch
  // members [0, s), readers [s, 2s): no overlap within a level.
  for (int s = 1 << (31 - __clz(members - 1)); s > 0; s >>= 1) {
    if (m < s && m + s < members) combine(own, own + s * stride * S);
    __syncthreads();
  }
  if (m == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) a[k] = own[k];
  }
}

// ---- launch geometry ----

// A dense activation seen as (N, C, HW): channels_last is (M = N*HW rows) x (C channels),
// contiguous NCHW is (N*C planes) x (HW pixels).
struct Shape {
  int64_t N, C, HW;
};
inline Shape shape_of(const at::Tensor& t) { return {t.size(0), t.size(1), t.size(2) * t.size(3)}; }

// Block for a matrix whose rows are `inner` contiguous items (vectors): blockDim.x spans up to max_x
// items of a row, blockDim.y = kThreads / blockDim.x rows. When a row fits, blockDim.x = inner and
// consecutive threads read consecutive memory even across rows; otherwise the row is cut into equal
// tiles rounded up to whole warps (max_x a multiple of 32).
inline dim3 tile_block(int64_t inner, int max_x = kThreads) {
  const int64_t tiles = ceil_div(inner, max_x);
  int64_t bx = ceil_div(inner, tiles);
  if (tiles > 1) bx = ceil_div(bx, 32) * 32;
  return dim3(static_cast<unsigned>(bx), static_cast<unsigned>(kThreads / bx));
}

// Blocks of `threads` threads of `kernel` resident at once on the current device (at least one per
// SM): the grid of the grid-stride kernels, so that every block is in flight from the start. The
// occupancy query runs once per (device, kernel, block size); later launches read a cache that any
// thread may fill or read.
template <typename Kernel>
int64_t resident_blocks(Kernel kernel, int threads) {
  using Key = std::tuple<c10::DeviceIndex, const void*, int>;
  static std::shared_mutex mutex;
  static std::map<Key, int64_t> cache;
  const Key key{c10::cuda::current_device(), reinterpret_cast<const void*>(kernel), threads};
  {
    const std::shared_lock<std::shared_mutex> read(mutex);
    if (const auto it = cache.find(key); it != cache.end()) return it->second;
  }
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
  const int64_t blocks = int64_t{at::cuda::getCurrentDeviceProperties()->multiProcessorCount} * std::max(per_sm, 1);
  const std::unique_lock<std::shared_mutex> write(mutex);
  cache.emplace(key, blocks);  // a racing thread computed the same value: either copy is right
  return blocks;
}

constexpr int64_t kMaxGridY = 65535;

}  // namespace resnet_fused::gpu
