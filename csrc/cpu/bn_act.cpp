// Batch-norm + (residual add) + activation on the CPU: statistics, the fused apply pass, the activation's
// backward, and the normalization's two backward passes (one reduction, one elementwise). Math in fp32; sums in
// fp32 or fp64 lanes (channel_map.h), combined in fp64.
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cpu/activation_vec.h"
#include "cpu/channel_map.h"
#include "cpu/kernels.h"

namespace resnet_fused::cpu {
namespace {

// Per-thread fp64 scratch of C values per accumulator.
template <size_t k>
struct Scratch {
  std::array<std::vector<double>, k> v;
  explicit Scratch(int64_t C) { for (auto& a : v) a.assign(C, 0.0); }
  std::array<double*, k> ptrs() {
    std::array<double*, k> p;
    for (size_t i = 0; i < k; ++i) p[i] = v[i].data();
    return p;
  }
};

// n uninitialized fp64 values for the chunks' partials, from the tensor allocator: inside the CPU arena
// (cpu_arena.cpp) they reuse the previous call's block. (channels_last keeps chunks x C of them, megabytes at ResNet
// sizes: as a std::vector they went back to the system at each free and page-faulted in again at each call.)
at::Tensor partials(const at::Tensor& like, int64_t n) { return at::empty({n}, like.options().dtype(at::kDouble)); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> bn_stats(const at::Tensor& input) {
  check_bn_stats(input);
  const auto fmt = layout_of(input);
  const at::Tensor x = dense(input, fmt);
  const int64_t C = x.size(1);
  if (x.numel() == 0) return {at::zeros({C}, x.options().dtype(at::kFloat)), at::zeros({C}, x.options().dtype(at::kFloat))};
  at::Tensor mean = at::empty({C}, x.options().dtype(at::kFloat));  // every channel written by the merge below
  at::Tensor var = at::empty({C}, x.options().dtype(at::kFloat));
  const Runs g(x, fmt);
  const Chunks ch(g);
  // chunk partials, every slot written below: mean and M2 = sum (x - chunk mean)^2 per chunk and covered channel
  // (in two blocks: one block for both, halves or interleaved, ran 5-15 % slower on contiguous inputs here)
  const at::Tensor mean_parts = partials(x, ch.count * ch.width), m2_parts = partials(x, ch.count * ch.width);
  double* part_mean = mean_parts.mutable_data_ptr<double>();
  double* part_m2 = m2_parts.mutable_data_ptr<double>();
  RF_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_stats_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, ch.count, 1, [&](int64_t begin, int64_t end) {
      Scratch<2> s(C);
      double* sum = s.v[0].data();
      double* sq = s.v[1].data();
      std::vector<float> shift(C);       // m per channel: this thread's latest chunk mean, in fp32
      std::vector<char> shifted(C, 0);   // whether this thread has an m for the channel yet
      const std::array<const float*, 1> m{shift.data()};
      for (int64_t k = begin; k < end; ++k) {
        const int64_t c0 = ch.first_channel(k), c1 = c0 + ch.width;
        const double n_k = static_cast<double>(ch.elems(k));
        const auto slot = [&](int64_t c) { return k * ch.width + c - c0; };
        // contiguous (a chunk is a segment of one plane, channel c0, its sums in registers): one pass about an m from an
        // earlier chunk of the channel, d = x - m:  mean_k = m + sum d / n_k,  M2_k = sum d^2 - (sum d)^2 / n_k,
        // the d terms in fp32 lanes. The subtraction loses -log2(1 - q) bits, q = (sum d)^2 / (n_k sum d^2) (how far m is
        // from mean_k against the chunk's spread): past half a bit, the chunk is taken again in two passes
        bool one_pass = !g.channels_last && shifted[c0];
        if (one_pass) {
          chunk_sums<float, 1, 1, 2>(ch, k, std::array{xp}, m, std::array{sum, sq}, [](auto v, auto p) {
            const auto d = v[0] - p[0];
            return std::array{d, d * d};
          });
          one_pass = 2.0 * sum[c0] * sum[c0] <= n_k * sq[c0];
          if (one_pass) {
            const double mean_k = static_cast<double>(shift[c0]) + sum[c0] / n_k;
            part_mean[slot(c0)] = mean_k;
            part_m2[slot(c0)] = std::max(0.0, sq[c0] - sum[c0] * sum[c0] / n_k);
            shift[c0] = static_cast<float>(mean_k);
          }
        }
        if (!one_pass) {
          // two passes over the chunk (cached): the mean in fp64 lanes, then the sum of squares about m = that mean in
          // fp32 lanes (non-negative terms); shifted data, so  M2 = sum (x - m)^2 - n_k (mean_k - m)^2  whatever m's rounding
          chunk_sums<double, 1, 0, 1>(ch, k, std::array{xp}, {}, std::array{sum}, [](auto v, auto) { return std::array{v[0]}; });
          for (int64_t c = c0; c < c1; ++c) sum[c] /= n_k, shift[c] = static_cast<float>(sum[c]), shifted[c] = 1;
          chunk_sums<float, 1, 1, 1>(ch, k, std::array{xp}, m, std::array{sq}, [](auto v, auto p) {
            const auto d = v[0] - p[0];
            return std::array{d * d};
          });
          for (int64_t c = c0; c < c1; ++c) {
            const double d = sum[c] - static_cast<double>(shift[c]);
            part_mean[slot(c)] = sum[c];
            part_m2[slot(c)] = std::max(0.0, sq[c] - n_k * d * d);
          }
        }
      }
    });
  });
  // Merge the chunks' (n_k, mean_k, M2_k) per channel in two sweeps, in fp64 and a fixed order:
  //   mean = sum n_k mean_k / n,  M2 = sum M2_k + n_k (mean_k - mean)^2
  // (as stable as Chan's pairwise update, without its chain of divisions)
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

at::Tensor bn_act_apply(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& shift,
                        const std::optional<at::Tensor>& residual, std::string_view act, double alpha) {
  check_bn_act_apply(input, scale, shift, residual);
  const Act a = parse_act(act, "bn_act_apply");
  const auto fmt = layout_of(input);
  const at::Tensor x = dense(input, fmt), r = dense(residual, fmt);
  const at::Tensor sc = scale.contiguous(), sh = shift.contiguous();
  at::Tensor out = empty_as(x, fmt);
  if (x.numel() == 0) return out;
  const Runs g(x, fmt);
  const std::array<const float*, 2> params{sc.const_data_ptr<float>(), sh.const_data_ptr<float>()};
  const float al = static_cast<float>(alpha);
  RF_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_act_apply_cpu", [&] {
    const std::array<scalar_t*, 1> o{out.mutable_data_ptr<scalar_t>()};
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    dispatch_act(a, [&](auto tag) {
      [[maybe_unused]] constexpr Act A = decltype(tag)::value;  // used as a template argument only (GCC warns)
      // out = act(x * scale + shift (+ residual))
      if (r.defined()) {
        channel_map(g, std::array<const scalar_t*, 2>{xp, r.const_data_ptr<scalar_t>()}, params, o,
                    [al](auto v, auto p) { return std::array{act_fwd<A>(v[0] * p[0] + p[1] + v[1], al)}; });
      } else {
        channel_map(g, std::array<const scalar_t*, 1>{xp}, params, o,
                    [al](auto v, auto p) { return std::array{act_fwd<A>(v[0] * p[0] + p[1], al)}; });
      }
    });
  });
  return out;
}

