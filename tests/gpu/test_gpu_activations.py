"""Every activation through the CUDA kernel ops bn_act_apply and act_backward (csrc/cuda/bn_act.cu), skipped
visibly without a GPU or without the CUDA kernels in resnet_fused._C.

  bn_act_apply(x, scale, shift, residual, act, alpha) = act(z),  z = x * scale[c] + shift[c] (+ residual)
  act_backward(g, x, scale, shift, residual, act, alpha) = g * act'(z), z recomputed in fp32

Each activation x dtype (fp32 / fp16 / bf16) x layout (NCHW / channels_last) x residual or not, at odd
shapes (N = 1, C = 3, 7x7, C and H*W not powers of two; the 16-byte vector path and the scalar path of
both layouts), against resnet_fused.reference in float64 with the eager-error rule (tests/helpers.py):
the eager result is the reference in the inputs' dtype, on the GPU (torch's own activation kernels in
fp32, rounded once). Inputs are random, never zero, with z spread over every branch of the activations
(|z| up to ~12: past ReLU6's 6 and hardswish's +-3). New allocations are NaN-poisoned, so an output
element a kernel leaves unwritten fails.

At a point where act' jumps (ReLU's 0, ReLU6's 0 and 6, hardswish's and hardsigmoid's +-3), fp32 and
float64 z may fall on either side when |z - kink| is within the rounding of z's terms: the gradient there
is a coin toss of the precision, not of the kernel, and those elements (about one in 10^6) are left out
of the backward comparison.
"""

import pytest
import torch

from helpers import CL, DTYPES, NCHW, activation, assert_matches_spec, assert_within_eager_error, layout_of
from resnet_fused import backends, reference
from resnet_fused.activations import ACTIVATIONS

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and backends.extension_has_cuda()),
                                reason="needs a CUDA GPU and resnet_fused._C built with CUDA")

OPS = torch.ops.resnet_fused
# (1, 3, 7, 7): the scalar path in both layouts; (3, 24, 5, 8): C and H*W multiples of 8, the 16-byte
# vector path in both layouts; (2, 40, 7, 7): vectors in channels_last, scalars in NCHW; (2, 13, 3, 5):
# C prime, scalars everywhere
SHAPES = [(1, 3, 7, 7), (3, 24, 5, 8), (2, 40, 7, 7), (2, 13, 3, 5)]
ALPHA = {"leaky_relu": 0.2}  # the negative slope; the other activations ignore alpha
# the z where d act / dz jumps
KINKS = {"relu": (0.0,), "relu6": (0.0, 6.0), "leaky_relu": (0.0,), "hardswish": (-3.0, 3.0),
         "hardsigmoid": (-3.0, 3.0)}
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _channel(C):
    """Per-channel fp32 scale: |scale| in [0.5, 2], random sign."""
    v = torch.empty(C).uniform_(0.5, 2.0) * torch.where(torch.rand(C) < 0.5, -1.0, 1.0)
    return v.cuda()


def _inputs(shape, dtype, fmt, with_residual):
    """x ~ N(0, 9), scale, shift ~ N(0, 1) (fp32), residual ~ N(0, 1) or None; activations in dtype and fmt."""
    x = activation(shape, dtype, fmt, "cuda", scale=3.0)
    scale, shift = _channel(shape[1]), torch.randn(shape[1], device="cuda")
    residual = activation(shape, dtype, fmt, "cuda") if with_residual else None
    return x, scale, shift, residual


def _f64(*tensors):
    return [None if t is None else t.double() for t in tensors]


def _away_from_kinks(act, x, scale, shift, residual):
    """The elements whose float64 z lies farther from every kink of act' than a few fp32 roundings of
    z's terms, sum |x * scale[c]| + |shift[c]| + |residual|: there fp32 and float64 z pick the same side."""
    x, scale, shift, residual = _f64(x, scale, shift, residual)
    scale, shift = scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1)
    z = x * scale + shift + (0 if residual is None else residual)
    size = (x * scale).abs() + shift.abs() + (0 if residual is None else residual.abs())
    keep = torch.ones_like(z, dtype=torch.bool)
    for k in KINKS.get(act, ()):
        keep &= (z - k).abs() > 8 * torch.finfo(torch.float32).eps * size
    return keep


@pytest.mark.parametrize("with_residual", [False, True], ids=["", "res"])
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_bn_act_apply(act, dtype, fmt, with_residual, poisoned):
    alpha = ALPHA.get(act, 0.0)
    for shape in SHAPES:
        x, scale, shift, residual = _inputs(shape, dtype, fmt, with_residual)
        out = OPS.bn_act_apply(x, scale, shift, residual, act, alpha)
        eager = reference.bn_act_apply(x, scale, shift, residual, act, alpha)
        exact = reference.bn_act_apply(*_f64(x, scale, shift, residual), act, alpha)
        assert layout_of(out) == layout_of(x), f"{act} {shape}: output in {layout_of(out)}, input in {layout_of(x)}"
        assert_within_eager_error(out, eager, exact, f"bn_act_apply {act} {shape} {dtype}")


