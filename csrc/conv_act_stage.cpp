// conv_act_stage: act(conv2d(input, weight, bias) (+ residual)) as one op call, the eval stage once BN is folded into
// (weight, bias) (resnet_fused/ops/_bn_math.py, fold_bn). Where no gradient is wanted the bias, residual and activation
// take at most one pass after the convolution, or none:
//   fused_conv, CPU:  oneDNN's convolution with post-ops (bias, add, activation), weight dense or prepacked; fp32,
//                     or bf16 where oneDNN has its bf16 ISA (the caller's choice: resnet_fused/ops/onednn.py, runs)
//   fused_conv, CUDA: with a residual and a ReLU, cuDNN's conv + add + bias + ReLU graph (aten's
//                     cudnn_convolution_add_relu, alpha 1); otherwise our cuDNN graph of the conv with its bias
//                     (+ residual) (+ activation) where the graphs are on and cuDNN builds it (cudnn_graphs.h), else
//                     as below
//   CUDA otherwise:   cuDNN's convolution without bias (aten adds a bias in a pass of its own), then one
//                     epilogue pass act(y * 1 + bias (+ residual)) in fp32 (the bn_act_apply kernel)
//   CPU otherwise:    with a bias and a residual or an activation, as CUDA: the convolution without bias, then the one
//                     epilogue pass (aten's CPU conv with a bias (NCHW, AVX2, small outputs) was measured at 2.3x the
//                     error of the conv then bias: BN's eval shift is added after the conv in eager too); else aten's
//                     convolution with the bias, then add_relu's one pass, or the activation in place
// Where a gradient is wanted: aten's differentiable conv2d, add and activation. The Python twin (other backends,
// and the tuner's variants) is resnet_fused/ops/conv_bn_act.py, conv_act.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <map>
#include <mutex>

#include "activation.h"
#include "checks.h"
#include "cudnn_graphs.h"
#include "kernel_ops.h"

