// Every resnet_fused kernel-op schema, in one place. Kernels live in cpu/*.cpp and cuda/*.cu; fake
// (meta) kernels in resnet_fused/_kernel_fakes.py (set_python_module below); the differentiable ops
// built on these are in resnet_fused/ops/; the math of each op is written out in plain PyTorch in
// resnet_fused/reference.py.
#include <torch/library.h>

#include "conv_genstats.h"
#include "cpu_arena.h"
#include "python_module.h"

namespace {

PyObject* arena_install(PyObject*, PyObject*) { return PyBool_FromLong(resnet_fused::cpu_arena_install()); }
PyObject* arena_enter(PyObject*, PyObject*) { resnet_fused::cpu_arena_enter(); Py_RETURN_NONE; }
PyObject* arena_exit(PyObject*, PyObject*) { resnet_fused::cpu_arena_exit(); Py_RETURN_NONE; }
PyObject* arena_cached_bytes(PyObject*, PyObject*) { return PyLong_FromSize_t(resnet_fused::cpu_arena_cached_bytes()); }
PyObject* arena_empty_cache(PyObject*, PyObject*) { resnet_fused::cpu_arena_empty_cache(); Py_RETURN_NONE; }

PyObject* graphs_set_enabled(PyObject*, PyObject* on) {
  const int enabled = PyObject_IsTrue(on);
  if (enabled < 0) return nullptr;
  resnet_fused::cudnn_graphs_set_enabled(enabled != 0);
  Py_RETURN_NONE;
}
PyObject* graphs_enabled(PyObject*, PyObject*) { return PyBool_FromLong(resnet_fused::cudnn_graphs_enabled()); }
PyObject* graphs_built(PyObject*, PyObject*) { return PyBool_FromLong(resnet_fused::cudnn_graphs_built()); }
PyObject* graph_report(PyObject*, PyObject*) {
  const auto report = resnet_fused::cudnn_graph_report();
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(report.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < report.size(); ++i) {
    PyObject* item = Py_BuildValue("(ss)", report[i].first.c_str(), report[i].second.c_str());
    if (item == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), item);
  }
  return list;
}

