// Vectorized, parallel per-channel elementwise maps and reductions over (N, C, H, W) activations on
// the CPU, in either dense layout:
//   channels_last: N*H*W rows of C channels   -> a run is one row, the channel varies along it
//   contiguous:    N*C planes of H*W pixels   -> a run is one plane, the channel is fixed
// Ops write their math once, as a generic lambda over `float` and `Vectorized<float>`.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <array>

namespace resnet_fused::cpu {

using fVec = at::vec::Vectorized<float>;
using dVec = at::vec::Vectorized<double>;
constexpr int64_t kVec = fVec::size();
constexpr int64_t kDVec = dVec::size();

// ---- loads and stores of kVec elements, converted to / from fp32 ----
template <typename T>
inline fVec load_f(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return fVec::loadu(p);
  } else {
    fVec v;
    at::vec::load_to_float(p, v);
    return v;
  }
}

template <typename T>
inline void store_f(T* p, fVec v) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, kVec);
  }
}

// kDVec elements of T, widened to fp64 (reductions accumulate in fp64 on the CPU, as eager does)
template <typename T>
inline dVec load_d(const T* p) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) return dVec(_mm256_cvtps_pd(_mm_loadu_ps(p)));  // 4 floats -> 4 doubles
#endif
  __at_align__ double buf[kDVec];
  for (int64_t i = 0; i < kDVec; ++i) buf[i] = static_cast<double>(static_cast<float>(p[i]));
  return dVec::loadu(buf);
}

// ---- the same math on a scalar and on a vector ----
// relu(x) = x < 0 ? 0 : x: NaN stays NaN, as torch.relu (a max(x, 0) may drop it)
template <typename S>
inline S relu(S x) { return x < S(0) ? S(0) : x; }
template <typename S>
inline at::vec::Vectorized<S> relu(at::vec::Vectorized<S> x) {
  using V = at::vec::Vectorized<S>;
  return V::blendv(x, V(S(0)), x < V(S(0)));
}
// dy = out <= 0 ? 0 : grad: d relu(z)/dz read off the saved output, as aten threshold_backward (a
// NaN output passes the gradient; a masked-off element gets 0 even where grad is inf / NaN)
template <typename S>
inline S relu_mask(S grad, S out) { return out <= S(0) ? S(0) : grad; }
template <typename S>
inline at::vec::Vectorized<S> relu_mask(at::vec::Vectorized<S> grad, at::vec::Vectorized<S> out) {
  using V = at::vec::Vectorized<S>;
  return V::blendv(grad, V(S(0)), out <= V(S(0)));
}

// Geometry of one activation: its layout and how its elements split into runs.
struct Runs {
  bool channels_last;
  int64_t num_runs;  // N*H*W rows or N*C planes
  int64_t run_len;   // C or H*W
  int64_t C;
  Runs(const at::Tensor& t, at::MemoryFormat fmt)
      : channels_last(fmt == at::MemoryFormat::ChannelsLast),
        num_runs(channels_last ? t.size(0) * t.size(2) * t.size(3) : t.size(0) * t.size(1)),
        run_len(channels_last ? t.size(1) : t.size(2) * t.size(3)),
        C(t.size(1)) {}
  int64_t channel_of_run(int64_t run) const { return run % C; }  // contiguous layout only
};

