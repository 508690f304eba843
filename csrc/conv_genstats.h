// resnet_fused::conv_genstats: y = conv2d(a, weight) with its per-channel batch statistics, the producer side of a
// training BN (conv_bn_act_stage hands them to bn_act_batch, which then takes no statistics pass of its own);
// a = input, or relu(batch_norm(input)) with the input's batch statistics (the previous BN + ReLU, deferred: on CUDA
// applied by the cuDNN graph as the conv loads its input, so a is never written).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace resnet_fused {

// the op's C++ signature (csrc/ops.cpp), for its typed dispatcher handle
using ConvGenstatsOp = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double);

// The input BN + ReLU of a call that has one (input_mean given): a = relu(input * scale + shift), per channel
//   scale = input_weight / sqrt(input_var + eps), shift = input_bias - input_mean * scale      (fp32; fp64 for fp64 input)
std::tuple<at::Tensor, at::Tensor> input_scale_shift(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
                                                    const std::optional<at::Tensor>& weight,
                                                    const std::optional<at::Tensor>& bias, double eps);
// a written out (the composite's conv input, and the backward's recomputation of it)
at::Tensor input_bn_relu(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& shift);

// (y, mean, biased var) as separate passes: (the input BN + ReLU written,) aten's convolution, then the bn_stats kernel
// of y's device (float64: aten's). The CPU kernel, and the CUDA one wherever no cuDNN graph computes the call.
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_genstats_composite(
    const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, const std::optional<at::Tensor>& input_mean, const std::optional<at::Tensor>& input_var,
    const std::optional<at::Tensor>& input_weight, const std::optional<at::Tensor>& input_bias, double input_eps);

// the convolution and its statistics on the convolution's own input `a` (an input BN + ReLU already applied), without
// the argument checks, for a kernel that has made them (the cuDNN graph's fallback)
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_genstats_passes(const at::Tensor& a, const at::Tensor& weight,
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
