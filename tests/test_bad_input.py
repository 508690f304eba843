"""Bad input raises an error that names the problem, at the public functions and at the C++ ops."""

import pytest
import torch

from resnet_fused import backends, functional

OPS = torch.ops.resnet_fused
needs_extension = pytest.mark.skipif(not backends.has_extension(), reason="resnet_fused._C is not built")


def _x(*shape, dtype=torch.float32):
    return torch.randn(shape or (2, 4, 3, 3)).to(dtype)


def _stats(C=4):
    return torch.zeros(C), torch.ones(C)


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda: functional.bn_act(torch.randn(2, 4, 3), *_stats()), ValueError, r"4-D \(N, C, H, W\).*\(2, 4, 3\)"),
        (lambda: functional.bn_act(_x(), *_stats(5)), ValueError, r"`running_mean` of shape \(4,\), one per channel of input \(2, 4, 3, 3\), got \(5,\)"),
        (lambda: functional.bn_act(_x(), *_stats(), weight=torch.ones(3)), ValueError, r"`weight` of shape \(4,\).*got \(3,\)"),
        (lambda: functional.bn_act(_x(dtype=torch.int32), *_stats()), TypeError, r"floating point, got torch.int32"),
        (lambda: functional.bn_act(_x(), *_stats(), residual=_x(2, 4, 3, 2)), ValueError,
         r"`residual` must match `input`: got \(2, 4, 3, 2\).*input is \(2, 4, 3, 3\)"),
        (lambda: functional.bn_act(_x(), *_stats(), residual=_x(dtype=torch.float16)), ValueError, r"torch.float16.*torch.float32"),
        (lambda: functional.bn_act(_x(), *_stats(), weight=torch.ones(4, device="meta")), ValueError,
         r"`weight` is on meta but `input` is on cpu"),
        (lambda: functional.bn_act(_x(), None, None, training=False), ValueError, r"must be given in evaluation mode"),
        (lambda: functional.bn_act(_x(), torch.zeros(4), None, training=True), ValueError, r"both running_mean and running_var"),
        (lambda: functional.bn_act(_x(), *_stats(), training=True, momentum=None), TypeError, r"1 / num_batches_tracked"),
        (lambda: functional.bn_act(_x(), *_stats(), backend="cuda"), RuntimeError, r"backend 'cuda' cannot run this call"),
        (lambda: functional.bn_act(_x(), *_stats(), backend="fastest"), ValueError, r"unknown backend 'fastest'"),
        (lambda: functional.add_relu(_x(), _x(2, 4, 3, 4)), ValueError, r"`residual` must match `input`"),
        (lambda: functional.add_relu(_x(dtype=torch.int64), _x(dtype=torch.int64)), TypeError, r"floating point, got torch.int64"),
        (lambda: functional.add_relu(_x(), "x"), TypeError, r"`residual` must be a Tensor, got str"),
        (lambda: functional.bn_act(_x(), *_stats(), bias=[0.0] * 4), TypeError, r"`bias` must be a Tensor or None, got list"),
    ],
)
def test_public_functions_reject_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


@needs_extension
@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: OPS.bn_stats(torch.randn(4, 3)), r"bn_stats: expected `input` to be a 4-D \(N, C, H, W\) tensor, got shape \[4, 3\]"),
        (lambda: OPS.bn_stats(_x(dtype=torch.float64)), r"float32, float16 or bfloat16, got Double"),
        (lambda: OPS.add_relu_forward(_x(), _x(2, 4, 3, 2)), r"add_relu_forward: `residual` has shape \[2, 4, 3, 2\] but `input` has shape \[2, 4, 3, 3\]"),
        (lambda: OPS.bn_act_apply(_x(), torch.ones(3), torch.ones(4), None, True), r"`scale` of shape \[4\].*got shape \[3\]"),
        (lambda: OPS.bn_act_apply(_x(), torch.ones(4, dtype=torch.float16), torch.ones(4), None, True), r"`scale` to be float32, got Half"),
        (lambda: OPS.bn_act_apply(_x(), torch.ones(4), torch.ones(4), _x(dtype=torch.bfloat16), True), r"`residual` is BFloat16 but `input` is Float"),
        (lambda: OPS.bn_act_backward_reduce(_x(), _x(), torch.ones(4), _x(1, 4, 3, 3)), r"`output` has shape \[1, 4, 3, 3\]"),
        (lambda: OPS.bn_act_backward_elemt(_x(), None, _x(), None, torch.ones(4), None, None, False), r"given together"),
    ],
)
def test_cpp_ops_reject_bad_input(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()
