"""The fused functions, as users call them (the op layer lives in resnet_fused.ops)::

    add_relu(input, residual)                               relu(input + residual)
    bn_act(input, running_mean, running_var, ..., act=)     act(F.batch_norm(input, ...) + residual)
    conv_bn_act(input, conv_weight, conv_bias, ...)         act(batch_norm(conv2d(input, ...)) + residual)
    conv_bn_defer(...) -> (y, DeferredBnReLU)               a conv whose BN + ReLU the next conv applies
    fold_bn(...), conv_act(...)                             eval: BN folded into the conv, then the epilogue
    prepack_conv_weight(...), onednn_inference(...)         CPU inference through oneDNN
"""

from resnet_fused.ops._bn_math import fold_bn
from resnet_fused.ops.add_relu import add_relu
from resnet_fused.ops.bn_act import bn_act
from resnet_fused.ops.conv_bn_act import conv_act, conv_bn_act
from resnet_fused.ops.conv_stats import DeferredBnReLU, conv_bn_defer
from resnet_fused.ops.onednn import onednn_inference, prepack_conv_weight

__all__ = ["DeferredBnReLU", "add_relu", "bn_act", "conv_act", "conv_bn_act", "conv_bn_defer", "fold_bn", "onednn_inference",
           "prepack_conv_weight"]
