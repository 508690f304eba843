"""The op layer: torch ops (``torch.ops.resnet_fused.*``), their fakes and autograd, and the public
functions that validate arguments, pick the backend and call them. One module per op family:

  add_relu.py     add_relu                                   relu(input + residual)
  bn_act.py       bn_act (ops bn_act_train, bn_act_eval)     act(batch_norm(input) + residual)
  sync_bn.py      bn_act's synchronized twin (nn.SyncBatchNorm semantics)
  conv_stats.py   conv2d_stats, conv_bn_defer, DeferredBnReLU  conv with its output's batch statistics
  conv_bn_act.py  conv_bn_act, conv_act, route()
  cudnn.py        CUDA inference: cuDNN conv + epilogue, cudnn_conv_add_relu
  onednn.py       CPU inference through oneDNN, weight prepacking
  arena.py        CPU outputs of the fused layers in reused memory (csrc/cpu_arena.cpp)
  triton.py       the Triton launchers as ops (resnet_fused::triton_*)
  kernels.py      each backend's kernel ops;  _bn_math.py: BN math;  _checks.py: argument checks;
                  _autocast.py: conv2d's autocast rule for the conv ops

The kernel ops' schemas are in csrc/ops.cpp, their fakes in resnet_fused/_kernel_fakes.py. The public
functions are re-exported by resnet_fused.functional (this package holds the modules only, so that
``resnet_fused.ops.bn_act`` is the module, not the function of the same name).
"""

from resnet_fused import backends
from resnet_fused.ops import add_relu, arena, bn_act, conv_bn_act, conv_stats, cudnn, onednn, sync_bn  # noqa: F401  (registers the ops)

if backends.has_triton():
    from resnet_fused.ops import triton  # noqa: F401  (registers the resnet_fused::triton_* ops)
