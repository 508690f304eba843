// add_relu on the CPU: out = relu(input + residual), one vectorized pass.
#include <torch/library.h>

#include "checks.h"
#include "cpu/channel_map.h"

namespace resnet_fused::cpu {

at::Tensor add_relu_forward(const at::Tensor& input, const at::Tensor& residual) {
  check_add_relu(input, residual);
  const auto fmt = layout_of(input);
  const at::Tensor x = dense(input, fmt), r = dense(residual, fmt);
  at::Tensor out = empty_as(x, fmt);
  if (x.numel() == 0) return out;
  RF_DISPATCH_FLOATING_TYPES(x.scalar_type(), "add_relu_cpu", [&] {
    channel_map(Runs(x, fmt), std::array<const scalar_t*, 2>{x.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>()},
                std::array<const float*, 0>{}, std::array<scalar_t*, 1>{out.mutable_data_ptr<scalar_t>()},
                [](auto v, auto) { return std::array{relu(v[0] + v[1])}; });
  });
  return out;
}

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) { m.impl("add_relu_forward", &add_relu_forward); }

}  // namespace resnet_fused::cpu