// out[k][i] = math(in[0][i], ..., param[0][c(i)], ...)[k] for every element i of the activation.
// `math(std::array<V, kIn>, std::array<V, kParam>) -> std::array<V, kOut>`, V in {float, fVec}.
template <size_t kIn, size_t kParam, size_t kOut, typename T, typename Math>
void channel_map(const Runs& g, std::array<const T*, kIn> in, std::array<const float*, kParam> params,
                 std::array<T*, kOut> out, const Math& math) {
  // one run [base, base + run_len); param(k, j) gives param k at position j as a vector or a scalar
  const auto map_run = [&](int64_t base, const auto& param_vec, const auto& param_scalar) {
    int64_t j = 0;
    for (; j + kVec <= g.run_len; j += kVec) {
      std::array<fVec, kIn> xs;
      std::array<fVec, kParam> cs;
      for (size_t k = 0; k < kIn; ++k) xs[k] = load_f(in[k] + base + j);
      for (size_t k = 0; k < kParam; ++k) cs[k] = param_vec(k, j);
      const std::array<fVec, kOut> ys = math(xs, cs);
      for (size_t k = 0; k < kOut; ++k) store_f(out[k] + base + j, ys[k]);
    }
    for (; j < g.run_len; ++j) {
      std::array<float, kIn> xs;
      std::array<float, kParam> cs;
      for (size_t k = 0; k < kIn; ++k) xs[k] = static_cast<float>(in[k][base + j]);
      for (size_t k = 0; k < kParam; ++k) cs[k] = param_scalar(k, j);
      const std::array<float, kOut> ys = math(xs, cs);
      for (size_t k = 0; k < kOut; ++k) out[k][base + j] = static_cast<T>(ys[k]);
    }
  };
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(g.run_len, 1));
  at::parallel_for(0, g.num_runs, grain, [&](int64_t run_begin, int64_t run_end) {
    for (int64_t run = run_begin; run < run_end; ++run) {
      if (g.channels_last) {  // the channel varies along the row: params load alongside the data
        map_run(run * g.run_len, [&](size_t k, int64_t j) { return fVec::loadu(params[k] + j); },
                [&](size_t k, int64_t j) { return params[k][j]; });
      } else {  // one channel per plane: params broadcast once
        const int64_t c = g.channel_of_run(run);
        std::array<fVec, kParam> cv;
        for (size_t k = 0; k < kParam; ++k) cv[k] = fVec(params[k][c]);
        map_run(run * g.run_len, [&](size_t k, int64_t) { return cv[k]; }, [&](size_t k, int64_t) { return params[k][c]; });
      }
    }
  });
}

// ---- per-channel reductions, in two levels ----
// The activation is cut into chunks of about kChunkElems elements: a block of rows (channels_last) or
// a segment of one plane (contiguous). Each chunk is reduced in fp64 vector lanes (the CPU has the
// bandwidth to spare, and eager PyTorch accumulates in fp64 here too); chunk results are combined per
// channel in a fixed order (deterministic).
struct Chunks {
  static constexpr int64_t kChunkElems = 16384;  // stays in L1/L2 when a chunk is read twice
  const Runs& g;
  int64_t len;        // rows per chunk (channels_last) or elements per plane segment (contiguous)
  int64_t per_plane;  // segments per plane (contiguous)
  int64_t count;      // chunks in all
  int64_t width;      // channels one chunk covers: C (channels_last) or 1 (contiguous)
  explicit Chunks(const Runs& runs) : g(runs) {
    if (g.channels_last) {
      len = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(g.C, 1));
      per_plane = 1;
      count = (g.num_runs + len - 1) / len;
      width = g.C;
    } else {
      len = std::max<int64_t>(1, std::min(g.run_len, kChunkElems));
      per_plane = (g.run_len + len - 1) / len;
      count = g.num_runs * per_plane;
      width = 1;
    }
  }
  // elements of each covered channel inside the chunk
  int64_t elems(int64_t chunk) const {
    return g.channels_last ? std::min(g.num_runs, (chunk + 1) * len) - chunk * len
                           : std::min(len, g.run_len - (chunk % per_plane) * len);
  }
  int64_t first_channel(int64_t chunk) const { return g.channels_last ? 0 : g.channel_of_run(chunk / per_plane); }
  // f(chunk, c, slot) for every chunk covering each channel c in [c0, c1), each channel's chunks in a
  // fixed order (deterministic sums); slot = chunk * width + (c - first channel). channels_last walks
  // chunk by chunk, so that the partials of [c0, c1) are read as contiguous runs.
  template <typename F>
  void for_each_chunk_of(int64_t c0, int64_t c1, const F& f) const {
    if (g.channels_last) {
      for (int64_t k = 0; k < count; ++k)
        for (int64_t c = c0; c < c1; ++c) f(k, c, k * width + c);
    } else {
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t plane = c; plane < g.num_runs; plane += g.C)
          for (int64_t s = 0; s < per_plane; ++s) f(plane * per_plane + s, c, plane * per_plane + s);
    }
  }
};

