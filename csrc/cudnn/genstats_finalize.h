// genstats_finalize.cu: cuDNN genstats' per-channel sums -> batch statistics.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace resnet_fused::cudnn_graphs {

// (mean, biased var), fp32 (C,) each, from fp32 (C,) sums of y and y^2 over `count` values per channel
std::tuple<at::Tensor, at::Tensor> genstats_finalize(const at::Tensor& sum, const at::Tensor& sum_sq, int64_t count);

}  // namespace resnet_fused::cudnn_graphs
