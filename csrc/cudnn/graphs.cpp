// The cuda backend's cuDNN graphs (cudnn-frontend's header-only C++ graph API): resnet_fused::conv_genstats forward and
// backward, where every activation between two convolutions of a training block is read and written once per pass,
// and the eval convolution with its folded BN's bias (+ residual) (+ activation) as one graph (conv_act_graph).
//   forward: conv fprop with genstats in its epilogue, y written once and its per-channel (sum y, sum y^2) taken as it
//     is stored, then genstats_finalize (one tiny kernel) for (mean, var); eager's BN reads y once more for them. With
//     an input BN (input_mean given) the prologue applies a = relu(z), z = input * scale + shift, as the conv loads its
//     input (cuDNN's ConvBNfprop pattern: scale, bias, ReLU, conv, genstats): a is never written.
//   backward of the input-BN form: (1) dgrad + dReLU + dBN weight (cuDNN's DgradDreluBNBwdWeight pattern: conv dgrad,
//     z recomputed from input, mean, invstd, gamma, beta, dz = dgrad * (z > 0) written, per-channel (sum dz (x - mean)
//     invstd, sum dz)), then one elementwise pass for grad_input; (2) wgrad with a recomputed as it loads (ConvBNwgrad:
//     scale, bias, ReLU, conv wgrad). Eager writes a, reads it for the wgrad and the ReLU mask, and takes the BN's
//     backward reduction as a separate pass over dgrad's output; this does neither.
//   eval: act(conv(x, w) + bias (+ residual)) with the epilogue on the conv's fp32 accumulator (cuDNN's runtime-fusion
//     engines), y written once; without it a conv + bias + ReLU is the conv, then our epilogue pass over y (aten's
//     cudnn_convolution_relu is its add graph with a zero alpha over an output-sized operand, ops/cudnn.py).
//
// One graph per (pattern, signature: device, dtype, input and weight shapes and strides, stride, padding, dilation, the
// epilogue) and cuDNN handle (one thread's at a time), built on its first call and cached with its workspace size; a
// graph that fails to run declines its signature from then on (warned, reported) and the call runs the passes. The
// per-channel scale and shift are tried in fp32 first (no rounding of the BN's coefficients), then in the io dtype (the
// form the H200 probe built for the forward, benchmarks/results/h200-2026-12-04-cudnn-graphs; for the wgrad with a in
// the io dtype too, as cudnn-frontend's sample); the forward patterns last take their statistics by two reduction
// nodes instead of genstats (the generic runtime-fusion engine: where genstats has no engine, as bf16 on Hopper); the
// report says which form built. A signature cuDNN has no engine for (on Hopper, the H200 probe: bf16 genstats, the 7x7
// stem) is cached too, with cuDNN's reason, warned once, and runs the composite's passes from then on.
// cudnn_graph_report() lists both, once per signature.
// First calls build (milliseconds to a second per signature; a runtime-fusion form compiles its kernel, seconds): run
// a signature once before capturing a CUDA graph.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <ATen/cudnn/Handle.h>
#include <ATen/native/ConvUtils.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/StringUtil.h>
#include <c10/util/bit_cast.h>
#include <c10/util/hash.h>
#include <cudnn_frontend.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "../checks.h"
#include "../conv_genstats.h"
#include "../cudnn_graphs.h"
#include "../cuda/kernels.h"
#include "genstats_finalize.h"

