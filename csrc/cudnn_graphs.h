// The cuDNN graph path of the cuda backend (cudnn/graphs.cpp; built into _C only where setup.py finds cudnn-frontend's
// headers): its process-wide switch, whether this build has it, the report of the graphs tried, and the eval
// convolution's graph. The training graphs' entry points are conv_genstats's (conv_genstats.h).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "activation.h"

namespace resnet_fused {

// The switch (off until set: resnet_fused.ops.cudnn.set_graphs) and whether this build has the graphs
void cudnn_graphs_set_enabled(bool enabled);
bool cudnn_graphs_enabled();
bool cudnn_graphs_built();

// The graphs tried in this process, first seen first: (signature, "" when built, else cuDNN's reason). Each entry
// starts with its pattern: "conv + genstats", "bn-relu + conv + genstats", "dgrad + drelu + dbn-weight",
// "bn-relu + wgrad", "conv + bias (+ add) (+ <activation>)".
std::vector<std::pair<std::string, std::string>> cudnn_graph_report();

// act(conv2d(input, weight) + bias (+ residual)) as one cuDNN graph (conv fprop with a pointwise epilogue: cuDNN's
// runtime-fusion engines): the conv's fp32 accumulator takes the bias, the residual and the activation before y is
// rounded and stored once. Where the graphs are built and on, input and weight CUDA fp16 / bf16 channels_last with
// channels multiples of 8, groups 1, act none, relu, relu6, leaky_relu (slope alpha), silu, gelu or gelu_tanh (cuDNN's
// pointwise modes), something to fuse (a bias, a residual or the activation), the residual
// dense channels_last in the input's dtype, and cuDNN builds the graph for the signature (cached, reported); nullopt
// otherwise (conv_act_stage then runs the convolution and one epilogue pass). The caller has checked the arguments.
std::optional<at::Tensor> conv_act_graph(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                         const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, Act act,
                                         double alpha);

}  // namespace resnet_fused
