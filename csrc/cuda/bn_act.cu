// Batch-norm + activation ops on CUDA: bn_stats, bn_act_apply, act_backward, bn_act_backward_reduce,
// bn_act_backward_elemt.
//
// A dense activation is a matrix of rows of contiguous items (see Shape):
//   channels_last: M = N*H*W rows of C channels,    channel of item j of a row = j;
//   NCHW:          N*C planes of HW pixels,           channel of plane p        = p % C.
// Each thread handles V consecutive items at a time: V = 16 bytes / sizeof(T) when the row length
// (C, resp. HW) is a multiple of it and every pointer is 16-byte aligned, else V = 1. So a V-vector
// never straddles two rows, and in channels_last its V lanes are V consecutive channels.
//
// The three elementwise ops are functors F run by channel_map_kernel; the two reductions are
// reducers R run by channel_reduce_kernel (per-block partial states) + channel_finalize_kernel (one
// block per channel merges the partials): deterministic, no atomics. The activation (activation.h) is
// a template parameter of the apply and act_backward functors: one kernel per activation.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "../activation.h"
#include "../bn_coeffs.h"
#include "../checks.h"
#include "common.cuh"
#include "kernels.h"

namespace resnet_fused::gpu {
namespace {

// ================================ elementwise ================================

// f(i, p) for the V-vector at element offset i, p[v] = f.param(channel of element i + v).
// channels_last: a thread owns the channel vector cv (blockDim.x x gridDim.y across a row), loads
//   its V channels' params once and strides over the rows (blockDim.y x gridDim.x).
// NCHW: a thread strides over planes (blockDim.y x gridDim.x), tracking c = plane % C without a
//   division per plane, and over the plane's V-vectors (blockDim.x x gridDim.y).
template <int V, bool CL, class F>
__global__ void __launch_bounds__(kThreads) channel_map_kernel(F f, Shape s) {
  using P = typename F::Param;
  const int64_t bx = blockDim.x, by = blockDim.y;
  if constexpr (CL) {
    const int64_t n_cv = s.C / V, rows = s.N * s.HW;
    for (int64_t cv = blockIdx.y * bx + threadIdx.x; cv < n_cv; cv += gridDim.y * bx) {
      const int64_t c0 = cv * V;
      P p[V];
#pragma unroll
      for (int v = 0; v < V; ++v) p[v] = f.param(c0 + v);
      // element offset i = row * C + c0 stepped directly (i < rows * C <=> row < rows): the row form
      // made ptxas spill a loop invariant in some V = 1 fp32 kernels
      const int64_t end = rows * s.C, step = gridDim.x * by * s.C;
      for (int64_t i = (blockIdx.x * by + threadIdx.y) * s.C + c0; i < end; i += step) f(i, p);
    }
  } else {
    const int64_t n_hwv = s.HW / V, planes = s.N * s.C;
    const int64_t plane_stride = gridDim.x * by, c_step = plane_stride % s.C;
    int64_t plane = blockIdx.x * by + threadIdx.y;
    for (int64_t c = plane % s.C; plane < planes; plane += plane_stride) {
      const P pc = f.param(c);
      P p[V];
#pragma unroll
      for (int v = 0; v < V; ++v) p[v] = pc;
      for (int64_t i = blockIdx.y * bx + threadIdx.x; i < n_hwv; i += gridDim.y * bx) f(plane * s.HW + i * V, p);
      c += c_step;  // c_step < C, so one wrap at most
      if (c >= s.C) c -= s.C;
    }
  }
}

// The per-channel affine map of the normalization, z = x * scale[c] + shift[c].
struct ScaleShift {
  float scale, shift;
};

// z[v] = x * scale[c] + shift[c] (+ residual) in fp32, for the V-vector at element offset i
// (residual nullptr: none).
template <int V, typename T>
__device__ __forceinline__ void pre_activation(const T* x, const T* residual, int64_t i, const ScaleShift (&p)[V],
                                               float (&z)[V]) {
  load_f32<V>(x + i, z);
#pragma unroll
  for (int v = 0; v < V; ++v) z[v] = z[v] * p[v].scale + p[v].shift;
  if (residual != nullptr) {
    float r[V];
    load_f32<V>(residual + i, r);
#pragma unroll
    for (int v = 0; v < V; ++v) z[v] += r[v];
  }
}

// out = act_A(x * scale[c] + shift[c] (+ residual)); alpha: the activation's parameter.
template <typename T, Act A>
struct ApplyOp {
  using Param = ScaleShift;
  const T* x;
  const T* residual;  // nullptr: none
  T* out;
  const float* scale;
  const float* shift;
  float alpha;

