// Probe of bn_stats's NHWC path: csrc/cpu/bn_act.cpp's algorithm (fp32 only, no checks; chunk mean, then the sum of
// squares about it, then the chunks merged per channel) with the chunk passes as a policy:
//   Lanes<double>  the library's passes (the mean in fp64 lanes)            -> stats_wide
//   Lanes<float>   the mean in fp32 lanes, widened every kNarrowTerms rows  -> stats_narrow
//   Blocked        channels_last, register-blocked channel groups           -> stats_blocked (rows per chunk given),
//                                                                              stats_nomerge (the merge left out)
// Built and timed by stats_probe.py; not part of the library.
#include <torch/extension.h>

#include "checks.h"
#include "cpu/channel_map.h"

using namespace resnet_fused::cpu;

// acc[c] = sum over the chunk of x (square: (x - p[c])^2) in channel_map.h's chunk_sums, MeanAcc lanes for the mean
template <typename MeanAcc>
struct Lanes {
  template <bool square>
  static void sums(const Chunks& ch, int64_t k, const float* xp, const float* p, double* acc) {
    if constexpr (square) {
      chunk_sums<float, 1, 1, 1>(ch, k, std::array{xp}, std::array<const float*, 1>{p}, std::array{acc},
                                 [](auto v, auto q) { const auto d = v[0] - q[0]; return std::array{d * d}; });
    } else {
      chunk_sums<MeanAcc, 1, 0, 1>(ch, k, std::array{xp}, {}, std::array{acc}, [](auto v, auto) { return std::array{v[0]}; });
    }
  }
};

// channels_last only: kB vectors of channels at a time over the chunk's rows, fp32 lanes in registers widened into
// acc every kNarrowTerms rows; channels past the last full block scalar
struct Blocked {
  template <bool square>
  static void sums(const Chunks& ch, int64_t chunk, const float* xp, const float* p, double* acc) {
    constexpr int kB = 8;
    const int64_t C = ch.g.C;
    const int64_t r0 = chunk * ch.len, r1 = std::min(ch.g.num_runs, r0 + ch.len);
    std::fill(acc, acc + C, 0.0);
    int64_t c = 0;
    for (; c + kB * kVec <= C; c += kB * kVec) {
      fVec pv[kB];
      for (int b = 0; b < kB; ++b) pv[b] = square ? fVec::loadu(p + c + b * kVec) : fVec(0.0f);
      for (int64_t rb = r0; rb < r1; rb += Chunks::kNarrowTerms) {
        fVec s[kB];
        for (int b = 0; b < kB; ++b) s[b] = fVec(0.0f);
        for (int64_t r = rb; r < std::min(r1, rb + Chunks::kNarrowTerms); ++r) {
          const float* row = xp + r * C + c;
          for (int b = 0; b < kB; ++b) {
            const fVec v = fVec::loadu(row + b * kVec);
            if constexpr (square) {
              const fVec d = v - pv[b];
              s[b] = at::vec::fmadd(d, d, s[b]);
            } else {
              s[b] = s[b] + v;
            }
          }
        }
        for (int b = 0; b < kB; ++b) add_widened(acc + c + b * kVec, s[b]);
      }
    }
    for (; c < C; ++c)
      for (int64_t r = r0; r < r1; ++r) {
        const float d = square ? xp[r * C + c] - p[c] : xp[r * C + c];
        acc[c] += static_cast<double>(square ? d * d : d);
      }
  }
};

// (mean, biased var) per channel; rows > 0 sets the rows per channels_last chunk
template <typename Pass, bool merge = true>
std::tuple<at::Tensor, at::Tensor> stats(const at::Tensor& input, int64_t rows) {
  const auto fmt = resnet_fused::layout_of(input);
  const at::Tensor x = resnet_fused::dense(input, fmt);
  const int64_t C = x.size(1);
  at::Tensor mean = at::empty({C}, x.options().dtype(at::kFloat));
  at::Tensor var = at::empty({C}, x.options().dtype(at::kFloat));
  const Runs g(x, fmt);
  Chunks ch(g);
  if (rows > 0 && g.channels_last) ch.len = rows, ch.count = (g.num_runs + rows - 1) / rows;
  std::vector<double> part_mean(ch.count * ch.width), part_m2(ch.count * ch.width);
  const float* xp = x.const_data_ptr<float>();
  at::parallel_for(0, ch.count, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> sum(C), sq(C);
    std::vector<float> shift(C);
    for (int64_t k = begin; k < end; ++k) {
      const int64_t c0 = ch.first_channel(k);
      const double n_k = static_cast<double>(ch.elems(k));
      Pass::template sums<false>(ch, k, xp, nullptr, sum.data());
      for (int64_t c = c0; c < c0 + ch.width; ++c) sum[c] /= n_k, shift[c] = static_cast<float>(sum[c]);
      Pass::template sums<true>(ch, k, xp, shift.data(), sq.data());
      for (int64_t c = c0; c < c0 + ch.width; ++c) {  // M2 = sum (x - m)^2 - n_k (mean_k - m)^2
        const double d = sum[c] - static_cast<double>(shift[c]);
        part_mean[k * ch.width + c - c0] = sum[c];
        part_m2[k * ch.width + c - c0] = std::max(0.0, sq[c] - n_k * d * d);
      }
    }
  });
  if (!merge) return {mean, var};
  float* mp = mean.mutable_data_ptr<float>();
  float* vp = var.mutable_data_ptr<float>();
  const double n = static_cast<double>(x.numel() / C);
  at::parallel_for(0, C, 64, [&](int64_t begin, int64_t end) {  // mean = sum n_k mean_k / n, M2 = sum M2_k + n_k d^2
    std::vector<double> mu(end - begin, 0.0), m2(end - begin, 0.0);
    ch.for_each_chunk_of(begin, end, [&](int64_t k, int64_t c, int64_t slot) {
      mu[c - begin] += static_cast<double>(ch.elems(k)) * part_mean[slot];
    });
    for (double& m : mu) m /= n;
    ch.for_each_chunk_of(begin, end, [&](int64_t k, int64_t c, int64_t slot) {
      const double d = part_mean[slot] - mu[c - begin];
      m2[c - begin] += part_m2[slot] + static_cast<double>(ch.elems(k)) * d * d;
    });
    for (int64_t c = begin; c < end; ++c) mp[c] = static_cast<float>(mu[c - begin]), vp[c] = static_cast<float>(m2[c - begin] / n);
  });
  return {mean, var};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("stats_wide", [](const at::Tensor& x) { return stats<Lanes<double>>(x, 0); });
  m.def("stats_narrow", [](const at::Tensor& x) { return stats<Lanes<float>>(x, 0); });
  m.def("stats_blocked", &stats<Blocked>);
  m.def("stats_nomerge", &stats<Blocked, false>);
}