namespace resnet_fused {
namespace {

using OptTensor = std::optional<at::Tensor>;
using Tensor = at::Tensor;
using Scalars = c10::List<std::optional<at::Scalar>>;
using OptStr = std::optional<std::string_view>;

// act(y), in place where no gradient is wanted (y is the convolution's fresh output), as torch's own functions
Tensor apply_act(Tensor y, Act a, double alpha, bool in_place) {
  switch (a) {
    case Act::None: return y;
    case Act::Relu: return in_place ? y.relu_() : at::relu(y);
    case Act::Relu6: return in_place ? at::hardtanh_(y, 0.0, 6.0) : at::hardtanh(y, 0.0, 6.0);
    case Act::LeakyRelu: return in_place ? at::leaky_relu_(y, alpha) : at::leaky_relu(y, alpha);
    case Act::Silu: return in_place ? at::silu_(y) : at::silu(y);
    case Act::Gelu: return in_place ? at::gelu_(y, "none") : at::gelu(y, "none");
    case Act::GeluTanh: return in_place ? at::gelu_(y, "tanh") : at::gelu(y, "tanh");
    case Act::Hardswish: return in_place ? at::hardswish_(y) : at::hardswish(y);
    default: return in_place ? at::hardsigmoid_(y) : at::hardsigmoid(y);
  }
}

// each activation as oneDNN's eltwise post-op: (attr, scalars, algorithm) of mkldnn::_convolution_pointwise
struct PostOp {
  std::string_view attr;
  Scalars scalars;
  OptStr algorithm;
};

PostOp post_op(Act a, double alpha) {
  switch (a) {
    case Act::None: return {"none", Scalars(), std::nullopt};
    case Act::Relu: return {"relu", Scalars(), std::nullopt};
    case Act::Relu6: return {"hardtanh", Scalars({at::Scalar(0.0), at::Scalar(6.0)}), std::nullopt};
    case Act::LeakyRelu: return {"leaky_relu", Scalars({at::Scalar(alpha)}), std::nullopt};
    case Act::Silu: return {"swish", Scalars(), std::nullopt};
    case Act::Gelu: return {"gelu", Scalars(), "none"};
    case Act::GeluTanh: return {"gelu", Scalars(), "tanh"};
    case Act::Hardswish: return {"hardswish", Scalars(), std::nullopt};
    default: return {"hardsigmoid", Scalars(), std::nullopt};
  }
}

// act(conv2d(input, weight, bias) (+ residual)) in one oneDNN call (weight dense or prepacked); with a residual
// oneDNN fuses ReLU alone after the add, so another activation takes one pass of its own
Tensor onednn_conv_act(const Tensor& input, const Tensor& weight, const OptTensor& bias, const OptTensor& residual,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, Act a,
                       double alpha) {
  using Unary = Tensor(const Tensor&, const Tensor&, const OptTensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                       int64_t, std::string_view, Scalars, OptStr);
  using Binary = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, at::IntArrayRef, at::IntArrayRef,
                        at::IntArrayRef, int64_t, std::string_view, std::optional<at::Scalar>, OptStr, Scalars, OptStr);
  static const auto unary = kernel_ops::handle<Unary>("mkldnn::_convolution_pointwise");
  static const auto binary = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_convolution_pointwise", "binary")
                                 .typed<Binary>();
  // oneDNN's add post-op takes the bias in the input's dtype (a plan gives it so: no conversion per call)
  const OptTensor b = bias.has_value() && bias->scalar_type() != input.scalar_type()
                          ? OptTensor(bias->to(input.scalar_type())) : bias;
  if (!residual.has_value()) {
    const auto p = post_op(a, alpha);
    return unary.call(input, weight, b, padding, stride, dilation, groups, p.attr, p.scalars, p.algorithm);
  }
  const bool relu = a == Act::Relu;
  // aten's binary call fuses the add for groups == 1 and a prepacked weight (or a channels_last pair); otherwise it
  // runs the conv, then for a ReLU at::add_relu_, which has no bf16 kernel: there the add + ReLU is our pass
  if (relu && input.scalar_type() != at::kFloat && !(weight.is_mkldnn() && groups == 1)) {
    const auto y = unary.call(input, weight, b, padding, stride, dilation, groups, "none", Scalars(), std::nullopt);
    return kernel_ops::add_relu_forward(y, *residual);
  }
  auto out = binary.call(input, *residual, weight, b, padding, stride, dilation, groups, "add", at::Scalar(1.0),
                         relu ? OptStr("relu") : std::nullopt, Scalars(), std::nullopt);
  return relu ? out : apply_act(out, a, alpha, true);
}

// fp32 ones / zeros of `channels` on `device`: the epilogue's per-channel scale (the BN scale is in the folded
// weight) and a missing bias. Kept for good; one first made inside a CUDA graph capture holds its values once that graph
// has replayed (its fill is captured, not run): a capture's warm-up calls, as CUDA graphs want, make it first
const Tensor& constant_vector(double value, int64_t channels, const at::Device& device) {
  static std::mutex mutex;
  static std::map<std::tuple<double, int64_t, at::DeviceType, c10::DeviceIndex>, Tensor> vectors;
  std::lock_guard<std::mutex> lock(mutex);
  auto& v = vectors[{value, channels, device.type(), device.index()}];
  if (!v.defined()) v = at::full({channels}, value, at::TensorOptions().dtype(at::kFloat).device(device));
  return v;
}

c10::SymInt conv_out_size(const c10::SymInt& in, const c10::SymInt& kernel, int64_t stride, int64_t padding, int64_t dilation) {
  return (in + 2 * padding - dilation * (kernel - 1) - 1) / stride + 1;
}

Tensor conv_act_stage(const Tensor& input, const Tensor& weight, const OptTensor& bias, const OptTensor& residual,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                      std::string_view act, double alpha, bool fused_conv) {
  const char* op = "conv_act_stage";
  check_activation(input, op, "input");
  const Act a = parse_act(act, op);
  const bool prepacked = weight.layout() == at::kMkldnn;
  const bool wants_grad = at::GradMode::is_enabled() && (input.requires_grad() || weight.requires_grad() ||
                                                         (bias.has_value() && bias->requires_grad()) ||
                                                         (residual.has_value() && residual->requires_grad()));
  // the dtypes the caller may give oneDNN (resnet_fused/ops/onednn.py, runs: bf16 only where oneDNN has its ISA)
  const bool onednn_dtype = input.scalar_type() == at::kFloat || input.scalar_type() == at::kBFloat16;
  RF_CHECK(!prepacked || (fused_conv && input.is_cpu() && onednn_dtype && !wants_grad), op,
           "a prepacked (oneDNN) weight runs only with fused_conv=True on fp32 or bf16 CPU tensors without gradients; got ",
           input.scalar_type(), " `input` on ", input.device(), wants_grad ? ", a gradient wanted" : "");
  RF_CHECK(!prepacked || weight.scalar_type() == input.scalar_type(), op, "the prepacked `weight` is ",
           weight.scalar_type(), ", `input` is ", input.scalar_type());
  if (!prepacked) {
    RF_CHECK(weight.dim() == 4, op, "expected `weight` of shape (Cout, Cin / groups, KH, KW), got ", weight.sym_sizes());
    RF_CHECK(groups > 0 && weight.sym_size(1) * groups == input.sym_size(1), op, "`weight` ", weight.sym_sizes(),
             " with groups=", groups, " expects ", weight.sym_size(1) * groups, " input channels, `input` ", input.sym_sizes(),
             " has ", input.sym_size(1));
    RF_CHECK(weight.scalar_type() == input.scalar_type() && weight.device() == input.device(), op, "`weight` is ",
             weight.scalar_type(), " on ", weight.device(), ", `input` is ", input.scalar_type(), " on ", input.device());
  }
  RF_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op, "expected stride, padding and dilation pairs");
  const c10::SymInt cout = prepacked ? c10::SymInt(weight.size(0)) : weight.sym_size(0);
  if (bias.has_value()) {
    RF_CHECK(bias->dim() == 1 && bias->sym_numel() == cout, op, "expected `bias` of shape (", cout,
             "), one per output channel of `weight`, got ", bias->sym_sizes());
    RF_CHECK(bias->device() == input.device(), op, "`bias` is on ", bias->device(), " but `input` is on ", input.device());
  }
  if (residual.has_value()) {  // conv2d's output shape, before any kernel runs
    std::vector<c10::SymInt> out{input.sym_size(0), cout};
    for (const auto d : c10::irange(2)) {
      const auto k = prepacked ? c10::SymInt(weight.size(d + 2)) : weight.sym_size(d + 2);
      out.push_back(conv_out_size(input.sym_size(d + 2), k, stride[d], padding[d], dilation[d]));
    }
    RF_CHECK(residual->sym_sizes() == c10::SymIntArrayRef(out), op, "`residual` has shape ", residual->sym_sizes(),
             " but conv2d(input) has shape ", c10::SymIntArrayRef(out));
    RF_CHECK(residual->scalar_type() == input.scalar_type() && residual->device() == input.device(), op, "`residual` is ",
             residual->scalar_type(), " on ", residual->device(), ", `input` is ", input.scalar_type(), " on ", input.device());
  }
  if (fused_conv && !wants_grad) {
    if (input.is_cpu()) return onednn_conv_act(input, weight, bias, residual, stride, padding, dilation, groups, a, alpha);
    RF_CHECK(input.is_cuda(), op, "fused_conv runs oneDNN on the CPU or cuDNN on CUDA; got ", input.device(), " tensors");
    // aten's add_relu graph takes the bias as given: only in the input's dtype (the cuDNN graph converts any other)
    if (a == Act::Relu && residual.has_value() && (!bias.has_value() || bias->scalar_type() == input.scalar_type())) {
      return at::cudnn_convolution_add_relu(input, weight, *residual, at::Scalar(1.0), bias, stride, padding, dilation, groups);
    }
    if (auto y = conv_act_graph(input, weight, bias, residual, stride, padding, dilation, groups, a, alpha)) return *y;
  }
  const bool epilogue = input.is_cuda() ? bias.has_value() || residual.has_value() || !(a == Act::None || a == Act::Relu)
                                         : bias.has_value() && (residual.has_value() || a != Act::None);
  if (!wants_grad && epilogue) {
    const auto y = at::conv2d(input, weight, std::nullopt, stride, padding, dilation, groups);
    const int64_t channels = y.size(1);
    const Tensor shift = !bias.has_value()                  ? constant_vector(0.0, channels, y.device())
                         : bias->scalar_type() == at::kFloat ? *bias
                                                             : bias->to(at::kFloat);
    return kernel_ops::bn_act_apply(y, constant_vector(1.0, channels, y.device()), shift, residual, act, alpha);
  }
  // conv2d takes a bias in the input's dtype (a plan may hold the epilogue's fp32 bias)
  const OptTensor conv_bias = bias.has_value() && bias->scalar_type() != input.scalar_type()
                                  ? OptTensor(bias->to(input.scalar_type())) : bias;
  auto y = at::conv2d(input, weight, conv_bias, stride, padding, dilation, groups);
  if (residual.has_value()) {
    if (a == Act::Relu && !wants_grad) return kernel_ops::add_relu_forward(y, *residual);
    y = wants_grad ? y + *residual : y.add_(*residual);
  }
  return apply_act(y, a, alpha, !wants_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CompositeImplicitAutograd, m) { m.impl("conv_act_stage", &conv_act_stage); }

}  // namespace resnet_fused
