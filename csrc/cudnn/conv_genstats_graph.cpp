// resnet_fused::conv_genstats on CUDA through one cuDNN graph (cudnn-frontend's header-only C++ graph API): conv fprop
// with genstats in its epilogue, y written once and its per-channel (sum y, sum y^2) taken as it is stored, then
// genstats_finalize (one tiny kernel) for (mean, var). Eager's BN reads y once more for its statistics; this does not.
// With an input BN (input_mean given) the graph's prologue applies relu(input * scale + shift) as the conv loads its
// input (cuDNN's ConvBNfprop pattern: scale, bias, ReLU, conv, genstats), so that activation is never written.
//
// One graph per signature (device, dtype, input and weight shapes and strides, stride, padding, dilation, input BN or
// not), built on its first call and cached with its workspace size. The prologue's (1, C, 1, 1) scale and shift are
// tried in fp32 first (no rounding of the BN's coefficients), then in the io dtype (the form the H200 probe built,
// benchmarks/results/h200-2026-12-04-cudnn-graphs); the report says which. A signature cuDNN has no engine for (on
// Hopper: bf16, the 7x7 stem) is cached too, with cuDNN's reason, warned once, and runs the composite's passes from then
// on. cudnn_graph_report() lists both. First calls build (milliseconds to a second per signature): run a signature once
// before capturing a CUDA graph.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <ATen/cudnn/Handle.h>
#include <ATen/native/ConvUtils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/hash.h>
#include <cudnn_frontend.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "../checks.h"
#include "../conv_genstats.h"
#include "genstats_finalize.h"