// acc[k][c] = sum over the chunk's elements of channel c of math(in..., param...)[k], in fp64, for the
// channels the chunk covers (all C in channels_last, its one channel in contiguous; others untouched).
// acc and params are indexed by channel; math takes and returns double or Vectorized<double>.
template <size_t kIn, size_t kParam, size_t kAcc, typename T, typename Math>
void chunk_sums(const Chunks& ch, int64_t chunk, std::array<const T*, kIn> in, std::array<const double*, kParam> params,
                std::array<double*, kAcc> acc, const Math& math) {
  const Runs& g = ch.g;
  if (g.channels_last) {
    // rows [r0, r1) of C channels. Blocks of kBlock channels: the block's sums stay in registers while
    // the rows stream by (a row's block is one cache line of fp32); leftover channels go row by row.
    constexpr int64_t kUnroll = kIn + kAcc > 3 ? 2 : 4, kBlock = kUnroll * kDVec;  // within 16 vector registers
    const int64_t r0 = chunk * ch.len, r1 = std::min(g.num_runs, r0 + ch.len);
    int64_t j0 = 0;
    for (; j0 + kBlock <= g.C; j0 += kBlock) {
      std::array<std::array<dVec, kUnroll>, kAcc> sums;
      std::array<std::array<dVec, kParam>, kUnroll> cs;
      for (size_t k = 0; k < kAcc; ++k) sums[k].fill(dVec(0.0));
      for (int64_t u = 0; u < kUnroll; ++u)
        for (size_t k = 0; k < kParam; ++k) cs[u][k] = dVec::loadu(params[k] + j0 + u * kDVec);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t base = r * g.C + j0;
        for (int64_t u = 0; u < kUnroll; ++u) {
          std::array<dVec, kIn> xs;
          for (size_t k = 0; k < kIn; ++k) xs[k] = load_d(in[k] + base + u * kDVec);
          const std::array<dVec, kAcc> t = math(xs, cs[u]);
          for (size_t k = 0; k < kAcc; ++k) sums[k][u] = sums[k][u] + t[k];
        }
      }
      for (size_t k = 0; k < kAcc; ++k)
        for (int64_t u = 0; u < kUnroll; ++u) sums[k][u].store(acc[k] + j0 + u * kDVec);
    }
    for (size_t k = 0; k < kAcc; ++k) std::fill(acc[k] + j0, acc[k] + g.C, 0.0);
    for (int64_t r = r0; r < r1 && j0 < g.C; ++r) {
      const int64_t base = r * g.C;
      int64_t j = j0;
      for (; j + kDVec <= g.C; j += kDVec) {
        std::array<dVec, kIn> xs;
        std::array<dVec, kParam> cs;
        for (size_t k = 0; k < kIn; ++k) xs[k] = load_d(in[k] + base + j);
        for (size_t k = 0; k < kParam; ++k) cs[k] = dVec::loadu(params[k] + j);
        const std::array<dVec, kAcc> t = math(xs, cs);
        for (size_t k = 0; k < kAcc; ++k) (dVec::loadu(acc[k] + j) + t[k]).store(acc[k] + j);
      }
      for (; j < g.C; ++j) {
        std::array<double, kIn> xs;
        std::array<double, kParam> cs;
        for (size_t k = 0; k < kIn; ++k) xs[k] = static_cast<float>(in[k][base + j]);
        for (size_t k = 0; k < kParam; ++k) cs[k] = params[k][j];
        const std::array<double, kAcc> t = math(xs, cs);
        for (size_t k = 0; k < kAcc; ++k) acc[k][j] += t[k];
      }
    }
  } else {
    // one segment of one (n, c) plane; params are that channel's scalars
    const int64_t plane = chunk / ch.per_plane, seg = chunk % ch.per_plane;
    const int64_t base = plane * g.run_len + seg * ch.len;
    const int64_t n = ch.elems(chunk);
    const int64_t c = g.channel_of_run(plane);
    std::array<dVec, kParam> cv;
    std::array<double, kParam> cs;
    for (size_t k = 0; k < kParam; ++k) cs[k] = params[k][c], cv[k] = dVec(cs[k]);
    std::array<dVec, kAcc> vsum;
    vsum.fill(dVec(0.0));
    int64_t j = 0;
    for (; j + kDVec <= n; j += kDVec) {
      std::array<dVec, kIn> xs;
      for (size_t k = 0; k < kIn; ++k) xs[k] = load_d(in[k] + base + j);
      const std::array<dVec, kAcc> t = math(xs, cv);
      for (size_t k = 0; k < kAcc; ++k) vsum[k] = vsum[k] + t[k];
    }
    std::array<double, kAcc> sum;
    for (size_t k = 0; k < kAcc; ++k) sum[k] = at::vec::vec_reduce_all<double>(std::plus<dVec>(), vsum[k]);
    for (; j < n; ++j) {
      std::array<double, kIn> xs;
      for (size_t k = 0; k < kIn; ++k) xs[k] = static_cast<float>(in[k][base + j]);
      const std::array<double, kAcc> t = math(xs, cs);
      for (size_t k = 0; k < kAcc; ++k) sum[k] += t[k];
    }
    for (size_t k = 0; k < kAcc; ++k) acc[k][c] = sum[k];
  }
}

}  // namespace resnet_fused::cpu