  __device__ Param param(int64_t c) const { return {scale[c], shift[c]}; }

  template <int V>
  __device__ __forceinline__ void operator()(int64_t i, const Param (&p)[V]) const {
    float y[V];
    pre_activation<V>(x, residual, i, p, y);
#pragma unroll
    for (int v = 0; v < V; ++v) y[v] = act_fwd<A>(y[v], alpha);
    store_f32<V>(out + i, y);
  }
};

// grad_z = grad_out * act_A'(z), z = x * scale[c] + shift[c] (+ residual) recomputed in fp32.
template <typename T, Act A>
struct ActBackwardOp {
  using Param = ScaleShift;
  const T* grad_out;
  const T* x;
  const T* residual;  // nullptr: none
  T* grad_z;
  const float* scale;
  const float* shift;
  float alpha;

  __device__ Param param(int64_t c) const { return {scale[c], shift[c]}; }

  template <int V>
  __device__ __forceinline__ void operator()(int64_t i, const Param (&p)[V]) const {
    float z[V], g[V];
    pre_activation<V>(x, residual, i, p, z);
    load_f32<V>(grad_out + i, g);
#pragma unroll
    for (int v = 0; v < V; ++v) g[v] = act_grad<A>(g[v], z[v], alpha);
    store_f32<V>(grad_z + i, g);
  }
};

// dy = grad_out (0 where output <= 0); grad_input = dy * dy_scale[c] (+ (x - mean[c]) * x_scale[c] + shift[c]);
// grad_residual = dy. x is centred before scaling: no cancellation when |mean| >> std.
template <typename T>
struct BackwardElemtOp {
  struct Param {
    float dy_scale, mean, x_scale, shift;
  };
  const T* grad_out;
  const T* output;  // nullptr: no relu
  const T* x;       // nullptr: eval (mean, x_scale, shift unused)
  T* grad_input;
  T* grad_residual;  // nullptr: not needed
  const float* mean;
  const float* dy_scale;
  const float* x_scale;
  const float* shift;

  __device__ Param param(int64_t c) const {
    return x != nullptr ? Param{dy_scale[c], mean[c], x_scale[c], shift[c]} : Param{dy_scale[c], 0.f, 0.f, 0.f};
  }