namespace resnet_fused {
namespace cudnn_graphs {
namespace {

namespace fe = cudnn_frontend;
using Tensor = at::Tensor;

enum Uid : int64_t { kX = 1, kW, kY, kSum, kSumSq, kScale, kShift };

struct Graph {
  std::shared_ptr<fe::graph::Graph> graph;  // null: cuDNN has no engine for this signature
  int64_t workspace = 0;
  at::ScalarType coeff_dtype = at::kFloat;  // the prologue's scale and shift
};

using Key = std::vector<int64_t>;

struct Cache {
  std::mutex mutex;
  std::unordered_map<Key, std::shared_ptr<const Graph>, c10::hash<Key>> graphs;
  std::vector<std::pair<std::string, std::string>> report;  // (signature, "" or the reason), first seen first
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: graphs hold cuDNN state that must not outlive the CUDA context
  return *c;
}

std::vector<int64_t> vec(at::IntArrayRef a) { return {a.begin(), a.end()}; }

Key signature(const Tensor& x, const Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
              bool prologue) {
  Key key{x.get_device(), static_cast<int64_t>(x.scalar_type()), prologue};
  for (const at::IntArrayRef part : {x.sizes(), x.strides(), w.sizes(), w.strides(), stride, padding, dilation}) {
    key.insert(key.end(), part.begin(), part.end());
  }
  return key;
}

std::string describe(const Tensor& x, const Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
                     at::IntArrayRef dilation, bool prologue) {
  return c10::str(prologue ? "bn-relu + conv + genstats, " : "conv + genstats, ", x.scalar_type(), " input ", x.sizes(),
                  " weight ", w.sizes(), " stride ", stride, " padding ", padding, " dilation ", dilation, " on ", x.device());
}

fe::DataType_t fe_dtype(at::ScalarType t) {
  return t == at::kHalf ? fe::DataType_t::HALF : t == at::kBFloat16 ? fe::DataType_t::BFLOAT16 : fe::DataType_t::FLOAT;
}

// "" when built into g, else why not (cuDNN's message); coeff: the dtype of the prologue's scale and shift, or
// nullopt for no prologue
std::string build(Graph& g, const Tensor& x, const Tensor& w, at::IntArrayRef y_shape, at::IntArrayRef stride,
                  at::IntArrayRef padding, at::IntArrayRef dilation, std::optional<at::ScalarType> coeff,
                  cudnnHandle_t handle) {
  const auto io = fe_dtype(x.scalar_type());
  auto graph = std::make_shared<fe::graph::Graph>();
  graph->set_io_data_type(io).set_intermediate_data_type(fe::DataType_t::FLOAT).set_compute_data_type(fe::DataType_t::FLOAT);
  auto X = graph->tensor(fe::graph::Tensor_attributes().set_name("x").set_uid(kX).set_dim(vec(x.sizes())).set_stride(vec(x.strides())));
  auto W = graph->tensor(fe::graph::Tensor_attributes().set_name("w").set_uid(kW).set_dim(vec(w.sizes())).set_stride(vec(w.strides())));
  const int64_t Cin = x.size(1);
  auto image = X;
  if (coeff.has_value()) {  // a = relu(x * scale + shift), computed in fp32 as the conv loads x
    const auto channel_vector = [&](const char* name, int64_t uid) {  // (1, C, 1, 1): C dense values
      return graph->tensor(fe::graph::Tensor_attributes().set_name(name).set_uid(uid).set_data_type(fe_dtype(*coeff))
                               .set_dim({1, Cin, 1, 1}).set_stride({Cin, 1, Cin, Cin}));
    };
    auto S = channel_vector("scale", kScale), B = channel_vector("shift", kShift);
    using fe::graph::Pointwise_attributes;
    auto scaled = graph->pointwise(X, S, Pointwise_attributes().set_name("scale").set_mode(fe::PointwiseMode_t::MUL));
    auto shifted = graph->pointwise(scaled, B, Pointwise_attributes().set_name("shift").set_mode(fe::PointwiseMode_t::ADD));
    image = graph->pointwise(shifted, Pointwise_attributes().set_name("relu").set_mode(fe::PointwiseMode_t::RELU_FWD));
  }
  auto Y = graph->conv_fprop(image, W, fe::graph::Conv_fprop_attributes().set_name("conv").set_padding(vec(padding))
                                           .set_stride(vec(stride)).set_dilation(vec(dilation)));
  // y: (N, K, P, Q) stored channels_last, as conv_genstats_cuda allocates it
  Y->set_output(true).set_uid(kY).set_data_type(io).set_dim(vec(y_shape)).set_stride(c10::get_channels_last_strides_2d(y_shape));
  auto [sum, sum_sq] = graph->genstats(Y, fe::graph::Genstats_attributes().set_name("genstats"));
  const int64_t C = y_shape[1];
  for (const auto& [t, uid] : {std::pair{sum, kSum}, std::pair{sum_sq, kSumSq}}) {  // (1, C, 1, 1): C dense floats
    t->set_output(true).set_uid(uid).set_data_type(fe::DataType_t::FLOAT).set_dim({1, C, 1, 1}).set_stride({C, 1, C, C});
  }
  for (auto step : {+[](fe::graph::Graph& gr, cudnnHandle_t) { return gr.validate(); },
                    +[](fe::graph::Graph& gr, cudnnHandle_t h) { return gr.build_operation_graph(h); },
                    +[](fe::graph::Graph& gr, cudnnHandle_t) {
                      return gr.create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK});
                    },
                    +[](fe::graph::Graph& gr, cudnnHandle_t h) { return gr.check_support(h); },
                    +[](fe::graph::Graph& gr, cudnnHandle_t h) { return gr.build_plans(h); }}) {
    auto status = step(*graph, handle);
    if (status.is_bad()) return status.get_message().empty() ? std::string("cuDNN declined the graph") : status.get_message();
  }
  int64_t workspace = 0;
  auto status = graph->get_workspace_size(workspace);
  if (status.is_bad()) return status.get_message();
  g.graph = std::move(graph);
  g.workspace = workspace;
  g.coeff_dtype = coeff.value_or(at::kFloat);
  return "";
}

// build(), with the frontend's exceptions (e.g. a cuDNN too old for a node) as reasons
std::string try_build(Graph& g, const Tensor& x, const Tensor& w, at::IntArrayRef y_shape, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, std::optional<at::ScalarType> coeff,
                      cudnnHandle_t handle) {
  try {
    return build(g, x, w, y_shape, stride, padding, dilation, coeff, handle);
  } catch (const std::exception& e) {
    return e.what();
  }
}

// the cached graph of this signature (its `graph` null where cuDNN has none), built on first sight
std::shared_ptr<const Graph> graph_for(const Tensor& x, const Tensor& w, at::IntArrayRef y_shape, at::IntArrayRef stride,
                                       at::IntArrayRef padding, at::IntArrayRef dilation, bool prologue, cudnnHandle_t handle) {
  Cache& c = cache();
  const Key key = signature(x, w, stride, padding, dilation, prologue);
  std::lock_guard<std::mutex> lock(c.mutex);
  if (auto it = c.graphs.find(key); it != c.graphs.end()) return it->second;
  auto g = std::make_shared<Graph>();
  std::string reason;
  if (!prologue) {
    reason = try_build(*g, x, w, y_shape, stride, padding, dilation, std::nullopt, handle);
  } else {  // scale and shift in fp32, else in the io dtype
    for (const auto coeff : {at::kFloat, x.scalar_type()}) {
      const std::string why = try_build(*g, x, w, y_shape, stride, padding, dilation, coeff, handle);
      if (why.empty()) {
        reason.clear();
        break;
      }
      reason += c10::str(reason.empty() ? "" : "; ", "scale and shift in ", coeff, ": ", why);
    }
  }
  std::string what = describe(x, w, stride, padding, dilation, prologue);
  if (!reason.empty()) {
    g->graph.reset();
    TORCH_WARN("resnet_fused::conv_genstats: no cuDNN graph for ", what, " (", reason, "); this signature runs ",
               prologue ? "bn_act_apply, " : "", "aten's convolution, then bn_stats");
  } else if (prologue) {
    what += c10::str(", scale and shift in ", g->coeff_dtype);
  }
  c.report.emplace_back(what, reason);
  return c.graphs.emplace(key, std::move(g)).first->second;
}

// The signatures a graph may take: fp16 / bf16 (the fused engines' dtypes), input and weight channels_last (NHWC, KRSC),
// channel counts multiples of 8 (16-byte channel vectors), 16-byte aligned data; cuDNN decides the rest
bool graph_applies(const Tensor& x, const Tensor& w) {
  const auto cl = at::MemoryFormat::ChannelsLast;
  const auto t = x.scalar_type();
  const auto aligned = [](const Tensor& v) { return reinterpret_cast<uintptr_t>(v.const_data_ptr()) % 16 == 0; };
  return (t == at::kHalf || t == at::kBFloat16) && x.is_contiguous(cl) && w.is_contiguous(cl) && x.size(1) % 8 == 0 &&
         w.size(0) % 8 == 0 && x.numel() > 0 && aligned(x) && aligned(w);
}

std::tuple<Tensor, Tensor, Tensor> conv_genstats_cuda(const Tensor& input, const Tensor& weight, at::IntArrayRef stride,
                                                      at::IntArrayRef padding, at::IntArrayRef dilation,
                                                      const std::optional<Tensor>& input_mean,
                                                      const std::optional<Tensor>& input_var,
                                                      const std::optional<Tensor>& input_weight,
                                                      const std::optional<Tensor>& input_bias, double input_eps) {
  check_conv_genstats(input, weight, stride, padding, dilation, input_mean, input_var, input_weight, input_bias);
  const bool prologue = input_mean.has_value();
  Tensor scale, shift;  // (Cin,) fp32: a = relu(input * scale + shift)
  if (prologue) std::tie(scale, shift) = input_scale_shift(input, *input_mean, *input_var, input_weight, input_bias, input_eps);
  // without a graph: the input BN + ReLU written, then the conv and its statistics (aten's conv says what is wrong
  // with a shape)
  const auto passes = [&] {
    return conv_genstats_passes(prologue ? input_bn_relu(input, scale, shift) : input, weight, stride, padding, dilation);
  };
  const auto shape = at::native::conv_output_size(input.sizes(), weight.sizes(), padding, stride, dilation);
  const bool nonempty = std::all_of(shape.begin(), shape.end(), [](int64_t d) { return d > 0; });
  if (!cudnn_graphs_enabled() || !nonempty || !graph_applies(input, weight)) return passes();
  const c10::cuda::CUDAGuard guard(input.device());
  cudnnHandle_t handle = at::native::getCudnnHandle();
  const auto g = graph_for(input, weight, shape, stride, padding, dilation, prologue, handle);
  if (!g->graph) return passes();
  AT_CUDNN_CHECK(cudnnSetStream(handle, at::cuda::getCurrentCUDAStream()));
  Tensor y = at::empty(shape, input.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t C = y.size(1);
  Tensor sum = at::empty({C}, input.options().dtype(at::kFloat)), sum_sq = at::empty_like(sum);
  Tensor workspace = at::empty({g->workspace}, input.options().dtype(at::kByte));
  std::unordered_map<int64_t, void*> pointers{{kX, const_cast<void*>(input.const_data_ptr())},
                                              {kW, const_cast<void*>(weight.const_data_ptr())},
                                              {kY, y.mutable_data_ptr()},
                                              {kSum, sum.mutable_data_ptr()},
                                              {kSumSq, sum_sq.mutable_data_ptr()}};
  if (prologue) {
    scale = scale.to(g->coeff_dtype), shift = shift.to(g->coeff_dtype);  // no-ops in fp32
    pointers[kScale] = scale.mutable_data_ptr(), pointers[kShift] = shift.mutable_data_ptr();
  }
  auto status = g->graph->execute(handle, pointers, workspace.mutable_data_ptr());
  TORCH_CHECK(status.is_good(), "resnet_fused::conv_genstats: the cuDNN graph for ",
              describe(input, weight, stride, padding, dilation, prologue), " failed to run: ", status.get_message());
  auto [mean, var] = genstats_finalize(sum, sum_sq, y.numel() / std::max<int64_t>(C, 1));
  return {y, mean, var};
}

}  // namespace
}  // namespace cudnn_graphs

bool cudnn_graphs_built() { return true; }

std::vector<std::pair<std::string, std::string>> cudnn_graph_report() {
  auto& c = cudnn_graphs::cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return c.report;
}

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) { m.impl("conv_genstats", &cudnn_graphs::conv_genstats_cuda); }

}  // namespace resnet_fused