PyMethodDef methods[] = {
    {"cudnn_graphs_set_enabled", graphs_set_enabled, METH_O, "Turn conv_bn_act_stage's cuDNN-graph statistics on or off."},
    {"cudnn_graphs_enabled", graphs_enabled, METH_NOARGS, "Whether the cuDNN-graph path is on."},
    {"cudnn_graphs_built", graphs_built, METH_NOARGS, "Whether this build has the cuDNN graphs (cudnn-frontend found)."},
    {"cudnn_graph_report", graph_report, METH_NOARGS, "[(signature, '' or cuDNN's reason)] of the graphs tried."},
    {"cpu_arena_install", arena_install, METH_NOARGS, "Install the CPU arena as the CPU allocator (once); True if it is."},
    {"cpu_arena_enter", arena_enter, METH_NOARGS, "Allocations on this thread come from the arena until cpu_arena_exit."},
    {"cpu_arena_exit", arena_exit, METH_NOARGS, "Ends the innermost cpu_arena_enter."},
    {"cpu_arena_cached_bytes", arena_cached_bytes, METH_NOARGS, "Bytes freed into the arena, ready for reuse."},
    {"cpu_arena_empty_cache", arena_empty_cache, METH_NOARGS, "Give the arena's free blocks back to the system."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

// resnet_fused._C: these schemas, the CPU arena (cpu_arena.cpp), and the CUDA kernels when built with them
RF_PYTHON_MODULE_WITH(methods)

TORCH_LIBRARY(resnet_fused, m) {
  m.set_python_module("resnet_fused._kernel_fakes");
  // relu(input + residual)
  m.def("add_relu_forward(Tensor input, Tensor residual) -> Tensor");
  // per-channel (mean, biased variance) over N, H, W, fp32
  m.def("bn_stats(Tensor input) -> (Tensor mean, Tensor var)");
  // act(input * scale[c] + shift[c] (+ residual)); act: a name of resnet_fused/activations.py, alpha its parameter
  m.def("bn_act_apply(Tensor input, Tensor scale, Tensor shift, Tensor? residual, str act, float alpha) -> Tensor");
  // grad_out * act'(z), z = input * scale[c] + shift[c] (+ residual): the gradient reaching the normalization
  m.def("act_backward(Tensor grad_out, Tensor input, Tensor scale, Tensor shift, Tensor? residual, str act, float alpha) -> Tensor");
  // (sum dy, sum dy * (input - mean)) per channel, dy = grad_out, 0 where output <= 0 (output=None: no relu)
  m.def("bn_act_backward_reduce(Tensor grad_out, Tensor input, Tensor mean, Tensor? output) -> (Tensor sum_dy, Tensor sum_dy_xmu)");
  // grad_input = dy * dy_scale[c] (+ (input - mean[c]) * x_scale[c] + shift[c]); grad_residual = dy if need_grad_residual
  m.def("bn_act_backward_elemt(Tensor grad_out, Tensor? output, Tensor? input, Tensor? mean, Tensor dy_scale, Tensor? x_scale, Tensor? shift, bool need_grad_residual) -> (Tensor grad_input, Tensor grad_residual)");
  // scale = weight / sqrt(var + eps), shift = bias - mean * scale per channel (weight None: 1, bias None: 0); fp64 math, fp32 out
  m.def("bn_scale_shift(Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps) -> (Tensor scale, Tensor shift)");
  // a = weight * invstd, b = -a invstd^2 sum_dy_xmu / count, c = -a sum_dy / count (eval: b = c = 0), grad_weight = sum_dy_xmu * invstd
  m.def("bn_backward_coeffs(Tensor sum_dy, Tensor sum_dy_xmu, Tensor var, Tensor? weight, float eps, float count, bool training) -> (Tensor a, Tensor b, Tensor c, Tensor grad_weight)");

  // running += w (batch - running) per channel, var unbiased by count / (count - 1), in place; w = momentum_tensor[0],
  // else momentum, else 1 / num_batches_tracked (counted already): the training stages' running-statistics update
  m.def("bn_update_running(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, float count, float? momentum, Tensor? momentum_tensor, Tensor? num_batches_tracked) -> ()");

  // (y, mean, biased var): y = conv2d(a, weight, None, stride, padding, dilation, groups=1) and its per-channel batch
  // statistics, fp32 (fp64 for fp64 y); a = input, or with input_mean / input_var (input's batch statistics, as a
  // conv_genstats returned them) a = relu(batch_norm(input)) = relu(input * scale + shift), scale = input_weight /
  // sqrt(input_var + input_eps), shift = input_bias - input_mean * scale. CUDA: one cuDNN graph where cuDNN has an
  // engine for the signature (the input BN + ReLU applied as the conv loads its input, genstats (sum and sum of squares
  // of y) in its epilogue; csrc/cudnn/), else a written, aten's conv, then bn_stats. Autograd: the gradients of y, a
  // recomputed (the statistics have none: the BN reading them differentiates through them)
  m.def("conv_genstats(Tensor input, Tensor weight, int[2] stride, int[2] padding, int[2] dilation, Tensor? input_mean=None, Tensor? input_var=None, Tensor? input_weight=None, Tensor? input_bias=None, float input_eps=1e-05) -> (Tensor y, Tensor mean, Tensor var)");

  // ---- stages: one op call per fused stage on the cpu and cuda backends, autograd in C++ (bn_act_stage.cpp,
  // conv_bn_act_stage.cpp); Python twins for the torch and Triton backends in resnet_fused/ops/bn_act.py ----
  // (act(batch_norm(input) + residual), batch mean, biased batch var): training, autograd; batch_mean / batch_var:
  // statistics a producer already took; num_batches_tracked += 1 where given, then running_mean / running_var (given
  // together) updated as bn_update_running with count N H W (momentum None without momentum_tensor or
  // num_batches_tracked: no change) where given and the batch is not empty
  m.def("bn_act_batch(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, float eps, str act, float alpha, Tensor? batch_mean=None, Tensor? batch_var=None, Tensor(a!)? running_mean=None, Tensor(b!)? running_var=None, float? momentum=None, Tensor? momentum_tensor=None, Tensor(c!)? num_batches_tracked=None) -> (Tensor out, Tensor mean, Tensor var)");
  // act(batch_norm(input) with running statistics + residual): eval, autograd
  m.def("bn_act_running(Tensor input, Tensor running_mean, Tensor running_var, Tensor? weight, Tensor? bias, Tensor? residual, float eps, str act, float alpha) -> Tensor");
  // the normalization's backward in one call (bn_act_batch's and bn_act_running's backward, after act_backward for an
  // activation other than ReLU): dy = grad_out, 0 where output <= 0 (output=None: no ReLU); invstd = 1 / sqrt(var + eps);
  //   training: grad_input = w invstd (dy - sum dy / M - (input - mean) invstd^2 sum dy (input - mean) / M), M = N H W
  //   eval:     grad_input = dy w invstd
  //   grad_weight = invstd sum dy (input - mean), grad_bias = sum dy (fp32), taken in training or if need_grad_params;
  //   grad_residual = dy. An output not asked for is an empty tensor.
  m.def("bn_act_backward(Tensor grad_out, Tensor input, Tensor mean, Tensor var, Tensor? weight, Tensor? output, float eps, bool training, bool need_grad_input, bool need_grad_params, bool need_grad_residual) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)");
  // act(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps) + residual), running
  // statistics updated in place in training; num_batches_tracked (training) += 1; the momentum: momentum_tensor (0-dim)
  // if given, else momentum, else (None: nn.BatchNorm2d's cumulative average) 1 / num_batches_tracked
  m.def("bn_act_stage(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor? residual, bool training, float? momentum, Tensor? momentum_tensor, float eps, str act, float alpha, Tensor(c!)? num_batches_tracked=None) -> Tensor");
  // bn_act_stage(conv2d(a, conv_weight, conv_bias, stride, padding, dilation, groups), ...); a = input, or with
  // input_mean / input_var (training, no conv bias, groups 1) a = relu(batch_norm(input)) with those batch statistics,
  // as conv_genstats (a BN + ReLU deferred by conv_bn_defer_stage)
  m.def("conv_bn_act_stage(Tensor input, Tensor conv_weight, Tensor? conv_bias, Tensor? bn_weight, Tensor? bn_bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor? residual, int[2] stride, int[2] padding, int[2] dilation, int groups, bool training, float? momentum, Tensor? momentum_tensor, float eps, str act, float alpha, Tensor(c!)? num_batches_tracked=None, Tensor? input_mean=None, Tensor? input_var=None, Tensor? input_weight=None, Tensor? input_bias=None, float input_eps=1e-05) -> Tensor");
  // (y, mean, var) = conv_genstats(input, conv_weight, ..., input BN), then the running statistics updated with y's batch
  // statistics as bn_act_batch does (num_batches_tracked += 1 where given first): a training conv -> BN whose
  // normalization + ReLU is deferred to the next convolution's load (input_mean=mean, input_var=var there)
  m.def("conv_bn_defer_stage(Tensor input, Tensor conv_weight, Tensor(a!)? running_mean, Tensor(b!)? running_var, int[2] stride, int[2] padding, int[2] dilation, float? momentum, Tensor? momentum_tensor, Tensor(c!)? num_batches_tracked=None, Tensor? input_mean=None, Tensor? input_var=None, Tensor? input_weight=None, Tensor? input_bias=None, float input_eps=1e-05) -> (Tensor y, Tensor mean, Tensor var)");
  // act(conv2d(input, weight, bias, stride, padding, dilation, groups) + residual): eval with BN folded into (weight, bias);
  // fused_conv: the convolution takes the epilogue (oneDNN post-ops, weight dense or prepacked; cuDNN conv + add + ReLU)
  m.def("conv_act_stage(Tensor input, Tensor weight, Tensor? bias, Tensor? residual, int[2] stride, int[2] padding, int[2] dilation, int groups, str act, float alpha, bool fused_conv) -> Tensor");
}