at::Tensor act_backward(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& scale,
                        const at::Tensor& shift, const std::optional<at::Tensor>& residual, std::string_view act,
                        double alpha) {
  check_act_backward(grad_out, input, scale, shift, residual);
  const Act a = parse_act(act, "act_backward");
  const auto fmt = layout_of(input);
  const at::Tensor x = dense(input, fmt), r = dense(residual, fmt), dout = dense(grad_out, fmt);
  const at::Tensor sc = scale.contiguous(), sh = shift.contiguous();
  at::Tensor dz = empty_as(x, fmt);
  if (x.numel() == 0) return dz;
  const Runs g(x, fmt);
  const std::array<const float*, 2> params{sc.const_data_ptr<float>(), sh.const_data_ptr<float>()};
  const float al = static_cast<float>(alpha);
  RF_DISPATCH_FLOATING_TYPES(x.scalar_type(), "act_backward_cpu", [&] {
    const std::array<scalar_t*, 1> o{dz.mutable_data_ptr<scalar_t>()};
    const scalar_t* gp = dout.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    dispatch_act(a, [&](auto tag) {
      [[maybe_unused]] constexpr Act A = decltype(tag)::value;  // used as a template argument only (GCC warns)
      // dz = grad * act'(z), z = x * scale + shift (+ residual) recomputed in fp32
      if (r.defined()) {
        channel_map(g, std::array<const scalar_t*, 3>{gp, xp, r.const_data_ptr<scalar_t>()}, params, o,
                    [al](auto v, auto p) { return std::array{act_grad<A>(v[0], v[1] * p[0] + p[1] + v[2], al)}; });
      } else {
        channel_map(g, std::array<const scalar_t*, 2>{gp, xp}, params, o,
                    [al](auto v, auto p) { return std::array{act_grad<A>(v[0], v[1] * p[0] + p[1], al)}; });
      }
    });
  });
  return dz;
}