  template <int V>
  __device__ __forceinline__ void operator()(int64_t i, const Param (&p)[V]) const {
    float dy[V];
    load_f32<V>(grad_out + i, dy);
    if (output != nullptr) {
      float o[V];
      load_f32<V>(output + i, o);
#pragma unroll
      for (int v = 0; v < V; ++v) dy[v] = relu_grad(dy[v], o[v]);
    }
    if (grad_residual != nullptr) store_f32<V>(grad_residual + i, dy);
    float gi[V];
#pragma unroll
    for (int v = 0; v < V; ++v) gi[v] = dy[v] * p[v].dy_scale;
    if (x != nullptr) {
      float xv[V];
      load_f32<V>(x + i, xv);
#pragma unroll
      for (int v = 0; v < V; ++v) gi[v] = gi[v] + (xv[v] - p[v].mean) * p[v].x_scale + p[v].shift;
    }
    store_f32<V>(grad_input + i, gi);
  }
};

// ================================ reductions ================================
//
// A reducer R keeps, per lane (channel), a state of R::K floats, all zero when empty:
//   R::Param param(c)                       per-channel input of accumulate
//   accumulate<V>(a[V*K], p[V], i)          fold the V-vector at element offset i into lanes a[v*K ..]
//   static combine(a[K], b[K])              merge state b into a (associative)
//   write(c, a[K])                          store the final state of channel c

// Partial states over a block's share of the activation, ws[k][c][blockIdx.x] for k < K.
// channels_last: as channel_map_kernel, with blockDim.x <= 32 channel vectors (so that the
//   partials, K * C * gridDim.x floats, stay small); then a tree over threadIdx.y, lane by lane.
// NCHW: grid.y strides over channels; the gridDim.x = gx_n * gx_hw blocks of a channel tile its
//   N x (HW / V) vectors into blockDim.y x blockDim.x tiles; a thread folds its V lanes (all of
//   channel c), then a tree over the whole block.
// (Launch bounds: at least 4 blocks per SM, i.e. <= 64 registers, which the V-lane states fit.)
template <int V, bool CL, class R>
__global__ void __launch_bounds__(kThreads, 4) channel_reduce_kernel(R r, float* __restrict__ ws, Shape s, int gx_hw) {
  constexpr int K = R::K;
  using P = typename R::Param;
  __shared__ float smem[reduce_smem_floats<(CL ? V : 1) * K>()];
  const int64_t bx = blockDim.x, by = blockDim.y, parts = gridDim.x;
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  if (blockIdx.x == 0 && blockIdx.y == 0 && tid == 0) r.begin();  // once per launch, before the finalize launch
  if constexpr (CL) {
    const int64_t n_cv = s.C / V, rows = s.N * s.HW;
    for (int64_t cv0 = blockIdx.y * bx; cv0 < n_cv; cv0 += gridDim.y * bx) {  // block-uniform
      const int64_t c0 = (cv0 + threadIdx.x) * V;
      float a[V * K] = {};
      if (c0 < s.C) {
        P p[V];
#pragma unroll
        for (int v = 0; v < V; ++v) p[v] = r.param(c0 + v);
        for (int64_t row = blockIdx.x * by + threadIdx.y; row < rows; row += parts * by)
          r.template accumulate<V>(a, p, row * s.C + c0);
      }
      block_reduce(a, smem, threadIdx.y, blockDim.y, blockDim.x, [](float* acc, const float* other) {
#pragma unroll
        for (int v = 0; v < V; ++v) R::combine(acc + v * K, other + v * K);
      });
      if (threadIdx.y == 0 && c0 < s.C) {
#pragma unroll
        for (int v = 0; v < V; ++v) {
#pragma unroll
          for (int k = 0; k < K; ++k) ws[(k * s.C + c0 + v) * parts + blockIdx.x] = a[v * K + k];
        }
      }
    }
  } else {
    const int64_t n_hwv = s.HW / V;
    const int gx_n = gridDim.x / gx_hw, b_n = blockIdx.x / gx_hw, b_hw = blockIdx.x % gx_hw;
    for (int64_t c = blockIdx.y; c < s.C; c += gridDim.y) {  // block-uniform
      const P pc = r.param(c);
      P p[V];
#pragma unroll
      for (int v = 0; v < V; ++v) p[v] = pc;
      float a[V * K] = {};
      for (int64_t n = b_n * by + threadIdx.y; n < s.N; n += gx_n * by) {
        const int64_t plane = (n * s.C + c) * s.HW;
        for (int64_t i = b_hw * bx + threadIdx.x; i < n_hwv; i += gx_hw * bx) r.template accumulate<V>(a, p, plane + i * V);
      }
      float t[K];
#pragma unroll
      for (int k = 0; k < K; ++k) t[k] = a[k];
#pragma unroll
      for (int v = 1; v < V; ++v) R::combine(t, a + v * K);
      block_reduce(t, smem, tid, blockDim.x * blockDim.y, 1,
                   [](float* acc, const float* other) { R::combine(acc, other); });
      if (tid == 0) {
#pragma unroll
        for (int k = 0; k < K; ++k) ws[(k * s.C + c) * parts + blockIdx.x] = t[k];
      }
    }
  }
}

// Merges the `parts` partial states ws[k][c][:] of each channel c (a block per channel, grid-stride:
// a strided pass per thread, then a tree) and writes the result.
template <class R>
__global__ void __launch_bounds__(kThreads)
    channel_finalize_kernel(R r, const float* __restrict__ ws, int64_t C, int64_t parts) {
  constexpr int K = R::K;
  __shared__ float smem[reduce_smem_floats<K>()];
  for (int64_t c = blockIdx.x; c < C; c += gridDim.x) {  // block-uniform
    float a[K] = {};
    for (int64_t j = threadIdx.x; j < parts; j += blockDim.x) {
      float b[K];
#pragma unroll
      for (int k = 0; k < K; ++k) b[k] = ws[(k * C + c) * parts + j];
      R::combine(a, b);
    }
    block_reduce(a, smem, threadIdx.x, blockDim.x, 1, [](float* acc, const float* other) { R::combine(acc, other); });
    if (threadIdx.x == 0) r.write(c, a);
  }
}

// A reducer's last step per channel, after its results are written (channel_finalize_kernel's thread 0): nothing, or a
// per-channel functor of bn_coeffs.h reading those results back (bn_stats_scale_shift, bn_act_backward_reduce_coeffs:
// the coefficients in the finalize's launch instead of one of their own).
struct NoEpilogue {
  __device__ void operator()(int64_t) const {}
};

// The training forward's finalize step per channel: scale and shift, and where `update`, the running statistics' update
// (num_batches_tracked counted by the reduction's launch: StatsReducer::begin)
struct ScaleShiftRunning {
  coeffs::ScaleShift scale_shift;
  coeffs::RunningUpdate running;
  bool update;

