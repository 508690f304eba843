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

#include <algorithm>
#include <array>
#include <vector>

namespace resnet_fused::cpu {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kVec = fVec::size();

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
// The activation is cut into chunks: a block of rows (channels_last) or a segment of one plane (contiguous), each
// small enough to stay in L2 when read twice (bn_stats), streamed in memory order. Each term is computed in fp32 and
// summed per lane in fp64 (Acc = double, as eager's acc_type<float>: signed sums such as sum dy), or (Acc = float) in
// fp32 over kNarrowTerms terms, then added to the fp64 sums: for non-negative terms (sums of squares) a relative
// error of at most kNarrowTerms / 2 fp32 ulps per partial, at half the widening work. Chunk sums are combined per
// channel in fp64 in a fixed order (deterministic).
struct Chunks {
  static constexpr int64_t kChunkElems = 16384;  // 64 KiB of fp32: L1/L2
  static constexpr int64_t kNarrowTerms = 16;    // fp32 terms per lane before they are widened (Acc = float)
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
  // fixed order (deterministic sums); slot = chunk * width + (c - first channel). Both layouts walk the
  // chunks in memory order (channels_last: chunk by chunk; contiguous: image by image, the planes of
  // [c0, c1) in turn), so that the partials of [c0, c1) are read as contiguous runs, not one per C.
  template <typename F>
  void for_each_chunk_of(int64_t c0, int64_t c1, const F& f) const {
    if (g.channels_last) {
      for (int64_t k = 0; k < count; ++k)
        for (int64_t c = c0; c < c1; ++c) f(k, c, k * width + c);
    } else {
      for (int64_t n = 0; n < g.num_runs / g.C; ++n)
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t s = 0, k = (n * g.C + c) * per_plane; s < per_plane; ++s, ++k) f(k, c, k);
    }
  }
};

// lane[i] += t[i], i < kVec: fp32 terms into fp64 sums
inline void add_widened(double* lane, fVec t) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256 v = t;  // 8 floats -> 2 x 4 doubles
  _mm256_storeu_pd(lane, _mm256_add_pd(_mm256_loadu_pd(lane), _mm256_cvtps_pd(_mm256_castps256_ps128(v))));
  _mm256_storeu_pd(lane + 4, _mm256_add_pd(_mm256_loadu_pd(lane + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1))));
#else
  __at_align__ float v[kVec];
  t.store(v);
  for (int64_t i = 0; i < kVec; ++i) lane[i] += static_cast<double>(v[i]);
#endif
}