namespace resnet_fused {
namespace cudnn_graphs {
namespace {

namespace fe = cudnn_frontend;
using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;
using TensorAttr = std::shared_ptr<fe::graph::Tensor_attributes>;
using fe::graph::Pointwise_attributes;

enum class Pattern : int64_t { kFprop, kFpropBnRelu, kDgradDreluDbn, kWgradBnRelu, kFpropEpilogue };

// What kFpropEpilogue adds to the conv's accumulator, in order: the bias (1, K, 1, 1), the residual (N, K, P, Q), the
// activation (one of graph_act's; alpha: leaky_relu's slope). The other patterns have none.
struct Epilogue {
  bool bias = false;
  bool residual = false;
  Act act = Act::None;
  double alpha = 0.0;
};

// The activations the epilogue takes, as cuDNN's pointwise modes: relu, relu6 and leaky_relu as RELU_FWD (clipped at
// 6, or with a negative slope), silu as SWISH_FWD (beta 1), gelu as GELU_FWD (erf), gelu_tanh as GELU_APPROX_TANH_FWD;
// nullopt for the others (hardswish, hardsigmoid: no mode; conv_act_stage's passes run them)
std::optional<Pointwise_attributes> graph_act(Act a, double alpha) {
  auto pw = Pointwise_attributes().set_name("act");
  switch (a) {
    case Act::Relu: return pw.set_mode(fe::PointwiseMode_t::RELU_FWD);
    case Act::Relu6: return pw.set_mode(fe::PointwiseMode_t::RELU_FWD).set_relu_lower_clip(0.f).set_relu_upper_clip(6.f);
    case Act::LeakyRelu:
      return pw.set_mode(fe::PointwiseMode_t::RELU_FWD).set_relu_lower_clip_slope(static_cast<float>(alpha));
    case Act::Silu: return pw.set_mode(fe::PointwiseMode_t::SWISH_FWD).set_swish_beta(1.f);
    case Act::Gelu: return pw.set_mode(fe::PointwiseMode_t::GELU_FWD);
    case Act::GeluTanh: return pw.set_mode(fe::PointwiseMode_t::GELU_APPROX_TANH_FWD);
    default: return std::nullopt;
  }
}

std::string pattern_name(Pattern p, const Epilogue& e) {
  switch (p) {
    case Pattern::kFprop: return "conv + genstats";
    case Pattern::kFpropBnRelu: return "bn-relu + conv + genstats";
    case Pattern::kDgradDreluDbn: return "dgrad + drelu + dbn-weight";
    case Pattern::kWgradBnRelu: return "bn-relu + wgrad";
    case Pattern::kFpropEpilogue:
      return c10::str("conv", e.bias ? " + bias" : "", e.residual ? " + add" : "",
                      e.act == Act::None ? "" : c10::str(" + ", act_name(e.act)),
                      e.act == Act::LeakyRelu ? c10::str("(", e.alpha, ")") : "");
  }
  return "?";
}

// what a signature runs where cuDNN has no graph for it (the warning's words)
const char* fallback_of(Pattern p) {
  switch (p) {
    case Pattern::kFprop: return "aten's convolution, then bn_stats";
    case Pattern::kFpropBnRelu: return "bn_act_apply, aten's convolution, then bn_stats";
    case Pattern::kDgradDreluDbn: return "bn_act_apply, aten's dgrad, then bn_act_backward";
    case Pattern::kWgradBnRelu: return "bn_act_apply, then aten's wgrad";
    case Pattern::kFpropEpilogue: return "aten's convolution, then the bn_act_apply epilogue pass";
  }
  return "?";
}

enum Uid : int64_t {
  kX = 1, kW, kY, kSum, kSumSq, kScale, kShift,                             // forward; scale, shift: the input BN's
  kDy, kDz, kMean, kInvStd, kGamma, kBeta, kDscale, kDbias, kEqDy, kEqX, kEqBias,  // dgrad + drelu + dbn-weight
  kDw,                                                                          // wgrad
  kBias, kResidual,                                                             // conv + epilogue
};

// How the forward patterns take y's per-channel (sum y, sum y^2): cuDNN's genstats node (the ConvBNfprop engines: fp16
// on Hopper), or two reduction nodes, sum y and sum y * y, to (1, K, 1, 1) (the generic runtime-fusion engine's conv
// with a reduction epilogue, as cudnn-frontend's ConvColReduction sample: tried where genstats has no engine, e.g. bf16)
enum class Stats { kGenstats, kReduction };

// One way of building a pattern: the dtypes of the per-channel scale and shift (the patterns that take them) and of the
// graph's intermediate values, and the statistics' nodes (the forward patterns)
struct Form {
  at::ScalarType coeff = at::kFloat;
  at::ScalarType intermediate = at::kFloat;
  Stats stats = Stats::kGenstats;
};

// what sets a built form apart from another of its pattern's (the report's words): the per-channel vectors' dtype where
// the pattern takes some, intermediates not in fp32, the forward patterns' statistics nodes
std::string form_label(Pattern p, const Epilogue& e, const Form& f) {
  std::vector<std::string> parts;
  if (p == Pattern::kFpropBnRelu || p == Pattern::kWgradBnRelu) parts.push_back(c10::str("scale and shift in ", f.coeff));
  if (p == Pattern::kFpropEpilogue && e.bias) parts.push_back(c10::str("bias in ", f.coeff));
  if (f.intermediate != at::kFloat) parts.push_back(c10::str("intermediates in ", f.intermediate));
  if (p == Pattern::kFprop || p == Pattern::kFpropBnRelu) {
    parts.emplace_back(f.stats == Stats::kGenstats ? "statistics by genstats" : "statistics by reduction nodes");
  }
  return c10::Join(", ", parts);
}

using Key = std::vector<int64_t>;

struct Graph {
  std::shared_ptr<fe::graph::Graph> graph;  // null: cuDNN has no engine for this signature (or it failed to run)
  int64_t workspace = 0;
  Form form;
  Key key;  // its cache entry's
};

struct Conv {
  at::IntArrayRef stride, padding, dilation;
};

// Graphs are cached per cuDNN handle as well as per signature: a handle is one thread's at a time (aten's handle pool),
// and an execution plan is not to be run from two threads at once (aten keeps its cuDNN plan caches thread-local for
// this); the autograd thread builds its own backward graphs. The report and the warning are per signature.
struct Cache {
  std::mutex mutex;
  std::unordered_map<Key, std::shared_ptr<const Graph>, c10::hash<Key>> graphs;  // (signature..., handle)
  std::unordered_set<Key, c10::hash<Key>> reported;                              // signatures
  std::unordered_set<Key, c10::hash<Key>> failed;    // signatures declined: none built, or it failed to run
  std::vector<std::pair<std::string, std::string>> report;  // (signature, "" or the reason), first seen first
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: graphs hold cuDNN state that must not outlive the CUDA context
  return *c;
}

std::vector<int64_t> vec(at::IntArrayRef a) { return {a.begin(), a.end()}; }
std::vector<int64_t> channels_last(at::IntArrayRef sizes) { return c10::get_channels_last_strides_2d(sizes); }

// every tensor a pattern reads or writes follows from x (the conv's input), w and the conv's parameters; y and the
// gradients are stored channels_last as the kernels below allocate them
Key signature(Pattern p, const Tensor& x, const Tensor& w, const Conv& conv, const Epilogue& e) {
  Key key{x.get_device(), static_cast<int64_t>(x.scalar_type()), static_cast<int64_t>(p), e.bias, e.residual,
          static_cast<int64_t>(e.act), c10::bit_cast<int64_t>(e.alpha)};
  for (const at::IntArrayRef part : {x.sizes(), x.strides(), w.sizes(), w.strides(), conv.stride, conv.padding, conv.dilation}) {
    key.insert(key.end(), part.begin(), part.end());
  }
  return key;
}

std::string describe(Pattern p, const Tensor& x, const Tensor& w, const Conv& conv, const Epilogue& e) {
  return c10::str(pattern_name(p, e), ", ", x.scalar_type(), " input ", x.sizes(), " weight ", w.sizes(), " stride ", conv.stride,
                  " padding ", conv.padding, " dilation ", conv.dilation, " on ", x.device());
}

fe::DataType_t fe_dtype(at::ScalarType t) {
  return t == at::kHalf ? fe::DataType_t::HALF : t == at::kBFloat16 ? fe::DataType_t::BFLOAT16 : fe::DataType_t::FLOAT;
}

// The graph's nodes, by pattern. y_shape: the conv's output (N, K, P, Q).
struct Builder {
  fe::graph::Graph& graph;
  const Tensor& x;
  const Tensor& w;
  at::IntArrayRef y_shape;
  Conv conv;
  Form form;
  Epilogue epilogue;