  __device__ void operator()(int64_t c) const {
    scale_shift(c);
    if (update) running(c);
  }
};

// Per-channel mean and biased variance of x. State (mean, M2, count), count shared by the V lanes.
// Welford per element, Chan's merge (welford_merge) across lanes, threads and blocks. A thread's
// count is exact in fp32 up to 2^24 elements per lane, far beyond any per-thread share.
template <typename T, class E = NoEpilogue>
struct StatsReducer {
  static constexpr int K = 3;
  struct Param {};
  const T* x;
  float* mean;
  float* var;
  E epilogue;
  int64_t* num_batches_tracked = nullptr;  // counted (+= 1) once per launch where given

  __device__ void begin() const {
    if (num_batches_tracked != nullptr) ++*num_batches_tracked;
  }
  __device__ Param param(int64_t) const { return {}; }

  // n' = n + 1;  mean' = mean + (x - mean) / n';  M2' = M2 + (x - mean) * (x - mean')
  template <int V>
  __device__ __forceinline__ void accumulate(float (&a)[V * K], const Param (&)[V], int64_t i) const {
    float xv[V];
    load_f32<V>(x + i, xv);
    const float n = a[2] + 1.f;
    const float inv_n = 1.f / n;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      float& mu = a[v * K];
      const float d = xv[v] - mu;
      mu += d * inv_n;
      a[v * K + 1] += d * (xv[v] - mu);
      a[v * K + 2] = n;
    }
  }

  static __device__ __forceinline__ void combine(float* a, const float* b) {
    welford_merge(a[0], a[1], a[2], b[0], b[1], b[2]);
  }

  __device__ void write(int64_t c, const float (&a)[K]) const {
    mean[c] = a[0];
    var[c] = a[2] > 0.f ? a[1] / a[2] : 0.f;  // biased: M2 / count
    epilogue(c);
  }
};

// (sum dy, sum dy * (x - mean[c])), dy = grad_out (0 where output <= 0). State: the two fp32 sums of the
// lane; each thread sums its own share, threads and blocks are merged by trees.
template <typename T, class E = NoEpilogue>
struct BackwardReducer {
  static constexpr int K = 2;
  struct Param {
    float mean;
  };
  const T* grad_out;
  const T* x;
  const T* output;  // nullptr: no relu
  const float* mean;
  float* sum_dy;
  float* sum_dy_xmu;
  E epilogue;

  __device__ void begin() const {}
  __device__ Param param(int64_t c) const { return {mean[c]}; }

  template <int V>
  __device__ __forceinline__ void accumulate(float (&a)[V * K], const Param (&p)[V], int64_t i) const {
    float dy[V], xv[V];
    load_f32<V>(grad_out + i, dy);
    load_f32<V>(x + i, xv);
    if (output != nullptr) {
      float o[V];
      load_f32<V>(output + i, o);
#pragma unroll
      for (int v = 0; v < V; ++v) dy[v] = relu_grad(dy[v], o[v]);
    }
#pragma unroll
    for (int v = 0; v < V; ++v) {
      a[v * K] += dy[v];
      a[v * K + 1] += dy[v] * (xv[v] - p[v].mean);
    }
  }

  static __device__ __forceinline__ void combine(float* a, const float* b) {
    a[0] += b[0];
    a[1] += b[1];
  }