@pytest.mark.parametrize("with_residual", [False, True], ids=["", "res"])
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_act_backward(act, dtype, fmt, with_residual, poisoned):
    alpha = ALPHA.get(act, 0.0)
    for shape in SHAPES:
        x, scale, shift, residual = _inputs(shape, dtype, fmt, with_residual)
        g = activation(shape, dtype, fmt, "cuda")
        dz = OPS.act_backward(g, x, scale, shift, residual, act, alpha)
        eager = reference.act_backward(g, x, scale, shift, residual, act, alpha)
        exact = reference.act_backward(*_f64(g, x, scale, shift, residual), act, alpha)
        assert dz.dtype == g.dtype and layout_of(dz) == layout_of(x), f"{act} {shape}: {dz.dtype}, {layout_of(dz)}"
        keep = _away_from_kinks(act, x, scale, shift, residual)
        assert keep.double().mean().item() > 0.99, f"{act} {shape}: too many elements at a kink of act'"
        assert_within_eager_error(dz[keep], eager[keep], exact[keep], f"act_backward {act} {shape} {dtype}")


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_act_backward_follows_input_layout(act, poisoned):
    """grad_out and residual in the other layout than input: dz is laid out like input, same values."""
    alpha = ALPHA.get(act, 0.0)
    for fmt, other in ((NCHW, CL), (CL, NCHW)):
        x, scale, shift, residual = _inputs((2, 24, 5, 8), torch.float16, fmt, True)
        g = activation(x.shape, torch.float16, other, "cuda")
        dz = OPS.act_backward(g, x, scale, shift, residual.contiguous(memory_format=other), act, alpha)
        expected = OPS.act_backward(g.contiguous(memory_format=fmt), x, scale, shift, residual, act, alpha)
        assert layout_of(dz) == layout_of(x) and torch.equal(dz, expected), f"{act} input {fmt}, grad_out {other}"


# (2, 11, 3, 5): scalar tails in both layouts; (2, 16, 4, 4): the 16-byte vectors in both layouts
NAN_SHAPES = [(2, 11, 3, 5), (2, 16, 4, 4)]


@pytest.mark.parametrize("with_residual", [False, True], ids=["", "res"])
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_nan_propagation(act, dtype, fmt, with_residual):
    """A NaN in x gives NaN out of bn_act_apply (every activation, as torch's) and the other elements
    match the reference; act_backward has NaN exactly where the reference (aten's CPU backward at z = NaN) has."""
    alpha = ALPHA.get(act, 0.0)
    for shape in NAN_SHAPES:
        x, scale, shift, residual = _inputs(shape, dtype, NCHW, with_residual)
        x.view(-1)[::7] = float("nan")  # lanes of vectors and scalar tails, every channel
        x = x.contiguous(memory_format=fmt)
        residual = None if residual is None else residual.contiguous(memory_format=fmt)
        out = OPS.bn_act_apply(x, scale, shift, residual, act, alpha)
        assert out.isnan().equal(x.isnan()), f"bn_act_apply {act} {shape}: NaN in != NaN out"
        assert_matches_spec(out, reference.bn_act_apply(x, scale, shift, residual, act, alpha),
                            f"bn_act_apply {act} {shape} {dtype}")
        g = activation(shape, dtype, fmt, "cuda")
        dz = OPS.act_backward(g, x, scale, shift, residual, act, alpha)
        # the derivative at z = NaN is aten's vectorized CPU kernels' on every device (resnet_fused/activations.py);
        # aten's own CUDA kernels differ there (hardswish: grad, relu6: grad), so the spec runs on the CPU
        cpu = [t.cpu() if t is not None else None for t in (g, x, scale, shift, residual)]
        spec = reference.act_backward(*cpu, act, alpha)
        assert dz.isnan().cpu().equal(spec.isnan()), f"act_backward {act} {shape} {dtype}: NaN positions differ"


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_opcheck(act):
    """torch.library.opcheck of both ops on CUDA tensors (fp16), both layouts, with and without residual."""
    alpha = ALPHA.get(act, 0.0)
    for fmt in (NCHW, CL):
        for with_residual in (False, True):
            x, scale, shift, residual = _inputs((2, 16, 5, 6), torch.float16, fmt, with_residual)
            g = activation(x.shape, torch.float16, fmt, "cuda")
            torch.library.opcheck(OPS.bn_act_apply, (x, scale, shift, residual, act, alpha))
            torch.library.opcheck(OPS.act_backward, (g, x, scale, shift, residual, act, alpha))


def test_unknown_activation():
    x, scale, shift, _ = _inputs((2, 16, 5, 6), torch.float16, NCHW, False)
    with pytest.raises(RuntimeError, match=r"bn_act_apply: unknown activation 'swish'; known: none, relu"):
        OPS.bn_act_apply(x, scale, shift, None, "swish", 0.0)
    with pytest.raises(RuntimeError, match=r"act_backward: unknown activation 'swish'; known: none, relu"):
        OPS.act_backward(x, x, scale, shift, None, "swish", 0.0)