  TensorAttr tensor(const char* name, int64_t uid, at::IntArrayRef sizes, at::IntArrayRef strides) {
    return graph.tensor(fe::graph::Tensor_attributes().set_name(name).set_uid(uid).set_dim(vec(sizes)).set_stride(vec(strides)));
  }
  // (1, C, 1, 1): C dense values
  TensorAttr channel_vector(const char* name, int64_t uid, int64_t C, at::ScalarType dtype) {
    return graph.tensor(fe::graph::Tensor_attributes().set_name(name).set_uid(uid).set_data_type(fe_dtype(dtype))
                            .set_dim({1, C, 1, 1}).set_stride({C, 1, C, C}));
  }
  static void channel_output(const TensorAttr& t, int64_t uid, int64_t C) {  // (1, C, 1, 1): C dense floats
    t->set_output(true).set_uid(uid).set_data_type(fe::DataType_t::FLOAT).set_dim({1, C, 1, 1}).set_stride({C, 1, C, C});
  }
  TensorAttr pointwise(const TensorAttr& a, const TensorAttr& b, fe::PointwiseMode_t mode, const char* name) {
    return graph.pointwise(a, b, Pointwise_attributes().set_name(name).set_mode(mode));
  }
  // a = relu(x * scale + shift), the input BN + ReLU recomputed as x loads
  TensorAttr bn_relu(const TensorAttr& X) {
    const int64_t C = x.size(1);
    auto scaled = pointwise(X, channel_vector("scale", kScale, C, form.coeff), fe::PointwiseMode_t::MUL, "scale");
    auto shifted = pointwise(scaled, channel_vector("shift", kShift, C, form.coeff), fe::PointwiseMode_t::ADD, "shift");
    return graph.pointwise(shifted, Pointwise_attributes().set_name("relu").set_mode(fe::PointwiseMode_t::RELU_FWD));
  }

  TensorAttr conv_fprop(const TensorAttr& X) {
    auto W = tensor("w", kW, w.sizes(), w.strides());
    return graph.conv_fprop(X, W, fe::graph::Conv_fprop_attributes().set_name("conv").set_padding(vec(conv.padding))
                                      .set_stride(vec(conv.stride)).set_dilation(vec(conv.dilation)));
  }
  void y_output(const TensorAttr& Y) {  // (N, K, P, Q) in the io dtype, channels_last
    Y->set_output(true).set_uid(kY).set_data_type(fe_dtype(x.scalar_type())).set_dim(vec(y_shape)).set_stride(channels_last(y_shape));
  }