std::tuple<at::Tensor, at::Tensor> bn_act_backward_reduce(const at::Tensor& grad_out, const at::Tensor& input,
                                                          const at::Tensor& mean,
                                                          const std::optional<at::Tensor>& output) {
  check_bn_act_backward_reduce(grad_out, input, mean, output);
  const auto fmt = layout_of(input);
  const at::Tensor x = dense(input, fmt), dout = dense(grad_out, fmt), y = dense(output, fmt);
  const at::Tensor mu = mean.contiguous();
  const int64_t C = x.size(1);
  if (x.numel() == 0) return {at::zeros({C}, mean.options()), at::zeros({C}, mean.options())};
  at::Tensor sum_dy = at::empty({C}, mean.options());  // every channel written by the merge below
  at::Tensor sum_dy_xmu = at::empty({C}, mean.options());
  const Runs g(x, fmt);
  const Chunks ch(g);
  const at::Tensor parts = partials(x, 2 * ch.count * ch.width);
  double* part = parts.mutable_data_ptr<double>();  // (sum dy, sum dy (x - mean)) per chunk and channel
  const std::array<const float*, 1> params{mu.const_data_ptr<float>()};
  RF_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_act_backward_reduce_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = dout.const_data_ptr<scalar_t>();
    at::parallel_for(0, ch.count, 1, [&](int64_t begin, int64_t end) {
      Scratch<2> s(C);
      for (int64_t k = begin; k < end; ++k) {
        // terms (dy, dy * (x - mean)); dy = (out <= 0 ? 0 : grad) with a ReLU, else grad
        if (y.defined()) {
          chunk_sums<double, 3, 1, 2>(ch, k, std::array{gp, xp, y.const_data_ptr<scalar_t>()}, params, s.ptrs(),
                                      [](auto v, auto p) {
                                        const auto dy = relu_mask(v[0], v[2]);
                                        return std::array{dy, dy * (v[1] - p[0])};
                                      });
        } else {
          chunk_sums<double, 2, 1, 2>(ch, k, std::array{gp, xp}, params, s.ptrs(),
                                      [](auto v, auto p) { return std::array{v[0], v[0] * (v[1] - p[0])}; });
        }
        const int64_t c0 = ch.first_channel(k);
        for (int64_t c = c0; c < c0 + ch.width; ++c) {
          part[2 * (k * ch.width + c - c0)] = s.v[0][c];
          part[2 * (k * ch.width + c - c0) + 1] = s.v[1][c];
        }
      }
    });
  });
  float* s1 = sum_dy.mutable_data_ptr<float>();
  float* s2 = sum_dy_xmu.mutable_data_ptr<float>();
  at::parallel_for(0, C, 64, [&](int64_t begin, int64_t end) {
    std::vector<double> a(end - begin, 0.0), b(end - begin, 0.0);
    ch.for_each_chunk_of(begin, end, [&](int64_t, int64_t c, int64_t slot) {
      a[c - begin] += part[2 * slot], b[c - begin] += part[2 * slot + 1];
    });
    for (int64_t c = begin; c < end; ++c) {
      s1[c] = static_cast<float>(a[c - begin]);
      s2[c] = static_cast<float>(b[c - begin]);
    }
  });
  return {sum_dy, sum_dy_xmu};
}

