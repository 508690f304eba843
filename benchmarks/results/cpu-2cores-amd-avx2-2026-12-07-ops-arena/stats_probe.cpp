// Probe of bn_stats's NHWC path (a copy of csrc/cpu/bn_act.cpp's, fp32 only, no checks) and three variants: fp32 lanes for
// the mean pass (stats_narrow), register-blocked channel groups (stats_blocked, rows per chunk as an argument),
// no merge of the partials (stats_nomerge). Built and timed by stats_probe.py; not part of the library.
#include <torch/extension.h>
#include "checks.h"
#include "cpu/channel_map.h"
using namespace resnet_fused::cpu;

template <size_t k>
struct Scratch {
  std::array<std::vector<double>, k> v;
  explicit Scratch(int64_t C) { for (auto& a : v) a.assign(C, 0.0); }
};

template <typename MeanAcc>
std::tuple<at::Tensor, at::Tensor> stats(const at::Tensor& input) {
  const auto fmt = resnet_fused::layout_of(input);
  const at::Tensor x = resnet_fused::dense(input, fmt);
  const int64_t C = x.size(1);
  at::Tensor mean = at::empty({C}, x.options().dtype(at::kFloat));
  at::Tensor var = at::empty({C}, x.options().dtype(at::kFloat));
  const Runs g(x, fmt);
  const Chunks ch(g);
  std::vector<double> part_mean(ch.count * ch.width), part_m2(ch.count * ch.width);
  using scalar_t = float;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  at::parallel_for(0, ch.count, 1, [&](int64_t begin, int64_t end) {
    Scratch<2> s(C);
    std::vector<float> shift(C);
    double* sum = s.v[0].data();
    for (int64_t k = begin; k < end; ++k) {
      const int64_t c0 = ch.first_channel(k);
      const double n_k = static_cast<double>(ch.elems(k));
      chunk_sums<MeanAcc, 1, 0, 1>(ch, k, std::array{xp}, {}, std::array{sum}, [](auto v, auto) { return std::array{v[0]}; });
      for (int64_t c = c0; c < c0 + ch.width; ++c) sum[c] /= n_k, shift[c] = static_cast<float>(sum[c]);
      chunk_sums<float, 1, 1, 1>(ch, k, std::array{xp}, std::array<const float*, 1>{shift.data()},
                                 std::array{s.v[1].data()}, [](auto v, auto p) {
                                   const auto d = v[0] - p[0];
                                   return std::array{d * d};
                                 });
      for (int64_t c = c0; c < c0 + ch.width; ++c) {
        const double d = sum[c] - static_cast<double>(shift[c]);
        part_mean[k * ch.width + c - c0] = sum[c];
        part_m2[k * ch.width + c - c0] = std::max(0.0, s.v[1][c] - n_k * d * d);
      }
    }
  });
  float* mp = mean.mutable_data_ptr<float>();
  float* vp = var.mutable_data_ptr<float>();
  const double n = static_cast<double>(x.numel() / C);
  at::parallel_for(0, C, 64, [&](int64_t begin, int64_t end) {
    std::vector<double> mu(end - begin, 0.0), m2(end - begin, 0.0);
    ch.for_each_chunk_of(begin, end, [&](int64_t k, int64_t c, int64_t slot) {
      mu[c - begin] += static_cast<double>(ch.elems(k)) * part_mean[slot];
    });
    for (double& m : mu) m /= n;
    ch.for_each_chunk_of(begin, end, [&](int64_t k, int64_t c, int64_t slot) {
      const double d = part_mean[slot] - mu[c - begin];
      m2[c - begin] += part_m2[slot] + static_cast<double>(ch.elems(k)) * d * d;
    });
    for (int64_t c = begin; c < end; ++c) {
      mp[c] = static_cast<float>(mu[c - begin]);
      vp[c] = static_cast<float>(m2[c - begin] / n);
    }
  });
  return {mean, var};
}