  void fprop(bool prologue) {
    auto X = tensor("x", kX, x.sizes(), x.strides());
    auto Y = conv_fprop(prologue ? bn_relu(X) : X);
    y_output(Y);
    TensorAttr sum, sum_sq;
    if (form.stats == Stats::kGenstats) {
      const auto stats = graph.genstats(Y, fe::graph::Genstats_attributes().set_name("genstats"));
      sum = stats[0], sum_sq = stats[1];
    } else {  // sum over (N, P, Q) of y and of y * y, each to (1, K, 1, 1) in fp32
      const auto add = [&](const TensorAttr& t, const char* name) {
        return graph.reduction(t, fe::graph::Reduction_attributes().set_name(name).set_mode(fe::ReductionMode_t::ADD)
                                      .set_compute_data_type(fe::DataType_t::FLOAT));
      };
      sum = add(Y, "sum");
      sum_sq = add(pointwise(Y, Y, fe::PointwiseMode_t::MUL, "square"), "sum_sq");
    }
    channel_output(sum, kSum, y_shape[1]);
    channel_output(sum_sq, kSumSq, y_shape[1]);
  }

  // y = act(conv(x, w) + bias (+ residual)), the epilogue on the conv's accumulator (intermediates fp32), y rounded once
  // (conv_act_graph takes only activations graph_act has)
  void fprop_epilogue() {
    auto Y = conv_fprop(tensor("x", kX, x.sizes(), x.strides()));
    if (epilogue.bias) Y = pointwise(Y, channel_vector("bias", kBias, y_shape[1], form.coeff), fe::PointwiseMode_t::ADD, "bias");
    if (epilogue.residual) {
      Y = pointwise(Y, tensor("residual", kResidual, y_shape, channels_last(y_shape)), fe::PointwiseMode_t::ADD, "add");
    }
    if (epilogue.act != Act::None) Y = graph.pointwise(Y, *graph_act(epilogue.act, epilogue.alpha));
    y_output(Y);
  }

  // dz = conv_dgrad(dy, w) * (z > 0), z = (x - mean) invstd gamma + beta; dbn_weight: (sum dz (x - mean) invstd, sum dz)
  // and cuDNN's equivalent coefficients (dx = eq_dy dz + eq_x x + eq_bias: bound, not read; grad_input is taken by
  // bn_act_backward_elemt from the two sums, the math every other path uses)
  void dgrad_drelu_dbn() {
    const int64_t C = x.size(1);
    auto DY = tensor("dy", kDy, y_shape, channels_last(y_shape));
    auto W = tensor("w", kW, w.sizes(), w.strides());
    auto dA = graph.conv_dgrad(DY, W, fe::graph::Conv_dgrad_attributes().set_name("dgrad").set_padding(vec(conv.padding))
                                          .set_stride(vec(conv.stride)).set_dilation(vec(conv.dilation)));
    dA->set_dim(vec(x.sizes()));
    auto X = tensor("x", kX, x.sizes(), x.strides());
    auto M = channel_vector("mean", kMean, C, at::kFloat), V = channel_vector("invstd", kInvStd, C, at::kFloat);
    auto S = channel_vector("gamma", kGamma, C, at::kFloat), B = channel_vector("beta", kBeta, C, at::kFloat);
    auto centered = pointwise(X, M, fe::PointwiseMode_t::SUB, "center");
    auto normalized = pointwise(centered, V, fe::PointwiseMode_t::MUL, "normalize");
    auto z = pointwise(pointwise(normalized, S, fe::PointwiseMode_t::MUL, "gamma"), B, fe::PointwiseMode_t::ADD, "beta");
    auto DZ = graph.pointwise(dA, z, Pointwise_attributes().set_name("drelu").set_mode(fe::PointwiseMode_t::RELU_BWD));
    DZ->set_output(true).set_uid(kDz).set_data_type(fe_dtype(x.scalar_type())).set_dim(vec(x.sizes()))
        .set_stride(channels_last(x.sizes()));
    auto [dscale, dbias, eq_dy, eq_x, eq_bias] =
        graph.dbn_weight(DZ, X, M, V, S, fe::graph::DBN_weight_attributes().set_name("dbn_weight"));
    channel_output(dscale, kDscale, C);
    channel_output(dbias, kDbias, C);
    channel_output(eq_dy, kEqDy, C);
    channel_output(eq_x, kEqX, C);
    channel_output(eq_bias, kEqBias, C);
  }