std::tuple<at::Tensor, at::Tensor> bn_act_backward_elemt(const at::Tensor& grad_out,
                                                         const std::optional<at::Tensor>& output,
                                                         const std::optional<at::Tensor>& input,
                                                         const std::optional<at::Tensor>& mean,
                                                         const at::Tensor& dy_scale,
                                                         const std::optional<at::Tensor>& x_scale,
                                                         const std::optional<at::Tensor>& shift,
                                                         bool need_grad_residual) {
  check_bn_act_backward_elemt(grad_out, output, input, mean, dy_scale, x_scale, shift);
  const auto fmt = layout_of(input.has_value() ? *input : grad_out);
  const at::Tensor dout = dense(grad_out, fmt), y = dense(output, fmt), x = dense(input, fmt);
  const at::Tensor a = dy_scale.contiguous();
  const at::Tensor mu = x.defined() ? mean->contiguous() : at::Tensor();
  const at::Tensor b = x.defined() ? x_scale->contiguous() : at::Tensor();
  const at::Tensor c = x.defined() ? shift->contiguous() : at::Tensor();
  at::Tensor grad_input = empty_as(dout, fmt);
  at::Tensor grad_residual = need_grad_residual ? empty_as(dout, fmt) : at::empty({0}, grad_out.options());
  if (dout.numel() == 0) return {grad_input, grad_residual};
  const Runs g(dout, fmt);
  RF_DISPATCH_FLOATING_TYPES(dout.scalar_type(), "bn_act_backward_elemt_cpu", [&] {
    using T = scalar_t;
    const T* gp = dout.const_data_ptr<T>();
    T* gi = grad_input.mutable_data_ptr<T>();
    T* gr = need_grad_residual ? grad_residual.mutable_data_ptr<T>() : nullptr;
    // The four variants: with / without ReLU mask (output), training (input, mean, x_scale, shift) or eval.
    // dy = (out <= 0 ? 0 : grad) or grad; grad_input = dy * a (+ (x - mean) * b + c); grad_residual = dy.
    auto run = [&](auto inputs, auto params, auto math) {
      if (gr != nullptr) {
        channel_map(g, inputs, params, std::array<T*, 2>{gi, gr}, math);
      } else {
        channel_map(g, inputs, params, std::array<T*, 1>{gi},
                    [&](auto v, auto p) { return std::array{math(v, p)[0]}; });
      }
    };
    if (x.defined()) {
      const std::array<const float*, 4> p{a.const_data_ptr<float>(), mu.const_data_ptr<float>(), b.const_data_ptr<float>(),
                                          c.const_data_ptr<float>()};
      // (x - mean) first: x * b + (c - mean * b) would cancel badly when |mean| >> std
      if (y.defined()) {
        run(std::array<const T*, 3>{gp, x.const_data_ptr<T>(), y.const_data_ptr<T>()}, p, [](auto v, auto c) {
          const auto dy = relu_mask(v[0], v[2]);
          return std::array{dy * c[0] + (v[1] - c[1]) * c[2] + c[3], dy};
        });
      } else {
        run(std::array<const T*, 2>{gp, x.const_data_ptr<T>()}, p,
            [](auto v, auto c) { return std::array{v[0] * c[0] + (v[1] - c[1]) * c[2] + c[3], v[0]}; });
      }
    } else {
      const std::array<const float*, 1> p{a.const_data_ptr<float>()};
      if (y.defined()) {
        run(std::array<const T*, 2>{gp, y.const_data_ptr<T>()}, p, [](auto v, auto c) {
          const auto dy = relu_mask(v[0], v[1]);
          return std::array{dy * c[0], dy};
        });
      } else {
        run(std::array<const T*, 1>{gp}, p, [](auto v, auto c) { return std::array{v[0] * c[0], v[0]}; });
      }
    }
  });
  return {grad_input, grad_residual};
}

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("bn_stats", &bn_stats);
  m.impl("bn_act_apply", &bn_act_apply);
  m.impl("act_backward", &act_backward);
  m.impl("bn_act_backward_reduce", &bn_act_backward_reduce);
  m.impl("bn_act_backward_elemt", &bn_act_backward_elemt);
}

}  // namespace resnet_fused::cpu
