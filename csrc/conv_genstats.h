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

#include "cudnn_graphs.h"

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

// The input-BN form's backward through cuDNN graphs (cudnn/graphs.cpp), each where the graphs are built
// and on, the call is CUDA fp16 / bf16 channels_last with channels multiples of 8, and cuDNN has an engine for the
// signature (cached per signature, reported in cudnn_graph_report); nullopt otherwise, and the caller computes that
// part through aten's convolution backward on a recomputed a. With z = input * scale + shift and a = relu(z):
//   dgrad + dReLU + dBN weight (cuDNN's DgradDreluBNBwdWeight pattern), one graph: dz = conv_dgrad(grad_y, weight) * (z > 0),
//   written once, with grad_input_bias = sum dz and grad_input_weight = sum dz (input - mean) invstd per channel
//   (fp32); then grad_input = the BN's training backward on dz (the statistics' terms included), one elementwise
//   pass, when need_grad_input. Returns (grad_input or undefined, grad_input_weight, grad_input_bias).
std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor>> conv_genstats_dgrad_graph(
    const at::Tensor& grad_y, const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, const at::Tensor& input_mean, const at::Tensor& input_var,
    const std::optional<at::Tensor>& input_weight, const std::optional<at::Tensor>& input_bias, double input_eps,
    bool need_grad_input);
//   wgrad with the input BN + ReLU on load (cuDNN's ConvBNwgrad pattern): grad_weight = conv_wgrad(grad_y, a), a
//   recomputed from input, scale, shift (input_scale_shift's) as the wgrad loads it, never written
std::optional<at::Tensor> conv_genstats_wgrad_graph(const at::Tensor& grad_y, const at::Tensor& input, const at::Tensor& weight,
                                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                                    const at::Tensor& scale, const at::Tensor& shift);

// Whether conv_bn_act_stage takes its statistics from conv_genstats: training on CUDA with the cuDNN graphs built
// and turned on (cudnn_graphs.h), fp16 / bf16, input and weight channels_last, groups 1, no conv bias,
// channel counts multiples of 8 (the fused engines' 16-byte channel vectors). cuDNN may still decline a signature:
// conv_genstats then runs the composite.
bool conv_genstats_route(const at::Tensor& input, const at::Tensor& weight, bool has_bias, int64_t groups, bool training);

}  // namespace resnet_fused