  // dw = conv_wgrad(dy, relu(x * scale + shift))
  void wgrad_bn_relu() {
    auto A = bn_relu(tensor("x", kX, x.sizes(), x.strides()));
    auto DY = tensor("dy", kDy, y_shape, channels_last(y_shape));
    auto DW = graph.conv_wgrad(DY, A, fe::graph::Conv_wgrad_attributes().set_name("wgrad").set_padding(vec(conv.padding))
                                          .set_stride(vec(conv.stride)).set_dilation(vec(conv.dilation)));
    DW->set_output(true).set_uid(kDw).set_data_type(fe_dtype(x.scalar_type())).set_dim(vec(w.sizes()))
        .set_stride(channels_last(w.sizes()));
  }
};

// "" when built into g, else why not (cuDNN's message)
std::string build(Graph& g, Pattern p, const Tensor& x, const Tensor& w, at::IntArrayRef y_shape, const Conv& conv, Form form,
                  const Epilogue& epilogue, cudnnHandle_t handle) {
  auto graph = std::make_shared<fe::graph::Graph>();
  graph->set_io_data_type(fe_dtype(x.scalar_type()))
      .set_intermediate_data_type(fe_dtype(form.intermediate))
      .set_compute_data_type(fe::DataType_t::FLOAT);
  Builder b{*graph, x, w, y_shape, conv, form, epilogue};
  switch (p) {
    case Pattern::kFprop: b.fprop(false); break;
    case Pattern::kFpropBnRelu: b.fprop(true); break;
    case Pattern::kDgradDreluDbn: b.dgrad_drelu_dbn(); break;
    case Pattern::kWgradBnRelu: b.wgrad_bn_relu(); break;
    case Pattern::kFpropEpilogue: b.fprop_epilogue(); break;
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
  g.form = form;
  return "";
}

// the ways to try, best first: fp32 coefficients and intermediates; then, where the pattern has coefficients, the io
// dtype for them (PaddlePaddle's ConvBNwgrad passes fp16 ones, aten's conv + add + bias + ReLU graph an io-dtype bias),
// and for the wgrad also for its recomputed a (as cudnn-frontend's ConvBNwgrad sample builds it); for the forward
// patterns last the statistics by reduction nodes
std::vector<Form> forms(Pattern p, at::ScalarType io, const Epilogue& e) {
  const Form reduction{at::kFloat, at::kFloat, Stats::kReduction};
  switch (p) {
    case Pattern::kFprop: return {Form{}, reduction};
    case Pattern::kFpropBnRelu: return {Form{}, Form{io, at::kFloat}, reduction};
    case Pattern::kWgradBnRelu: return {Form{}, Form{io, at::kFloat}, Form{io, io}};
    case Pattern::kFpropEpilogue: return e.bias ? std::vector<Form>{Form{}, Form{io, at::kFloat}} : std::vector<Form>{Form{}};
    default: return {Form{}};
  }
}

// the cached graph of this signature and handle (its `graph` null where cuDNN has none, or a graph of the signature
// failed to run), built on first sight
std::shared_ptr<const Graph> graph_for(Pattern p, const Tensor& x, const Tensor& w, at::IntArrayRef y_shape, const Conv& conv,
                                       const Epilogue& epilogue, cudnnHandle_t handle) {
  Cache& c = cache();
  const Key sig = signature(p, x, w, conv, epilogue);
  Key key = sig;
  key.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(handle)));
  std::lock_guard<std::mutex> lock(c.mutex);
  if (auto it = c.graphs.find(key); it != c.graphs.end()) return it->second;
  auto g = std::make_shared<Graph>();
  g->key = key;
  if (c.failed.count(sig)) return c.graphs.emplace(std::move(key), std::move(g)).first->second;
  // no build while a CUDA graph captures (it may compile and allocate): this call runs its passes, nothing is cached,
  // and the first call outside a capture builds it (a captured step's warm-up run, as CUDA graphs want, does)
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) return g;
  const auto tries = forms(p, x.scalar_type(), epilogue);
  const bool several = tries.size() > 1;
  std::string reason;
  for (const Form& form : tries) {
    std::string why;
    try {
      why = build(*g, p, x, w, y_shape, conv, form, epilogue, handle);
    } catch (const std::exception& e) {  // the frontend's exceptions (e.g. a cuDNN too old for a node)
      why = e.what();
    }
    if (why.empty()) {
      reason.clear();
      break;
    }
    g->graph.reset();
    reason += several ? c10::str(reason.empty() ? "" : "; ", form_label(p, epilogue, form), ": ", why) : why;
  }
  // declined for the device (the signature names it): another thread's handle takes the decline, not the builds again
  if (!reason.empty()) c.failed.insert(sig);
  if (c.reported.insert(sig).second) {
    std::string what = describe(p, x, w, conv, epilogue);
    if (!reason.empty()) {
      TORCH_WARN("resnet_fused: no cuDNN graph for ", what, " (", reason, "); this signature runs ", fallback_of(p));
    } else if (several) {
      what += c10::str(", ", form_label(p, epilogue, g->form));
    }
    c.report.emplace_back(what, reason);
  }
  return c.graphs.emplace(std::move(key), std::move(g)).first->second;
}

bool aligned(const Tensor& v) { return reinterpret_cast<uintptr_t>(v.const_data_ptr()) % 16 == 0; }

// The signatures a graph may take: fp16 / bf16 (the fused engines' dtypes), input and weight channels_last (NHWC, KRSC),
// channel counts multiples of 8 (16-byte channel vectors), 16-byte aligned data; cuDNN decides the rest
bool graph_applies(const Tensor& x, const Tensor& w) {
  const auto cl = at::MemoryFormat::ChannelsLast;
  const auto t = x.scalar_type();
  return (t == at::kHalf || t == at::kBFloat16) && w.scalar_type() == t && x.is_cuda() && x.is_contiguous(cl) &&
         w.is_contiguous(cl) && x.size(1) % 8 == 0 && w.size(0) % 8 == 0 && x.numel() > 0 && aligned(x) && aligned(w);
}

bool nonempty(at::IntArrayRef shape) {
  return std::all_of(shape.begin(), shape.end(), [](int64_t d) { return d > 0; });
}

// cuDNN as torch's switches allow it: enabled, and no deterministic algorithms asked for (genstats and the reduction
// nodes sum across thread blocks in no fixed order; the passes' aten conv and bn_stats follow the switches)
bool cudnn_switches_allow() {
  const at::Context& ctx = at::globalContext();
  return ctx.userEnabledCuDNN() && !ctx.deterministicCuDNN() && !ctx.deterministicAlgorithms();
}

// Whether a graph may run this call: the graphs on, torch's cuDNN switches, a nonempty output, a signature graphs take
// (cheap: before a guard)
bool graph_may_run(const Tensor& x, const Tensor& w, at::IntArrayRef y_shape) {
  return cudnn_graphs_enabled() && cudnn_switches_allow() && nonempty(y_shape) && graph_applies(x, w);
}

// The graph this call runs where graph_may_run, or null where cuDNN has no engine for the signature; handle: the
// current device's cuDNN handle on the current stream. The caller holds a device guard.
std::shared_ptr<const Graph> graph_of_call(Pattern p, const Tensor& x, const Tensor& w, at::IntArrayRef y_shape,
                                           const Conv& conv, cudnnHandle_t& handle, const Epilogue& epilogue = {}) {
  handle = at::native::getCudnnHandle();
  auto g = graph_for(p, x, w, y_shape, conv, epilogue, handle);
  if (!g->graph) return nullptr;
  AT_CUDNN_CHECK(cudnnSetStream(handle, at::cuda::getCurrentCUDAStream()));
  return g;
}

// Runs g on the tensors bound by uid; false where cuDNN fails to run it: the signature is then declined from here on,
// on every handle (reported, warned once), and the caller runs its passes.
[[nodiscard]] bool execute(const Graph& g, Pattern p, cudnnHandle_t handle, std::unordered_map<int64_t, void*>& pointers,
                           const Tensor& x, const Tensor& w, const Conv& conv, const Epilogue& epilogue = {}) {
  Tensor workspace = at::empty({g.workspace}, x.options().dtype(at::kByte));
  auto status = g.graph->execute(handle, pointers, workspace.mutable_data_ptr());
  if (status.is_good()) return true;
  const std::string what = describe(p, x, w, conv, epilogue), why = c10::str("failed to run: ", status.get_message());
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  const Key sig(g.key.begin(), g.key.end() - 1);  // the key without its handle
  if (!c.failed.insert(sig).second) return false;  // another handle's run failed first and declined it already
  // every handle's entry of the signature declined (a failure is rare: a scan here keeps the hot path one lookup)
  for (auto& [key, graph] : c.graphs) {
    if (key.size() == g.key.size() && std::equal(sig.begin(), sig.end(), key.begin())) {
      auto declined = std::make_shared<Graph>();
      declined->key = key;
      graph = std::move(declined);
    }
  }
  c.report.emplace_back(what, why);
  TORCH_WARN("resnet_fused: the cuDNN graph for ", what, " ", why, "; this signature runs ", fallback_of(p), " from now on");
  return false;
}

// a per-channel vector as a graph reads it: dense, 16-byte aligned (a view into a flat parameter buffer may not be:
// copied), in `dtype` (no-ops for the usual fp32 vectors)
Tensor graph_vector(const Tensor& t, at::ScalarType dtype = at::kFloat) {
  Tensor v = t.to(dtype).contiguous();
  return aligned(v) ? v : v.clone();
}

void* ptr(const Tensor& t) { return const_cast<void*>(t.const_data_ptr()); }

std::tuple<Tensor, Tensor, Tensor> conv_genstats_cuda(const Tensor& input, const Tensor& weight, at::IntArrayRef stride,
                                                      at::IntArrayRef padding, at::IntArrayRef dilation,
                                                      const OptTensor& input_mean, const OptTensor& input_var,
                                                      const OptTensor& input_weight, const OptTensor& input_bias,
                                                      double input_eps) {
  check_conv_genstats(input, weight, stride, padding, dilation, input_mean, input_var, input_weight, input_bias);
  const bool prologue = input_mean.has_value();
  const Pattern p = prologue ? Pattern::kFpropBnRelu : Pattern::kFprop;
  Tensor scale, shift;  // (Cin,) fp32: a = relu(input * scale + shift)
  if (prologue) std::tie(scale, shift) = input_scale_shift(input, *input_mean, *input_var, input_weight, input_bias, input_eps);
  const Conv conv{stride, padding, dilation};
  const auto shape = at::native::conv_output_size(input.sizes(), weight.sizes(), padding, stride, dilation);
  // without a graph: the input BN + ReLU written, then the conv and its statistics (aten's conv says what is wrong
  // with a shape)
  const auto passes = [&] {
    return conv_genstats_passes(prologue ? input_bn_relu(input, scale, shift) : input, weight, stride, padding, dilation);
  };
  if (!graph_may_run(input, weight, shape)) return passes();
  const c10::cuda::CUDAGuard guard(input.device());
  cudnnHandle_t handle = nullptr;
  const auto g = graph_of_call(p, input, weight, shape, conv, handle);
  if (!g) return passes();
  Tensor y = at::empty(shape, input.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t C = y.size(1);
  Tensor sums = at::empty({2, C}, input.options().dtype(at::kFloat));  // (sum y, sum y^2)
  // genstats writes its sums (the H200 probe's uninitialized outputs held the right sums after 23 runs); reduction nodes
  // may add into theirs: zeroed (2 C floats) until the probe (NaN-poisoned outputs) shows they do not
  if (g->form.stats == Stats::kReduction) sums.zero_();
  std::unordered_map<int64_t, void*> pointers{
      {kX, ptr(input)}, {kW, ptr(weight)}, {kY, ptr(y)}, {kSum, ptr(sums[0])}, {kSumSq, ptr(sums[1])}};
  Tensor graph_scale, graph_shift;  // in the form's dtype (the passes keep fp32 ones)
  if (prologue) {
    graph_scale = graph_vector(scale, g->form.coeff), graph_shift = graph_vector(shift, g->form.coeff);
    pointers[kScale] = ptr(graph_scale), pointers[kShift] = ptr(graph_shift);
  }
  if (!execute(*g, p, handle, pointers, input, weight, conv)) return passes();
  auto [mean, var] = genstats_finalize(sums[0], sums[1], y.numel() / std::max<int64_t>(C, 1));
  return {y, mean, var};
}

// run(dy, graph, handle) (an optional: nullopt where the graph failed to run) with pattern p's backward graph for this
// call, under a device guard; nullopt where no graph runs. dy: grad_y as the graphs read it, dense channels_last and
// 16-byte aligned (a copy only where it is not).
template <class Run>
auto with_backward_graph(Pattern p, const Tensor& grad_y, const Tensor& input, const Tensor& weight, const Conv& conv,
                         Run run) -> decltype(run(grad_y, std::declval<const Graph&>(), cudnnHandle_t{})) {
  if (grad_y.scalar_type() != input.scalar_type() || !graph_may_run(input, weight, grad_y.sizes())) return std::nullopt;
  const Tensor dy = grad_y.contiguous(at::MemoryFormat::ChannelsLast);
  if (!aligned(dy)) return std::nullopt;
  const c10::cuda::CUDAGuard guard(input.device());
  cudnnHandle_t handle = nullptr;
  const auto g = graph_of_call(p, input, weight, dy.sizes(), conv, handle);
  if (!g) return std::nullopt;
  return run(dy, *g, handle);
}

}  // namespace
}  // namespace cudnn_graphs