// channels_last chunk, register-blocked: kB vectors of channels at a time over the chunk's rows, fp32 lanes in
// registers widened into acc every kNarrowTerms rows. square: sum (x - p)^2, else sum x.
template <bool square>
void nhwc_chunk_sums(const Chunks& ch, int64_t chunk, const float* xp, const float* p, double* acc) {
  constexpr int kB = 8;
  const Runs& g = ch.g;
  const int64_t C = g.C;
  const int64_t r0 = chunk * ch.len, r1 = std::min(g.num_runs, r0 + ch.len);
  std::fill(acc, acc + C, 0.0);
  int64_t c = 0;
  for (; c + kB * kVec <= C; c += kB * kVec) {
    fVec pv[kB];
    for (int b = 0; b < kB; ++b) pv[b] = square ? fVec::loadu(p + c + b * kVec) : fVec(0.0f);
    for (int64_t rb = r0; rb < r1; rb += Chunks::kNarrowTerms) {
      const int64_t re = std::min(r1, rb + Chunks::kNarrowTerms);
      fVec s[kB];
      for (int b = 0; b < kB; ++b) s[b] = fVec(0.0f);
      for (int64_t r = rb; r < re; ++r) {
        const float* row = xp + r * C + c;
        for (int b = 0; b < kB; ++b) {
          const fVec v = fVec::loadu(row + b * kVec);
          if constexpr (square) { const fVec d = v - pv[b]; s[b] = at::vec::fmadd(d, d, s[b]); }
          else s[b] = s[b] + v;
        }
      }
      for (int b = 0; b < kB; ++b) add_widened(acc + c + b * kVec, s[b]);
    }
  }
  for (; c < C; ++c)  // channels past the last full block: scalar
    for (int64_t r = r0; r < r1; ++r) {
      const float v = xp[r * C + c];
      const float d = square ? v - p[c] : v;
      acc[c] += static_cast<double>(square ? d * d : d);
    }
}

template <typename MeanAcc, bool merge>
std::tuple<at::Tensor, at::Tensor> stats_blocked(const at::Tensor& input, int64_t rows) {
  const auto fmt = resnet_fused::layout_of(input);
  const at::Tensor x = resnet_fused::dense(input, fmt);
  const int64_t C = x.size(1);
  at::Tensor mean = at::empty({C}, x.options().dtype(at::kFloat));
  at::Tensor var = at::empty({C}, x.options().dtype(at::kFloat));
  const Runs g(x, fmt);
  Chunks ch(g);
  if (rows > 0) { ch.len = rows; ch.count = (g.num_runs + rows - 1) / rows; }
  std::vector<double> part_mean(ch.count * ch.width), part_m2(ch.count * ch.width);
  const float* xp = x.const_data_ptr<float>();
  at::parallel_for(0, ch.count, 1, [&](int64_t begin, int64_t end) {
    Scratch<2> s(C);
    std::vector<float> shift(C);
    double* sum = s.v[0].data();
    for (int64_t k = begin; k < end; ++k) {
      const int64_t c0 = ch.first_channel(k);
      const double n_k = static_cast<double>(ch.elems(k));
      nhwc_chunk_sums<false>(ch, k, xp, nullptr, sum);
      for (int64_t c = c0; c < c0 + ch.width; ++c) sum[c] /= n_k, shift[c] = static_cast<float>(sum[c]);
      nhwc_chunk_sums<true>(ch, k, xp, shift.data(), s.v[1].data());
      for (int64_t c = c0; c < c0 + ch.width; ++c) {
        const double d = sum[c] - static_cast<double>(shift[c]);
        part_mean[k * ch.width + c - c0] = sum[c];
        part_m2[k * ch.width + c - c0] = std::max(0.0, s.v[1][c] - n_k * d * d);
      }
    }
  });
  if (!merge) return {mean, var};
  float* mp = mean.mutable_data_ptr<float>();
  float* vp = var.mutable_data_ptr<float>();
  const double n = static_cast<double>(x.numel() / C);
  at::parallel_for(0, C, 64, [&](int64_t begin, int64_t end) {
    std::vector<double> mu(end - begin, 0.0), m2(end - begin, 0.0);
    ch.for_each_chunk_of(begin, end, [&](int64_t k, int64_t c, int64_t slot) {
      mu[c - begin] += static_cast<double>(ch.elems(k)) * part_mean[slot];
    });
    for (double& m : mu) m /= n;
    ch.for_each_chunk_of(begin, end, [&](int64_t k, int64_t c, int64_t slot) {
      const double d = part_mean[slot] - mu[c - begin];
      m2[c - begin] += part_m2[slot] + static_cast<double>(ch.elems(k)) * d * d;
    });
    for (int64_t c = begin; c < end; ++c) {
      mp[c] = static_cast<float>(mu[c - begin]);
      vp[c] = static_cast<float>(m2[c - begin] / n);
    }
  });
  return {mean, var};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("stats_wide", &stats<double>);
  m.def("stats_narrow", &stats<float>);
  m.def("stats_blocked", &stats_blocked<float, true>);
  m.def("stats_nomerge", &stats_blocked<float, false>);
}
