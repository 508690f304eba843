// resnet_fused::conv_genstats: y = conv2d(input, weight) with its per-channel batch statistics, the producer side of
// a training BN (conv_bn_act_stage hands them to bn_act_batch, which then takes no statistics pass of its own).
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace resnet_fused {

// the op's C++ signature (csrc/ops.cpp), for its typed dispatcher handle
using ConvGenstatsOp = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                                                                      at::IntArrayRef, at::IntArrayRef);

// (y, mean, biased var) as separate passes: aten's convolution, then the bn_stats kernel of y's device (float64:
// aten's var_mean). The CPU kernel, and the CUDA one wherever no cuDNN graph computes the call.
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_genstats_composite(const at::Tensor& input, const at::Tensor& weight,
                                                                       at::IntArrayRef stride, at::IntArrayRef padding,
                                                                       at::IntArrayRef dilation);

// conv_genstats_composite without its argument checks, for a kernel that has made them (the cuDNN graph's fallback)
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_genstats_passes(const at::Tensor& input, const at::Tensor& weight,
                                                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                                                    at::IntArrayRef dilation);

// Whether conv_bn_act_stage takes its statistics from conv_genstats: training on CUDA with the cuDNN graphs built
// and turned on (cudnn_graphs_set_enabled), fp16 / bf16, input and weight channels_last, groups 1, no conv bias,
// channel counts multiples of 8 (the fused engines' 16-byte channel vectors). cuDNN may still decline a signature:
// conv_genstats then runs the composite.
bool conv_genstats_route(const at::Tensor& input, const at::Tensor& weight, bool has_bias, int64_t groups, bool training);

// The cuDNN graph path's switch (off until set; resnet_fused.ops.cudnn.set_graphs) and whether it was built
// (the extension found cudnn-frontend's headers).
void cudnn_graphs_set_enabled(bool enabled);
bool cudnn_graphs_enabled();
bool cudnn_graphs_built();

// The graphs conv_genstats tried, in the order first seen: (signature, "" when built, else cuDNN's reason).
std::vector<std::pair<std::string, std::string>> cudnn_graph_report();

}  // namespace resnet_fused