std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor>> conv_genstats_dgrad_graph(
    const at::Tensor& grad_y, const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, const at::Tensor& input_mean, const at::Tensor& input_var,
    const std::optional<at::Tensor>& input_weight, const std::optional<at::Tensor>& input_bias, double input_eps,
    bool need_grad_input) {
  using namespace cudnn_graphs;
  const Conv conv{stride, padding, dilation};
  return with_backward_graph(Pattern::kDgradDreluDbn, grad_y, input, weight, conv, [&](const Tensor& dy, const Graph& g,
                                                                                     cudnnHandle_t handle) {
    using Result = std::optional<std::tuple<Tensor, Tensor, Tensor>>;
    const int64_t C = input.size(1);
    const Tensor mean = graph_vector(input_mean), var = input_var;
    // invstd = 1 / sqrt(var + eps): bn_scale_shift's scale without a weight (one launch, fp64 math)
    const Tensor invstd = std::get<0>(gpu::bn_scale_shift_cuda(mean, var, std::nullopt, std::nullopt, input_eps));
    const Tensor gamma = input_weight ? graph_vector(*input_weight) : at::ones({C}, mean.options());
    const Tensor beta = input_bias ? graph_vector(*input_bias) : at::zeros({C}, mean.options());
    Tensor dz = at::empty(input.sizes(), input.options().memory_format(at::MemoryFormat::ChannelsLast));
    Tensor per_channel = at::empty({5, C}, mean.options());  // dscale, dbias, eq_dy, eq_x, eq_bias
    std::unordered_map<int64_t, void*> pointers{
        {kDy, ptr(dy)},         {kW, ptr(weight)},       {kX, ptr(input)},          {kMean, ptr(mean)},
        {kInvStd, ptr(invstd)}, {kGamma, ptr(gamma)},    {kBeta, ptr(beta)},        {kDz, ptr(dz)},
        {kDscale, ptr(per_channel[0])}, {kDbias, ptr(per_channel[1])}, {kEqDy, ptr(per_channel[2])},
        {kEqX, ptr(per_channel[3])},    {kEqBias, ptr(per_channel[4])}};
    if (!execute(g, Pattern::kDgradDreluDbn, handle, pointers, input, weight, conv)) return Result();
    const Tensor dscale = per_channel[0], dbias = per_channel[1];  // sum dz (x - mean) invstd, sum dz
    Tensor grad_input;
    if (need_grad_input) {  // the BN's training backward on dz: dz a + (x - mean) b + c (bn_act_backward's math)
      const double count = static_cast<double>(input.numel() / C);
      Tensor a, b, c;  // from sum dz and sum dz xhat = dscale
      std::tie(a, b, c, std::ignore) = gpu::bn_backward_coeffs_xhat_cuda(
          dbias, dscale, var, input_weight ? OptTensor(gamma) : std::nullopt, input_eps, count);
      grad_input = std::get<0>(gpu::bn_act_backward_elemt_cuda(dz, std::nullopt, input, mean, a, b, c, false));
    }
    return Result(std::make_tuple(grad_input, dscale, dbias));
  });
}