// acc[k][c] = sum over the chunk's elements of channel c of math(in..., param...)[k], for the channels the chunk
// covers (all C in channels_last, its one channel in contiguous; others untouched), summed in Acc lanes (see Chunks).
// acc and params are indexed by channel; math takes and returns float or fVec (each term in fp32).
template <typename Acc, size_t kIn, size_t kParam, size_t kAcc, typename T, typename Math>
void chunk_sums(const Chunks& ch, int64_t chunk, std::array<const T*, kIn> in, std::array<const float*, kParam> params,
                std::array<double*, kAcc> acc, const Math& math) {
  static_assert(std::is_same_v<Acc, float> || std::is_same_v<Acc, double>);
  constexpr bool kNarrow = std::is_same_v<Acc, float>;
  const Runs& g = ch.g;
  if (g.channels_last) {
    // rows [r0, r1) in order into per-channel lanes, C values per accumulator (L1): acc itself when Acc is double,
    // else fp32 lanes added to acc every kNarrowTerms rows
    thread_local std::vector<float> narrow;
    std::array<Acc*, kAcc> sum;
    if constexpr (kNarrow) {
      narrow.assign(kAcc * g.C, 0.0f);
      for (size_t k = 0; k < kAcc; ++k) sum[k] = narrow.data() + k * g.C;
    } else {
      sum = acc;
    }
    const auto flush = [&] {  // acc += narrow lanes; narrow lanes = 0
      for (size_t k = 0; k < kAcc; ++k)
        for (int64_t c = 0; c < g.C; ++c) acc[k][c] += static_cast<double>(sum[k][c]), sum[k][c] = 0.0f;
    };
    for (size_t k = 0; k < kAcc; ++k) std::fill(acc[k], acc[k] + g.C, 0.0);
    const int64_t r0 = chunk * ch.len, r1 = std::min(g.num_runs, r0 + ch.len);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = r * g.C;
      int64_t j = 0;
      for (; j + kVec <= g.C; j += kVec) {
        std::array<fVec, kIn> xs;
        std::array<fVec, kParam> cs;
        for (size_t k = 0; k < kIn; ++k) xs[k] = load_f(in[k] + base + j);
        for (size_t k = 0; k < kParam; ++k) cs[k] = fVec::loadu(params[k] + j);
        const std::array<fVec, kAcc> t = math(xs, cs);
        for (size_t k = 0; k < kAcc; ++k) {
          if constexpr (kNarrow) {
            (fVec::loadu(sum[k] + j) + t[k]).store(sum[k] + j);
          } else {
            add_widened(sum[k] + j, t[k]);
          }
        }
      }
      for (; j < g.C; ++j) {
        std::array<float, kIn> xs;
        std::array<float, kParam> cs;
        for (size_t k = 0; k < kIn; ++k) xs[k] = static_cast<float>(in[k][base + j]);
        for (size_t k = 0; k < kParam; ++k) cs[k] = params[k][j];
        const std::array<float, kAcc> t = math(xs, cs);
        for (size_t k = 0; k < kAcc; ++k) sum[k][j] += static_cast<Acc>(t[k]);
      }
      if constexpr (kNarrow)
        if ((r - r0 + 1) % Chunks::kNarrowTerms == 0 || r + 1 == r1) flush();
    }
  } else {
    // one segment of one (n, c) plane; params are that channel's scalars
    const int64_t plane = chunk / ch.per_plane, seg = chunk % ch.per_plane;
    const int64_t base = plane * g.run_len + seg * ch.len;
    const int64_t n = ch.elems(chunk);
    const int64_t c = g.channel_of_run(plane);
    std::array<fVec, kParam> cv;
    std::array<float, kParam> cs;
    for (size_t k = 0; k < kParam; ++k) cs[k] = params[k][c], cv[k] = fVec(cs[k]);
    __at_align__ double wide[kAcc][kVec] = {};
    std::array<fVec, kAcc> partial;  // kNarrow: fp32 lanes of the current kNarrowTerms vectors
    partial.fill(fVec(0.0f));
    int64_t j = 0, terms = 0;
    for (; j + kVec <= n; j += kVec) {
      std::array<fVec, kIn> xs;
      for (size_t k = 0; k < kIn; ++k) xs[k] = load_f(in[k] + base + j);
      const std::array<fVec, kAcc> t = math(xs, cv);
      if constexpr (kNarrow) {
        for (size_t k = 0; k < kAcc; ++k) partial[k] = partial[k] + t[k];
        if (++terms == Chunks::kNarrowTerms) {
          for (size_t k = 0; k < kAcc; ++k) add_widened(wide[k], partial[k]), partial[k] = fVec(0.0f);
          terms = 0;
        }
      } else {
        for (size_t k = 0; k < kAcc; ++k) add_widened(wide[k], t[k]);
      }
    }
    for (size_t k = 0; k < kAcc; ++k) {
      if constexpr (kNarrow) add_widened(wide[k], partial[k]);
      double total = 0.0;
      for (int64_t i = 0; i < kVec; ++i) total += wide[k][i];
      acc[k][c] = total;
    }
    for (; j < n; ++j) {
      std::array<float, kIn> xs;
      for (size_t k = 0; k < kIn; ++k) xs[k] = static_cast<float>(in[k][base + j]);
      const std::array<float, kAcc> t = math(xs, cs);
      for (size_t k = 0; k < kAcc; ++k) acc[k][c] += static_cast<double>(t[k]);
    }
  }
}

}  // namespace resnet_fused::cpu