  __device__ void write(int64_t c, const float (&a)[K]) const {
    sum_dy[c] = a[0];
    sum_dy_xmu[c] = a[1];
    epilogue(c);
  }
};

// ================================ launchers ================================

// fn(integral_constant<int, V>, bool_constant<CL>) with V = VW if vec else 1, CL = channels_last.
template <int VW, class Fn>
void dispatch_vec_layout(bool vec, bool cl, Fn&& fn) {
  using Wide = std::integral_constant<int, VW>;
  using Scalar = std::integral_constant<int, 1>;
  if (vec && cl) {
    fn(Wide{}, std::true_type{});
  } else if (vec) {
    fn(Wide{}, std::false_type{});
  } else if (cl) {
    fn(Scalar{}, std::true_type{});
  } else {
    fn(Scalar{}, std::false_type{});
  }
}

// V-vectors fit: the row length (C in channels_last, HW in NCHW) is a multiple of VW and every
// given pointer is 16-byte aligned.
inline bool vectorizable(const Shape& s, bool cl, int vw, std::initializer_list<const void*> ptrs) {
  return (cl ? s.C : s.HW) % vw == 0 && aligned16(ptrs);
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <int VW, class F>
void launch_channel_map(const F& f, const Shape& s, bool cl, bool vec) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_vec_layout<VW>(vec, cl, [&](auto v_, auto cl_) {
    constexpr int V = decltype(v_)::value;
    constexpr bool CL = decltype(cl_)::value;
    const int64_t inner = (CL ? s.C : s.HW) / V;  // V-vectors per row
    const int64_t rows = CL ? s.N * s.HW : s.N * s.C;
    const dim3 block = tile_block(inner);
    const int64_t gy = std::min(ceil_div(inner, block.x), kMaxGridY);
    const auto kernel = channel_map_kernel<V, CL, F>;
    const int64_t gx = std::min(ceil_div(rows, block.y),
                                std::max<int64_t>(1, resident_blocks(kernel, block.x * block.y) / gy));
    kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), block, 0, stream>>>(f, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Runs reducer r over the dense activation x (which gives the shape and the workspace device).
template <int VW, class R>
void launch_channel_reduce(const R& r, const at::Tensor& x, bool cl, bool vec) {
  const Shape s = shape_of(x);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_vec_layout<VW>(vec, cl, [&](auto v_, auto cl_) {
    constexpr int V = decltype(v_)::value;
    constexpr bool CL = decltype(cl_)::value;
    const auto kernel = channel_reduce_kernel<V, CL, R>;
    dim3 block;
    int64_t gx, gy;  // gx = partial states per channel
    int gx_hw = 1;
    if constexpr (CL) {
      const int64_t n_cv = s.C / V;
      block = tile_block(n_cv, 32);
      gy = std::min(ceil_div(n_cv, block.x), kMaxGridY);
      const int64_t want = std::max<int64_t>(1, resident_blocks(kernel, block.x * block.y) / gy);
      gx = std::min(ceil_div(s.N * s.HW, block.y), want);
    } else {
      const int64_t n_hwv = s.HW / V;
      block = tile_block(n_hwv);
      gy = std::min(s.C, kMaxGridY);
      const int64_t want = std::max<int64_t>(1, resident_blocks(kernel, block.x * block.y) / gy);
      gx_hw = static_cast<int>(std::min(ceil_div(n_hwv, block.x), want));
      gx = gx_hw * std::min(ceil_div(s.N, block.y), std::max<int64_t>(1, want / gx_hw));
    }
    const at::Tensor ws = at::empty({R::K, s.C, gx}, x.options().dtype(at::kFloat));
    kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), block, 0, stream>>>(r, ws.mutable_data_ptr<float>(),
                                                                                            s, gx_hw);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int threads = static_cast<int>(std::min<int64_t>(kThreads, ceil_div(gx, 32) * 32));
    const auto finalize = channel_finalize_kernel<R>;
    const int64_t blocks = std::min(s.C, resident_blocks(finalize, threads));
    finalize<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(r, ws.const_data_ptr<float>(), s.C, gx);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

// ================================ ops ================================

namespace {

// bn_stats over the checked input, the reducer's epilogue made by make_epilogue(mean, var) (NoEpilogue, or the
// scale / shift functor reading them back), num_batches_tracked (nullptr: none) counted in the reduction's launch; an
// empty input gives zero statistics and no launch
template <class MakeEpilogue>
std::tuple<at::Tensor, at::Tensor> batch_stats(const at::Tensor& input, MakeEpilogue make_epilogue,
                                               int64_t* num_batches_tracked = nullptr) {
  const c10::cuda::CUDAGuard guard(input.device());
  const at::MemoryFormat fmt = layout_of(input);
  const at::Tensor x = dense(input, fmt);
  const auto fopts = x.options().dtype(at::kFloat);
  const int64_t C = x.size(1);
  if (x.numel() == 0) return {at::zeros({C}, fopts), at::zeros({C}, fopts)};

  at::Tensor mean = at::empty({C}, fopts);
  at::Tensor var = at::empty({C}, fopts);
  const auto epilogue = make_epilogue(mean, var);
  const Shape s = shape_of(x);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  RF_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_stats", [&] {
    constexpr int VW = vec_width<scalar_t>();
    const StatsReducer<scalar_t, std::decay_t<decltype(epilogue)>> r{
        x.const_data_ptr<scalar_t>(), mean.mutable_data_ptr<float>(), var.mutable_data_ptr<float>(), epilogue,
        num_batches_tracked};
    launch_channel_reduce<VW>(r, x, cl, vectorizable(s, cl, VW, {r.x}));
  });
  return {mean, var};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& input) {
  check_bn_stats(input);
  return batch_stats(input, [](const at::Tensor&, const at::Tensor&) { return NoEpilogue{}; });
}

// bn_stats, then bn_scale_shift, then the running update, in bn_stats's two launches (the count in the first, the
// coefficients and the update in the finalize: three launches fewer than the ops); an empty input, or running
// statistics a kernel cannot update in place: the steps
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_stats_scale_shift_cuda(const at::Tensor& input,
                                                                                     const std::optional<at::Tensor>& weight,
                                                                                     const std::optional<at::Tensor>& bias,
                                                                                     double eps, const coeffs::Running& running) {
  check_bn_stats(input);
  if (input.numel() == 0 || !running.in_place()) {
    auto [mean, var] = bn_stats_cuda(input);
    auto [scale, shift] = bn_scale_shift_cuda(mean, var, weight, bias, eps);
    update_running_cuda(running, mean, var);
    return {mean, var, scale, shift};
  }
  const int64_t C = input.size(1);
  const auto fopts = input.options().dtype(at::kFloat);
  at::Tensor scale = at::empty({C}, fopts), shift = at::empty({C}, fopts);
  const at::Tensor w = coeffs::dense_vector(weight), b = coeffs::dense_vector(bias);
  const at::Tensor n = running.num_batches_tracked.value_or(at::Tensor());
  const at::Tensor rm = running.mean.value_or(at::Tensor()), rv = running.var.value_or(at::Tensor());
  const at::Tensor momentum = coeffs::dense_vector(running.momentum_tensor);
  auto [mean, var] = batch_stats(
      input,
      [&](const at::Tensor& m, const at::Tensor& v) {
        check_bn_scale_shift(m, v, weight, bias);
        return ScaleShiftRunning{
            coeffs::ScaleShift{coeffs::in(m), coeffs::in(v), coeffs::in(w, 1.0), coeffs::in(b), eps,
                               scale.mutable_data_ptr<float>(), shift.mutable_data_ptr<float>()},
            running.updates() ? coeffs::running_update(rm, rv, m, v, momentum, n, running.momentum_used(), running.count)
                              : coeffs::RunningUpdate{},
            running.updates()};
      },
      n.defined() ? n.mutable_data_ptr<int64_t>() : nullptr);
  return {mean, var, scale, shift};
}

at::Tensor bn_act_apply_cuda(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& shift,
                             const std::optional<at::Tensor>& residual, std::string_view act, double alpha) {
  check_bn_act_apply(input, scale, shift, residual);
  const Act a = parse_act(act, "bn_act_apply");
  const c10::cuda::CUDAGuard guard(input.device());
  const at::MemoryFormat fmt = layout_of(input);
  const at::Tensor x = dense(input, fmt);
  const at::Tensor res = dense(residual, fmt);
  at::Tensor out = empty_as(x, fmt);
  if (x.numel() == 0) return out;

  const at::Tensor scale_c = scale.contiguous();
  const at::Tensor shift_c = shift.contiguous();
  const Shape s = shape_of(x);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  RF_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_act_apply", [&] {
    constexpr int VW = vec_width<scalar_t>();
    dispatch_act(a, [&](auto tag) {
      constexpr Act A = decltype(tag)::value;
      const ApplyOp<scalar_t, A> f{x.const_data_ptr<scalar_t>(),     ptr_or_null<scalar_t>(res),
                                   out.mutable_data_ptr<scalar_t>(), scale_c.const_data_ptr<float>(),
                                   shift_c.const_data_ptr<float>(),  static_cast<float>(alpha)};
      launch_channel_map<VW>(f, s, cl, vectorizable(s, cl, VW, {f.x, f.residual, f.out}));
    });
  });
  return out;
}

// Laid out like input (grad_out and residual follow it), in grad_out's dtype (= input's, checked).
at::Tensor act_backward_cuda(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& scale,
                             const at::Tensor& shift, const std::optional<at::Tensor>& residual, std::string_view act,
                             double alpha) {
  check_act_backward(grad_out, input, scale, shift, residual);
  const Act a = parse_act(act, "act_backward");
  const c10::cuda::CUDAGuard guard(input.device());
  const at::MemoryFormat fmt = layout_of(input);
  const at::Tensor g = dense(grad_out, fmt);
  const at::Tensor x = dense(input, fmt);
  const at::Tensor res = dense(residual, fmt);
  at::Tensor grad_z = empty_as(g, fmt);
  if (x.numel() == 0) return grad_z;

  const at::Tensor scale_c = scale.contiguous();
  const at::Tensor shift_c = shift.contiguous();
  const Shape s = shape_of(x);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  RF_DISPATCH_FLOATING_TYPES(x.scalar_type(), "act_backward", [&] {
    constexpr int VW = vec_width<scalar_t>();
    dispatch_act(a, [&](auto tag) {
      constexpr Act A = decltype(tag)::value;
      const ActBackwardOp<scalar_t, A> f{g.const_data_ptr<scalar_t>(),        x.const_data_ptr<scalar_t>(),
                                         ptr_or_null<scalar_t>(res),          grad_z.mutable_data_ptr<scalar_t>(),
                                         scale_c.const_data_ptr<float>(),     shift_c.const_data_ptr<float>(),
                                         static_cast<float>(alpha)};
      launch_channel_map<VW>(f, s, cl, vectorizable(s, cl, VW, {f.grad_out, f.x, f.residual, f.grad_z}));
    });
  });
  return grad_z;
}

namespace {

// bn_act_backward_reduce over checked inputs, the reducer's epilogue made by make_epilogue(sum_dy, sum_dy_xmu)
template <class MakeEpilogue>
std::tuple<at::Tensor, at::Tensor> backward_sums(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                                                 const std::optional<at::Tensor>& output, MakeEpilogue make_epilogue) {
  const c10::cuda::CUDAGuard guard(input.device());
  const at::MemoryFormat fmt = layout_of(input);
  const at::Tensor g = dense(grad_out, fmt);
  const at::Tensor x = dense(input, fmt);
  const at::Tensor o = dense(output, fmt);
  const auto fopts = x.options().dtype(at::kFloat);
  const int64_t C = x.size(1);
  if (x.numel() == 0) return {at::zeros({C}, fopts), at::zeros({C}, fopts)};

  const at::Tensor mean_c = mean.contiguous();
  at::Tensor sum_dy = at::empty({C}, fopts);
  at::Tensor sum_dy_xmu = at::empty({C}, fopts);
  const auto epilogue = make_epilogue(sum_dy, sum_dy_xmu);
  const Shape s = shape_of(x);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  RF_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_act_backward_reduce", [&] {
    constexpr int VW = vec_width<scalar_t>();
    const BackwardReducer<scalar_t, std::decay_t<decltype(epilogue)>> r{
        g.const_data_ptr<scalar_t>(),     x.const_data_ptr<scalar_t>(),        ptr_or_null<scalar_t>(o),
        mean_c.const_data_ptr<float>(),   sum_dy.mutable_data_ptr<float>(),    sum_dy_xmu.mutable_data_ptr<float>(),
        epilogue};
    launch_channel_reduce<VW>(r, x, cl, vectorizable(s, cl, VW, {r.grad_out, r.x, r.output}));
  });
  return {sum_dy, sum_dy_xmu};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> bn_act_backward_reduce_cuda(const at::Tensor& grad_out, const at::Tensor& input,
                                                               const at::Tensor& mean,
                                                               const std::optional<at::Tensor>& output) {
  check_bn_act_backward_reduce(grad_out, input, mean, output);
  return backward_sums(grad_out, input, mean, output, [](const at::Tensor&, const at::Tensor&) { return NoEpilogue{}; });
}

// bn_act_backward_reduce, then bn_backward_coeffs of those sums in the reduction's finalize launch (one launch fewer
// than the two ops; an empty input: the two ops)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward_reduce_coeffs_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean, const std::optional<at::Tensor>& output,
    const at::Tensor& var, const std::optional<at::Tensor>& weight, double eps, double count, bool training) {
  check_bn_act_backward_reduce(grad_out, input, mean, output);
  if (input.numel() == 0) {
    auto [sum_dy, sum_dy_xmu] = bn_act_backward_reduce_cuda(grad_out, input, mean, output);
    auto [a, b, c, grad_weight] = bn_backward_coeffs_cuda(sum_dy, sum_dy_xmu, var, weight, eps, count, training);
    return {sum_dy, sum_dy_xmu, a, b, c, grad_weight};
  }
  const int64_t C = input.size(1);
  const auto fopts = input.options().dtype(at::kFloat);
  at::Tensor a = at::empty({C}, fopts), b = at::empty({C}, fopts), c = at::empty({C}, fopts);
  at::Tensor grad_weight = at::empty({C}, fopts);
  const at::Tensor v = coeffs::dense_vector(var), w = coeffs::dense_vector(weight);
  auto [sum_dy, sum_dy_xmu] = backward_sums(grad_out, input, mean, output, [&](const at::Tensor& sd, const at::Tensor& sx) {
    check_bn_backward_coeffs(sd, sx, var, weight);
    return coeffs::BackwardCoeffs{coeffs::in(sd), coeffs::in(sx), coeffs::in(v), coeffs::in(w, 1.0), eps, count, training,
                                  /*xhat_sums=*/false, a.mutable_data_ptr<float>(), b.mutable_data_ptr<float>(),
                                  c.mutable_data_ptr<float>(), grad_weight.mutable_data_ptr<float>()};
  });
  return {sum_dy, sum_dy_xmu, a, b, c, grad_weight};
}

std::tuple<at::Tensor, at::Tensor> bn_act_backward_elemt_cuda(const at::Tensor& grad_out,
                                                              const std::optional<at::Tensor>& output,
                                                              const std::optional<at::Tensor>& input,
                                                              const std::optional<at::Tensor>& mean,
                                                              const at::Tensor& dy_scale,
                                                              const std::optional<at::Tensor>& x_scale,
                                                              const std::optional<at::Tensor>& shift,
                                                              bool need_grad_residual) {
  check_bn_act_backward_elemt(grad_out, output, input, mean, dy_scale, x_scale, shift);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const at::MemoryFormat fmt = layout_of(input.has_value() ? *input : grad_out);
  const at::Tensor g = dense(grad_out, fmt);
  const at::Tensor o = dense(output, fmt);
  const at::Tensor x = dense(input, fmt);
  at::Tensor grad_input = empty_as(g, fmt);
  at::Tensor grad_residual = need_grad_residual ? empty_as(g, fmt) : at::empty({0}, grad_out.options());
  if (g.numel() == 0) return {grad_input, grad_residual};

  const at::Tensor dy_scale_c = dy_scale.contiguous();
  const at::Tensor mean_c = x.defined() ? mean->contiguous() : at::Tensor();
  const at::Tensor x_scale_c = x.defined() ? x_scale->contiguous() : at::Tensor();
  const at::Tensor shift_c = x.defined() ? shift->contiguous() : at::Tensor();
  const Shape s = shape_of(g);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  RF_DISPATCH_FLOATING_TYPES(g.scalar_type(), "bn_act_backward_elemt", [&] {
    constexpr int VW = vec_width<scalar_t>();
    const BackwardElemtOp<scalar_t> f{g.const_data_ptr<scalar_t>(),
                                      ptr_or_null<scalar_t>(o),
                                      ptr_or_null<scalar_t>(x),
                                      grad_input.mutable_data_ptr<scalar_t>(),
                                      need_grad_residual ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr,
                                      ptr_or_null<float>(mean_c),
                                      dy_scale_c.const_data_ptr<float>(),
                                      ptr_or_null<float>(x_scale_c),
                                      ptr_or_null<float>(shift_c)};
    launch_channel_map<VW>(f, s, cl,
                           vectorizable(s, cl, VW, {f.grad_out, f.output, f.x, f.grad_input, f.grad_residual}));
  });
  return {grad_input, grad_residual};
}

}  // namespace resnet_fused::gpu

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("bn_stats", &resnet_fused::gpu::bn_stats_cuda);
  m.impl("bn_act_apply", &resnet_fused::gpu::bn_act_apply_cuda);
  m.impl("act_backward", &resnet_fused::gpu::act_backward_cuda);
  m.impl("bn_act_backward_reduce", &resnet_fused::gpu::bn_act_backward_reduce_cuda);
  m.impl("bn_act_backward_elemt", &resnet_fused::gpu::bn_act_backward_elemt_cuda);
}