std::optional<at::Tensor> conv_genstats_wgrad_graph(const at::Tensor& grad_y, const at::Tensor& input, const at::Tensor& weight,
                                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                                    const at::Tensor& scale, const at::Tensor& shift) {
  using namespace cudnn_graphs;
  const Conv conv{stride, padding, dilation};
  return with_backward_graph(Pattern::kWgradBnRelu, grad_y, input, weight, conv, [&](const Tensor& dy, const Graph& g,
                                                                                   cudnnHandle_t handle) {
    const Tensor s = graph_vector(scale, g.form.coeff), b = graph_vector(shift, g.form.coeff);
    Tensor grad_weight = at::empty(weight.sizes(), weight.options().memory_format(at::MemoryFormat::ChannelsLast));
    std::unordered_map<int64_t, void*> pointers{
        {kX, ptr(input)}, {kScale, ptr(s)}, {kShift, ptr(b)}, {kDy, ptr(dy)}, {kDw, ptr(grad_weight)}};
    if (!execute(g, Pattern::kWgradBnRelu, handle, pointers, input, weight, conv)) return std::optional<Tensor>();
    return std::optional<Tensor>(grad_weight);
  });
}

std::optional<at::Tensor> conv_act_graph(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                         const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, Act act,
                                         double alpha) {
  using namespace cudnn_graphs;
  const Epilogue epilogue{bias.has_value(), residual.has_value(), act, act == Act::LeakyRelu ? alpha : 0.0};
  const bool takes_act = act == Act::None || graph_act(act, alpha).has_value();
  if (groups != 1 || !takes_act || !(epilogue.bias || epilogue.residual || act != Act::None)) return std::nullopt;
  const auto shape = at::native::conv_output_size(input.sizes(), weight.sizes(), padding, stride, dilation);
  if (!graph_may_run(input, weight, shape) ||
      (residual && !(residual->is_contiguous(at::MemoryFormat::ChannelsLast) && aligned(*residual)))) {
    return std::nullopt;
  }
  const Conv conv{stride, padding, dilation};
  const c10::cuda::CUDAGuard guard(input.device());
  cudnnHandle_t handle = nullptr;
  const auto g = graph_of_call(Pattern::kFpropEpilogue, input, weight, shape, conv, handle, epilogue);
  if (!g) return std::nullopt;
  Tensor y = at::empty(shape, input.options().memory_format(at::MemoryFormat::ChannelsLast));
  std::unordered_map<int64_t, void*> pointers{{kX, ptr(input)}, {kW, ptr(weight)}, {kY, ptr(y)}};
  Tensor b;
  if (bias) {  // in the form's dtype: a no-op for a plan's fp32 bias
    b = graph_vector(*bias, g->form.coeff);
    pointers[kBias] = ptr(b);
  }
  if (residual) pointers[kResidual] = ptr(*residual);
  if (!execute(*g, Pattern::kFpropEpilogue, handle, pointers, input, weight, conv, epilogue)) return std::nullopt;
  return y;
}

bool cudnn_graphs_built() { return true; }

std::vector<std::pair<std::string, std::string>> cudnn_graph_report() {
  auto& c = cudnn_graphs::cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return c.report;
}

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) { m.impl("conv_genstats", &cudnn_graphs::conv_genstats_cuda); }

}  // namespace resnet_fused
